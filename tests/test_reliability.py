"""Reliability, second pass (issue 23): a run that no longer trains stops as diverged, never "done"; the
mistakes only the first batch reveals, numbers beyond what the machine takes, a hang-up, a read-only
snapshots directory and a torn metrics file are each one line with the README's exit code."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from disttrain import ConfigError, TrainConfig, Trainer
from disttrain.config import CORES, MAX_THREADS, Range, TrainerConfig, validate_values
from disttrain.data import RandomRegression, TokenCorpus
from disttrain.launch.local import device_preflight
from disttrain.plot import main as plot_main
from disttrain.snapshot import Snapshot, list_snapshots
from tests.conftest import require
from tests.reliability_targets import FlatTargets
from tests.support import JOB as DDP_JOB
from tests.support import (
    NUMBERS,
    SMALL,
    disttrain,
    gone,
    slow_writes,
    slowed,
    start,
    summary,
    wait_for_step,
)

REGRESSION = ["model=regression", "data=regression", "data.size=256", "trainer.num_threads=1"]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The run's one error line: nothing else on stderr, and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# ==== numbers: every one has an upper bound that says what it means ======================================


def test_every_integer_has_an_upper_bound_and_the_machine_bounds_say_why() -> None:
    unbounded = [key for key, f in NUMBERS if f.type == "int" and f.metadata["range"].high == math.inf]
    assert not unbounded, f"integers without an upper bound: {unbounded}"
    ranges = dict(NUMBERS)
    assert ranges["trainer.num_threads"].metadata["range"].high == MAX_THREADS == 4 * CORES
    assert ranges["trainer.timeout_s"].metadata["range"].high == 30 * 24 * 3600


@pytest.mark.parametrize(("key", "field"), NUMBERS, ids=[k for k, _ in NUMBERS])
def test_a_number_above_its_range_is_refused_naming_the_bound(key, field) -> None:
    range_: Range = field.metadata["range"]
    if range_.high == math.inf:
        return  # a float without a cap of its own: finite is its bound (test_config)
    above = range_.high if range_.open_high else range_.high + 1
    value = int(above) if field.type == "int" else float(above)
    cfg = TrainConfig()
    group, _, leaf = key.rpartition(".")
    setattr(getattr(cfg, group), leaf, value)
    with pytest.raises(ConfigError) as e:
        validate_values(cfg)
    assert str(e.value) == f"{key}={value!r}: {range_.rule(value)}"


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["trainer.timeout_s=1e20"],
            "trainer.timeout_s=1e+20: must be at most 2592000 (30 days; a longer wait for the other ranks "
            "is a hung job)",
        ),
        (
            ["trainer.num_threads=100000"],
            f"trainer.num_threads=100000: must be at most {MAX_THREADS} (at most 4 × the {CORES} CPU cores "
            "of this machine)",
        ),
        (
            ["data.num_tokens=3"],
            "data.num_tokens=3: makes no sample: one sample is a window of data.context + 1 = 5 tokens",
        ),
        (
            ["experiment=gpt", "data.num_tokens=50"],
            "data.num_tokens=50: makes no sample: one sample is a window of data.context + 1 = 65 tokens",
        ),
    ],
    ids=["timeout", "threads", "corpus", "gpt-corpus"],
)
def test_a_value_the_machine_or_the_data_cannot_take_is_one_line_and_touches_nothing(
    tmp_path, overrides, line, cli_here
) -> None:
    result = cli_here(*overrides, f"run_dir={tmp_path / 'run'}")
    assert (result.returncode, one_line_error(result)) == (2, f"disttrain: error: {line}")
    assert not (tmp_path / "run").exists()


def test_more_cpu_workers_than_the_cores_take_are_refused() -> None:
    with pytest.raises(ConfigError) as e:
        device_preflight(TrainerConfig(device="cpu"), MAX_THREADS + 1)
    assert str(e.value) == (
        f"launcher.nproc_per_node={MAX_THREADS + 1}: CPU workers must be at most {MAX_THREADS} (at most 4 × "
        f"the {CORES} CPU cores of this machine)"
    )


def test_an_empty_run_dir_is_refused_and_the_current_directory_stays_empty(tmp_path, cli_here) -> None:
    result = cli_here("run_dir=", cwd=tmp_path)
    line = "disttrain: error: run_dir='': must name a directory (empty would write the run into this one)"
    assert (result.returncode, one_line_error(result)) == (2, line)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_run_dir_is_refused_by_the_python_api(tmp_path) -> None:
    model = nn.Linear(20, 1)
    with pytest.raises(ConfigError, match=r"^run_dir='': must name a directory"):
        Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), RandomRegression(), TrainConfig(run_dir="")
        )


# ==== a run that no longer trains stops as diverged =======================================================


@pytest.mark.slow
def test_a_run_whose_steps_are_all_skipped_stops_as_diverged_with_its_last_finite_weights(tmp_path) -> None:
    run_dir = tmp_path / "run"
    # A model without buffers: its weights after the one step taken are finite, and they are snapshotted.
    result = disttrain(*REGRESSION, "optim.lr=1e30", "trainer.max_steps=20", f"run_dir={run_dir}")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "done" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    # Step 1 takes the huge step; every gradient after it is not finite.
    assert result.stderr.strip().splitlines()[-1] == (
        "disttrain: diverged at step 11: 10 steps in a row skipped (non-finite gradients, norm inf; "
        f"health.max_skipped_steps=10); snapshot step_00000011 written (the weights of step 1, the last "
        f"step taken); run dir {run_dir}; lower optim.lr (or fix the data) and run the same command to resume"
    )
    s = summary(run_dir)
    assert (s["stopped"], s["steps"], s["skipped_steps"], s["snapshot"]) == (
        "diverged",
        11,
        10,
        "step_00000011",
    )
    newest = list_snapshots(run_dir / "snapshots")[0]
    newest.verify()
    assert all(torch.isfinite(t).all() for t in newest.load_shared()["model"].values())


@pytest.mark.slow
def test_the_ranks_of_a_torchrun_job_stop_together_as_diverged(tmp_path) -> None:
    run_dir = tmp_path / "run"
    ddp = ["launcher=torchrun", "launcher.nproc_per_node=2", "trainer.batch_size=16"]
    result = disttrain(*REGRESSION, *ddp, "optim.lr=1e30", "trainer.max_steps=20", f"run_dir={run_dir}")
    assert result.returncode == 3, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "done" not in out and "Traceback" not in out
    diverged = [line for line in out.splitlines() if "diverged at step" in line]
    assert diverged == [
        "disttrain: diverged at step 11: 10 steps in a row skipped (non-finite gradients, norm inf; "
        "health.max_skipped_steps=10); snapshot step_00000011 written (the weights of step 1, the last "
        f"step taken); run dir {run_dir}; lower optim.lr (or fix the data) and run the same command to resume"
    ]  # rank 0's, once
    s = summary(run_dir)
    assert (s["stopped"], s["steps"], s["world_size"]) == ("diverged", 11, 2)
    list_snapshots(run_dir / "snapshots")[0].verify()
    assert gone(run_dir, timeout=0) == []


def test_parameters_that_are_not_finite_are_never_the_newest_snapshot(tmp_path, caplog) -> None:
    # From Python: a schedule that turns the learning rate into NaN after two steps (as an optimizer
    # built with lr=nan would at once, which the Trainer refuses: the test below) makes every parameter
    # NaN at step 3; its snapshot is not written, and the run stops there.
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.trainer.batch_size, cfg.trainer.num_threads, cfg.trainer.max_steps = 16, 1, 30
    cfg.snapshot.every_steps = 1
    torch.manual_seed(0)
    model = nn.Linear(20, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 2 else math.nan)
    trainer = Trainer(model, optimizer, RandomRegression(size=256), cfg, scheduler=scheduler)
    result = trainer.fit()
    assert (result["stopped"], result["steps"], result["snapshot"]) == ("diverged", 3, "step_00000002")
    assert not all(torch.isfinite(p).all() for p in model.parameters())
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "diverged at step 3: the model's state is not finite (the first: weight); not written as a snapshot; "
        f"newest good snapshot: step_00000002; run dir {tmp_path / 'run'}; lower optim.lr (or fix the data) "
        "and run the same command to resume"
    ]
    assert [s.step for s in list_snapshots(tmp_path / "run" / "snapshots")] == [2, 1]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped"] == "diverged"


def test_an_optimizer_with_a_learning_rate_that_is_not_finite_is_refused(tmp_path) -> None:
    model = nn.Linear(20, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=float("nan"))
    with pytest.raises(ConfigError) as e:
        Trainer(model, optimizer, RandomRegression(), TrainConfig(run_dir=str(tmp_path / "run")))
    assert str(e.value) == "optimizer: param group 0 has lr=nan: must be a finite number"
    assert not (tmp_path / "run").exists()


def test_a_second_fit_is_refused_in_one_line_saying_how_to_train_further(tmp_path) -> None:
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.trainer.batch_size, cfg.trainer.num_threads, cfg.trainer.max_steps = 16, 1, 2
    model = nn.Linear(20, 1)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), RandomRegression(size=256), cfg)
    assert trainer.fit()["steps"] == 2
    trainer.cfg.trainer.max_steps = 4
    with pytest.raises(ConfigError) as e:
        trainer.fit()
    assert str(e.value) == (
        "Trainer.fit(): this Trainer has trained already (to step 2, max_steps); to train further, build "
        "a new Trainer with the raised trainer.max_steps or max_epochs on the same run_dir: it resumes "
        "from its snapshot"
    )
    cfg.trainer.max_steps = 4  # what the line says: a new Trainer goes on from step 2
    again = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), RandomRegression(size=256), cfg)
    assert again.fit()["steps"] == 4


# ==== what only the first batch reveals ===================================================================


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


@pytest.mark.parametrize(
    ("loss_fn", "name"), [(None, "mse"), (squared_error, "tests.test_reliability.squared_error")]
)
def test_an_output_and_target_the_loss_would_broadcast_are_refused_naming_both_shapes(
    tmp_path, loss_fn, name
) -> None:
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.trainer.batch_size, cfg.trainer.num_threads = 16, 1
    model = nn.Linear(20, 1)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), FlatTargets(), cfg, loss_fn=loss_fn)
    with pytest.raises(ConfigError) as e:
        trainer.fit()
    assert str(e.value) == (
        "loss: the model's output of shape (16, 1) and the target of shape (16,) would broadcast to "
        f"(16, 16) in {name}; make them the same shape (e.g. squeeze the output's last dimension, or give "
        "the target one)"
    )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no step taken
    assert not (tmp_path / "run" / "snapshots").exists()


def test_a_model_that_cannot_take_the_first_batch_is_one_line_naming_the_module(tmp_path) -> None:
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.trainer.batch_size, cfg.trainer.num_threads = 16, 1
    model = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(4, 1))  # 8 features into a layer of 4
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), RandomRegression(size=256), cfg)
    with pytest.raises(ConfigError) as e:
        trainer.fit()
    assert re.fullmatch(
        r"step 1: the model failed on the first batch \(a list of 2 tensors of shapes \(16, 20\), "
        r"\(16, 1\)\) in module 2 \(Linear\): RuntimeError: mat1 and mat2 shapes cannot be multiplied "
        r"\(16x8 and 4x1\) \(.*\.py:\d+\)",
        str(e.value),
    ), str(e.value)


@pytest.mark.parametrize(
    ("model", "line"),
    [
        (nn.Identity(), "model: torch.nn.modules.linear.Identity has no parameters that require grad, so "
         "there is nothing to train"),
        (nn.Linear(0, 1), "model: parameter weight of shape (1, 0) has no elements"),
    ],
    ids=["no-parameters", "width-0"],
)  # fmt: skip
def test_a_model_with_nothing_to_train_is_refused_before_anything_starts(tmp_path, model, line) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # (torch refuses an empty one)
    with pytest.raises(ConfigError) as e:
        Trainer(model, optimizer, RandomRegression(), TrainConfig(run_dir=str(tmp_path / "run")))
    assert str(e.value) == line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_model_target_that_returns_no_module_is_one_line_before_any_step(tmp_path) -> None:
    run_dir = tmp_path / "run"
    result = disttrain(
        *REGRESSION, "model._target_=tests.reliability_targets.not_a_module", f"run_dir={run_dir}"
    )
    assert (result.returncode, one_line_error(result)) == (
        2,
        "disttrain: error: model._target_='tests.reliability_targets.not_a_module': returned a builtins.int, "
        "not a torch.nn.Module",
    )
    assert not (run_dir / "snapshots").exists() and not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_samples_that_do_not_stack_are_one_line_naming_two_of_them(tmp_path) -> None:
    run_dir = tmp_path / "run"
    ragged = [
        "data._target_=tests.reliability_targets.RaggedSequences",
        "~data.in_features",
        "~data.out_features",
    ]
    result = disttrain(*REGRESSION, *ragged, "~data.seed", "trainer.batch_size=8", f"run_dir={run_dir}")
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line_error(result)
    match = re.fullmatch(
        r"disttrain: error: data: samples (\d+) and (\d+) differ in shape \(\((\d),\) and \((\d),\)\), so "
        r"they do not stack into one batch; make every sample the same shape \(pad them\), or pass a "
        r"collate_fn that pads",
        line,
    )
    assert match, line
    first, second, length_first, length_second = map(int, match.groups())
    assert (length_first, length_second) == (4 + first % 2, 4 + second % 2)  # (RaggedSequences' lengths)
    assert length_first != length_second
    assert not (run_dir / "snapshots").exists() and not (run_dir / "summary.json").exists()


# ==== SIGHUP: a stop signal ===============================================================================

HUP_JOB = [*SMALL, "trainer.max_epochs=1", "snapshot.every_steps=25"]


def assert_stopped_by_sighup(out: str, run_dir: Path) -> None:
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(
        r"disttrain: stopped by signal SIGHUP at step (\d+): snapshot step_(\d+) written; run the same "
        r"command to resume",
        last,
    )
    assert match and match.group(1) == str(int(match.group(2))), out[-3000:]
    assert "Traceback" not in out and "done" not in last
    step = int(match.group(1))
    assert summary(run_dir)["stopped"] == "stopped by signal SIGHUP"
    newest = Snapshot(run_dir / "snapshots" / f"step_{step:08d}")
    newest.verify()
    assert newest.load_shared()["counters"]["step"] == step


@pytest.mark.slow
def test_sighup_stops_a_one_process_run_with_a_snapshot_of_its_step(tmp_path) -> None:
    run_dir = tmp_path / "run"
    job = start(*HUP_JOB, f"run_dir={run_dir}", **slow_writes(0.2, tmp_path / "slow_writes"))
    wait_for_step(job, run_dir, 30)
    os.kill(job.pid, signal.SIGHUP)  # the terminal closed
    out, _ = job.communicate(timeout=120)
    assert slowed(tmp_path / "slow_writes"), "the snapshot writes were not slowed (tests/hooks)"
    assert job.returncode == 128 + signal.SIGHUP, out[-3000:]
    assert_stopped_by_sighup(out, run_dir)


@pytest.mark.slow
def test_sighup_to_the_torchrun_launcher_stops_every_worker_with_a_snapshot(tmp_path) -> None:
    run_dir = tmp_path / "run"
    job = start(*DDP_JOB, "launcher=torchrun", "launcher.nproc_per_node=2", f"run_dir={run_dir}",
                **slow_writes(0.2, tmp_path / "slow_writes"))  # fmt: skip
    wait_for_step(job, run_dir, 30)
    os.kill(job.pid, signal.SIGHUP)  # the launcher alone: the ssh session that started it dropped
    out, _ = job.communicate(timeout=120)
    assert slowed(tmp_path / "slow_writes"), "the snapshot writes were not slowed (tests/hooks)"
    assert job.returncode == 128 + signal.SIGHUP, out[-3000:]
    assert gone(run_dir, timeout=0) == []
    assert_stopped_by_sighup(out, run_dir)
    assert summary(run_dir)["world_size"] == 2


# ==== the disk ============================================================================================


@pytest.mark.slow
def test_a_snapshots_directory_made_read_only_mid_run_is_one_line_naming_the_path(tmp_path) -> None:
    run_dir = tmp_path / "run"
    snapshots = run_dir / "snapshots"
    job = start(*HUP_JOB, f"run_dir={run_dir}", **slow_writes(0.1, tmp_path / "slow_writes"))
    deadline = time.monotonic() + 120
    while not (snapshots / "step_00000025").exists():  # committed: a newest good one to name
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    assert slowed(tmp_path / "slow_writes"), "the snapshot writes were not slowed (tests/hooks)"
    made = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(snapshots), str(snapshots)], capture_output=True
    )
    if made.returncode != 0:
        job.kill()
        job.wait()
        require(f"cannot bind-mount a directory read-only: {made.stderr.decode().strip()}")
    try:
        out, _ = job.communicate(timeout=120)
    finally:
        subprocess.run(["umount", str(snapshots)], check=True)
    assert job.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(
        r"disttrain: error: snapshot (step_\d+) not written \(rank 0: \[Errno 30\] Read-only file system: "
        rf"'{re.escape(str(snapshots))}/\.(step_\d+)[./][^']*'\); newest good snapshot: (step_\d+)",
        last,
    )
    assert match and match.group(1) == match.group(2), out[-3000:]
    newest = list_snapshots(snapshots)[0]
    assert newest.path.name == match.group(3) and int(match.group(3)[5:]) < int(match.group(1)[5:])
    newest.verify()


def test_plot_draws_every_whole_line_of_a_torn_or_damaged_metrics_file(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [
        json.dumps({"step": s, "epoch": 0, "loss": 2.0 / s, "grad_norm": 1.0, "samples_per_s": 100.0})
        for s in (1, 2, 3)
    ]
    damaged = (
        "\n".join(lines[:2]).encode() + b"\n\xff\xfe binary\n" + lines[2].encode() + b'\n{"step": 4, "lo'
    )
    (run_dir / "metrics.jsonl").write_bytes(damaged)
    out = tmp_path / "plot.png"
    assert plot_main([str(run_dir), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        f"disttrain plot: {run_dir}/metrics.jsonl: skipped 2 lines that are not a whole JSON record (a "
        "killed run's torn last line, or damaged bytes); plotted 3\n"
    )
    assert captured.out == f"wrote {out}\n" and out.stat().st_size > 0


def test_a_token_corpus_too_short_for_one_window_is_refused_from_python() -> None:
    with pytest.raises(ConfigError) as e:
        TokenCorpus(num_tokens=4, context=4)
    assert (
        str(e.value)
        == "data.num_tokens=4: makes no sample: one sample is a window of data.context + 1 = 5 tokens"
    )
