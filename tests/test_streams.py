"""A user's own IterableDataset (disttrain.streams): it trains on the same steps as a map-style dataset
of the same order, resumes exactly on the same shape (its state per rank and loader worker), continues
on another shape only when it declares a global position, and is refused in one line otherwise. The
fast tests run the Trainer in this process; the slow ones real torchrun jobs, killed and resumed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from disttrain import TrainConfig, Trainer
from disttrain.config import ConfigError
from tests.streams import Counting, LoggedRegressor, ReshardableCounting, Uneven, Unstated, X, Y, sample


class StopAt:
    """A callback: stop the run (with its snapshot) at `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, run: Any) -> None:
        if run.step == self.step:
            run.request_stop("test")


def config(run_dir: Path, **trainer: Any) -> TrainConfig:
    """30 samples in steps of 2 micro-batches of 4: 3 whole steps an epoch and one of 6, 2 epochs."""
    cfg = TrainConfig(run_dir=str(run_dir))
    t = cfg.trainer
    t.batch_size, t.accumulate, t.num_threads, t.val_fraction, t.max_epochs, t.max_steps = 4, 2, 1, 0, 2, 100
    for key, value in trainer.items():
        setattr(t, key, value)
    return cfg


def fit(data: Any, cfg: TrainConfig, callbacks: list[Any] | None = None, **kw: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = LoggedRegressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return Trainer(model, optimizer, data, cfg, callbacks=callbacks, **kw).fit()


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


class InCountingOrder(Dataset):
    """The samples of Counting(30) as a map-style dataset with Counting's shuffle (EpochSampler takes a
    dataset's own epoch_order)."""

    def __len__(self) -> int:
        return 30

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return sample(i)

    def epoch_order(self, seed: int, epoch: int, n: int) -> list[int]:
        return Counting(30).order(epoch)


def test_a_stream_trains_the_steps_a_map_style_dataset_of_its_order_trains(tmp_path) -> None:
    stream = fit(Counting(30), config(tmp_path / "stream"))
    mapped = fit(InCountingOrder(), config(tmp_path / "map"))
    assert stream["steps"] == mapped["steps"] == 8 and stream["epochs"] == 2
    assert losses(tmp_path / "stream") == losses(tmp_path / "map")  # bit for bit: the same windows
    assert stream["params_sha256"] == mapped["params_sha256"]
    dropped = fit(Counting(30), config(tmp_path / "dropped", drop_last=True))
    assert dropped["steps"] == 6  # each epoch's short last window left out


@pytest.mark.parametrize("data", [Counting, ReshardableCounting, Unstated])
def test_a_stream_stopped_mid_epoch_resumes_on_the_same_steps(tmp_path, data, caplog) -> None:
    reference = fit(data(30), config(tmp_path / "ref"))
    run = tmp_path / "run"
    assert fit(data(30), config(run), [StopAt(2)])["steps"] == 2
    with caplog.at_level(logging.WARNING, logger="disttrain"):
        resumed = fit(data(30), config(run))
    assert losses(run) == losses(tmp_path / "ref")
    assert resumed["params_sha256"] == reference["params_sha256"]
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data:")]
    if data is Unstated:  # re-read and skipped by torchdata, said in one line
        assert warnings == [
            "data: Unstated has no state_dict(): the resume re-reads and skips the 16 samples of epoch 0 "
            "trained on so far (give it state_dict() and load_state_dict() to resume without them)"
        ]
    else:
        assert warnings == []


def test_a_stream_resumed_on_other_loader_workers_is_refused_in_one_line(tmp_path) -> None:
    for data in (Counting, Unstated):
        run = tmp_path / data.__name__
        fit(data(30), config(run), [StopAt(2)])
        with pytest.raises(ConfigError) as e:
            fit(data(30), config(run, num_workers=1))
        held = "its state is per rank and worker"
        if data is Unstated:
            held = "its position cannot be re-read there"
        kind = "a stateful" if data is Counting else "an"
        assert str(e.value) == (
            f"data: {data.__name__} is {kind} IterableDataset resumed mid-epoch from 1 process × 0 loader "
            f"workers on 1 process × 1 loader worker, and {held}; resume on 1 process × 0 loader workers "
            f"(trainer.num_workers=0), or give {data.__name__} load_global_position(epoch, samples) to "
            "continue on any shape"
        )


def test_a_stream_is_refused_in_one_line_where_it_cannot_train(tmp_path) -> None:
    def refused(data: Any, cfg: TrainConfig) -> str:
        with pytest.raises(ConfigError) as e:
            fit(data, cfg)
        return str(e.value)

    assert refused(Counting(30), config(tmp_path / "a", max_steps=0)) == (
        "trainer.max_steps=0: Counting is an IterableDataset without len(), so nothing gives the "
        "learning-rate schedule its length; set trainer.max_steps (the run ends there or at "
        "trainer.max_epochs), or give it __len__ (this rank's samples of an epoch)"
    )
    assert refused(Counting(30), config(tmp_path / "b", val_fraction=0.1)) == (
        "trainer.val_fraction=0.1: Counting is an IterableDataset, of which no share can be held out; "
        "pass val_dataset= (a stream or a map-style dataset), or set trainer.val_fraction=0"
    )
    empty = "data: Counting yields no sample in epoch 0, on any rank"
    assert refused(Counting(0), config(tmp_path / "c")) == empty


def test_a_stream_with_len_needs_no_max_steps_and_validates_on_a_stream(tmp_path) -> None:
    class Sized(Counting):
        def __len__(self) -> int:
            return self.size

    summary = fit(Sized(30), config(tmp_path, max_steps=0), val_dataset=Counting(10, seed=5))
    assert summary["steps"] == 8 and summary["stopped"] == "max_epochs"
    # The validation loss is the mean over the validation stream's samples, of the trained model's.
    model = LoggedRegressor()
    snapshot = sorted((tmp_path / "snapshots").glob("step_*"))[-1]
    from disttrain.snapshot import Snapshot

    model.load_state_dict(Snapshot(snapshot).load_shared()["model"])
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model.linear(X[:10]), Y[:10]).item()
    assert summary["final_val_loss"] == pytest.approx(expected, rel=1e-6)


def test_uneven_streams_in_one_process_take_the_windows_of_their_ranks() -> None:
    ids = [int(s["index"]) for s in Uneven([5, 3], window=2)]
    assert ids == [0, 1, 5, 6, 2, 3, 7, 4]


# ---- real torchrun jobs ---------------------------------------------------------------------------------

#: 2 processes × 2 loader workers, 102 samples, optimizer steps of 2 micro-batches of 4 on each rank (16):
#: 6 whole steps an epoch and one of the 6 left (3 on each rank), 2 epochs: 14 steps. A sample takes
#: 50 ms to read, so that a kill lands mid-epoch.
JOB_STEPS = 14


def stream_job(run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config-dir", "tests/conf", "model=regressor", "model._target_=tests.streams.LoggedRegressor",
        "data=stream", "data.delay=0.05", "trainer.batch_size=4", "trainer.global_batch_size=16",
        "trainer.max_epochs=2", "trainer.max_steps=100", "trainer.val_fraction=0", "trainer.num_threads=1",
        "snapshot.every_steps=1", "optim.lr=0.05", "+callbacks.mark._target_=tests.streams.StepMarker",
        f"run_dir={run_dir}", *extra,
    ]  # fmt: skip


TWO = ["launcher=torchrun", "launcher.nproc_per_node=2", "trainer.num_workers=2"]


@pytest.fixture(scope="module")
def stream_lives(tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted job, and one SIGKILLed mid-epoch (a copy of its run dir for each resume)."""
    from disttrain.snapshot import list_snapshots
    from tests.support import disttrain, gone, kill_at_step, start

    root = tmp_path_factory.mktemp("streams")
    # (reading at full speed: the delay changes no value)
    reference = disttrain(*stream_job(root / "ref"), *TWO, "data.delay=0", ORDER_LOG=str(root / "ref_log"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    kill_at_step(start(*stream_job(root / "run"), *TWO, ORDER_LOG=str(root / "log1")), root / "run", 3)
    assert gone(root / "run") == []
    resumed_at = list_snapshots(root / "run" / "snapshots")[0].step
    assert 0 < resumed_at < 7  # mid-epoch 0
    shutil.copytree(root / "run", root / "run_on_one")
    return {"root": root, "resumed_at": resumed_at}


@pytest.mark.slow
def test_a_stateful_stream_killed_mid_epoch_resumes_exactly_on_the_same_shape(stream_lives) -> None:
    from tests.streams import steps_consumed
    from tests.support import disttrain

    root, at = stream_lives["root"], stream_lives["resumed_at"]
    again = disttrain(*stream_job(root / "run"), *TWO, ORDER_LOG=str(root / "log2"))
    assert again.returncode == 0, again.stderr[-3000:]
    reference = steps_consumed(root / "ref_log")
    assert sorted(reference) == list(range(1, JOB_STEPS + 1))
    assert [len(reference[s]) for s in (6, 7, 8)] == [16, 6, 16]  # the epoch ends on what is left
    lives = {**steps_consumed(root / "log1", up_to=at), **steps_consumed(root / "log2")}
    assert lives == reference
    assert losses(root / "run") == losses(root / "ref")  # the same shape: the same floats


@pytest.mark.slow
def test_a_reshardable_stream_killed_on_two_processes_resumes_on_one_on_the_same_steps(stream_lives) -> None:
    from tests.streams import steps_consumed
    from tests.support import disttrain

    root, at = stream_lives["root"], stream_lives["resumed_at"]
    one = ["trainer.num_workers=2"]
    again = disttrain(*stream_job(root / "run_on_one"), *one, ORDER_LOG=str(root / "log_one"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(epoch 0, step {at}, 2 -> 1 processes)" in again.stderr
    lives = {**steps_consumed(root / "log1", up_to=at), **steps_consumed(root / "log_one")}
    assert lives == steps_consumed(root / "ref_log")
    steps, values = zip(*losses(root / "run_on_one"), strict=True)
    ref_steps, ref_values = zip(*losses(root / "ref"), strict=True)
    assert steps == ref_steps and values == pytest.approx(ref_values, rel=1e-5)


@pytest.mark.slow
def test_a_stateful_stream_resumed_on_another_shape_is_refused_in_one_line(tmp_path) -> None:
    from tests.support import disttrain, tree_hashes

    job = [*stream_job(tmp_path / "run"), "data._target_=tests.streams.Counting", "data.delay=0"]
    first = disttrain(*job, "trainer.max_steps=3")  # stops mid-epoch, with a snapshot
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree_hashes(tmp_path / "run")
    # Refused before torchrun starts a process: one line, exit 2, nothing touched.
    refused = disttrain(*job, "launcher=torchrun", "launcher.nproc_per_node=2", "trainer.num_workers=2")
    assert (refused.returncode, refused.stderr) == (
        2,
        "disttrain: error: data: Counting is a stateful IterableDataset resumed mid-epoch from 1 process × "
        "0 loader workers on 2 processes × 2 loader workers, and its state is per rank and worker; resume "
        "on 1 process × 0 loader workers (trainer.num_workers=0), or give Counting "
        "load_global_position(epoch, samples) to continue on any shape\n",
    )
    assert tree_hashes(tmp_path / "run") == before


@pytest.mark.slow
def test_streams_that_end_at_different_steps_train_as_one_process_on_their_windows(tmp_path) -> None:
    """Rank 0 streams 37 samples, rank 1 32: the epoch's last step holds rank 0's 5 (in micro-batches of
    4 and 1) while rank 1 runs two fillers weighted by zero; one process streams the same windows. The
    validation streams hold 7 and 2 samples (rank 1 runs a filler while rank 0 reads its second batch)."""
    from tests.scripts.uneven_stream import main
    from tests.support import ROOT, torchrun

    two = torchrun(ROOT / "tests" / "scripts" / "uneven_stream.py", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    main(str(tmp_path / "one"))  # one process: this one
    steps, values = zip(*losses(tmp_path / "two"), strict=True)
    assert steps == tuple(range(1, 11))  # 5 steps an epoch: 4 whole and one of 5
    assert values == pytest.approx([loss for _, loss in losses(tmp_path / "one")], rel=1e-6)
    val_two, val_one = (val_losses(tmp_path / name) for name in ("two", "one"))
    assert len(val_two) == 2 and val_two == pytest.approx(val_one, rel=1e-6)


def val_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]
