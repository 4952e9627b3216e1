"""Callbacks (disttrain.callbacks): the events and their order, a stop any rank may ask for, a callback's
state in the snapshot, and the one line for a callback that is wrong. (A callback's state across a
SIGKILL on 2 processes and a resume on one: test_loggers' kill test, which carries StepCounter.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from disttrain.callbacks import EVENTS, CallbackError
from disttrain.cli import main
from disttrain.config import ConfigError
from disttrain.snapshot import list_snapshots
from tests.callbacks import Raises, Recorder, StepCounter, StopAt, Typo, regression_trainer
from tests.support import SMALL, disttrain, summary


def events(out: Path, rank: int = 0) -> list[str]:
    return (out / f"rank{rank}.txt").read_text().splitlines()


def test_wait_for_snapshots_returns_with_the_snapshot_committed(tmp_path) -> None:
    committed: list[bool] = []

    class Waits:
        def on_snapshot(self, run, step) -> None:
            run.wait_for_snapshots()
            committed.append((run.run_dir / "snapshots" / f"step_{step:08d}" / "manifest.json").exists())

    regression_trainer(tmp_path / "run", [Waits()]).fit()
    assert committed == [True] * 6  # steps 2, 4, 5 (an epoch's end), 6, 8, 10


def test_the_events_come_in_their_documented_order(tmp_path) -> None:
    seen: list[dict] = []

    class Lines:
        def on_log(self, run, record) -> None:
            seen.append(record)

    regression_trainer(tmp_path / "run", [Recorder(str(tmp_path / "events")), Lines()]).fit()
    expected = ["setup 0 0", "fit_start 0 0"]
    for epoch in (0, 1):
        expected.append(f"epoch_start {5 * epoch} {epoch}")
        for step in range(5 * epoch + 1, 5 * epoch + 6):
            expected += [f"before_optimizer_step {step - 1} {epoch}", f"step_end {step} {epoch}"]
            if step % 2 == 0 and step % 5:
                expected += [f"before_snapshot {step} {step} {epoch}", f"snapshot {step} {step} {epoch}"]
        end = 5 * epoch + 5  # the epoch has ended: validation, snapshot, then its own event
        expected += [f"validation_start {end} {epoch + 1}", f"validation_end ['val_loss'] {end} {epoch + 1}"]
        expected += [f"before_snapshot {end} {end} {epoch + 1}", f"snapshot {end} {end} {epoch + 1}"]
        expected.append(f"epoch_end {end} {epoch + 1}")
    expected.append("fit_end max_epochs 10 2")
    assert events(tmp_path / "events") == expected
    # on_log gets the lines metrics.jsonl gets, in its order.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in seen] == [int(re.search(r'"step": (\d+)', line)[1]) for line in lines]
    assert [("loss" in r, "val_loss" in r) for r in seen].count((False, True)) == 2


def test_a_callback_stops_the_run_with_a_snapshot_and_its_state_resumes(tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = regression_trainer(run_dir, {"count": StepCounter(), "stop": StopAt(3)}).fit()
    assert (first["stopped"], first["steps"], first["snapshot"]) == (
        "stopped by callback stop",
        3,
        "step_00000003",
    )
    out = tmp_path / "count"
    again = regression_trainer(run_dir, {"count": StepCounter(str(out))}).fit()
    assert again["steps"] == 10 and again["stopped"] == "max_epochs"
    assert out.read_text() == "10"  # 3 counted before the stop, in the snapshot, and 7 after it


def test_an_event_that_does_not_exist_is_refused_before_anything_starts(tmp_path) -> None:
    with pytest.raises(ConfigError) as refused:
        regression_trainer(tmp_path / "run", [Typo()])
    assert str(refused.value) == (
        "callbacks.Typo: Typo.on_step_ned is not an event; the events are " + ", ".join(EVENTS)
    )
    assert not (tmp_path / "run").exists()


EMA_SPEC = "+callbacks.ema._target_=disttrain.ema.EMA"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [EMA_SPEC, "+callbacks.ema.decy=0.9"],
            "callbacks.ema.decy=0.9: disttrain.ema.EMA takes no such argument; did you mean "
            "callbacks.ema.decay?",
        ),
        ([EMA_SPEC, "+callbacks.ema.decay=1.5"], "callbacks.ema: EMA decay=1.5: must be between 0 and 1"),
        (
            ["+callbacks.stop._target_=tests.callbacks.StopAt"],
            "callbacks.stop: StopAt.__init__() missing 1 required positional argument: 'step'",
        ),
        (
            ["logger=mlflow", "+callbacks.mlflow.experiment=' '"],
            "callbacks.mlflow.experiment=' ': must name an experiment",
        ),
        (
            # Refused by the launcher: torchrun would start the workers, which would build it in the group.
            [
                "launcher=torchrun",
                "launcher.nproc_per_node=2",
                "+callbacks.profile._target_=disttrain.profiler.Profiler",
                "+callbacks.profile.active=0",
            ],
            "callbacks.profile: Profiler wait=1, warmup=1, active=0, repeat=1: must be >= 0, >= 0, >= 1 "
            "and >= 0",
        ),
    ],
    ids=["unknown-argument", "bad-value", "missing-argument", "refused-by-the-class", "under-torchrun"],
)
def test_a_callback_the_config_builds_wrong_is_one_line_before_anything_starts(
    overrides: list[str], message: str, tmp_path, capsys
) -> None:
    """In this process, which may start none (tests/tiers.py): refused before torchrun or a process group."""
    assert main([*overrides, f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"disttrain: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_a_callback_that_raises_is_one_line_and_the_newest_snapshot_is_intact(tmp_path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(CallbackError) as raised:
        regression_trainer(run_dir, [Raises(step=3)]).fit()
    assert re.fullmatch(
        r"callback Raises raised in on_step_end: ValueError: no good at step 3 \(.*tests/callbacks\.py:\d+\)",
        str(raised.value),
    )
    newest = list_snapshots(run_dir / "snapshots")[0]
    newest.verify()
    assert newest.step == 2


@pytest.mark.slow
def test_a_stop_asked_on_rank_1_ends_both_ranks_at_one_step_with_the_same_events(tmp_path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "events"
    result = disttrain(
        *SMALL, "launcher=torchrun", "launcher.nproc_per_node=2", f"run_dir={run_dir}",
        "+callbacks.rec._target_=tests.callbacks.Recorder", f"+callbacks.rec.out={out}",
        "+callbacks.stop._target_=tests.callbacks.StopAt", "+callbacks.stop.step=5", "+callbacks.stop.rank=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "disttrain[rank 1]: step 5: callback stop asked the run to stop: step 5 reached on rank 1" in (
        result.stderr
    )
    done = summary(run_dir)
    assert done["stopped"] == "stopped by callback stop" and done["steps"] >= 5
    assert list_snapshots(run_dir / "snapshots")[0].step == done["steps"]
    assert events(out, 0) == events(out, 1)  # every event on both ranks, in one order
    assert events(out, 0)[-1] == f"fit_end stopped by callback stop {done['steps']} 0"
