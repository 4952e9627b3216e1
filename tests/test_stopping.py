"""Stopping a run with a signal (issue 11): it stops at a step boundary with a snapshot of that step and
says so in its last line and exit code (128 + the signal); a second Ctrl-C stops it at once, in one
line; `disttrain launcher=torchrun` passes the signal on to the whole job and leaves no process behind;
and the same command then resumes exactly."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from disttrain.snapshot import Snapshot, list_snapshots
from tests.support import JOB as DDP_JOB
from tests.support import SMALL, disttrain, gone, losses, slow_writes, slowed, start, summary, wait_for_step

pytestmark = pytest.mark.slow  # every test here starts processes

#: One epoch of 225 steps, a snapshot every 25.
JOB = [*SMALL, "trainer.max_epochs=1", "snapshot.every_steps=25"]
DDP = ["launcher=torchrun", "launcher.nproc_per_node=2"]
STOP_LINE = re.compile(
    r"disttrain: stopped by signal (SIG\w+) at step (\d+): snapshot step_(\d+) written; "
    r"run the same command to resume"
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    res = disttrain(*JOB, f"run_dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def stopped_at(out: str, sig: signal.Signals) -> int:
    """The step the run's last line says it stopped at, checked line for line."""
    last = out.strip().splitlines()[-1]
    match = STOP_LINE.fullmatch(last)
    assert match, out[-3000:]
    step = int(match.group(2))
    assert last == (
        f"disttrain: stopped by signal {sig.name} at step {step}: snapshot step_{step:08d} written; "
        "run the same command to resume"
    )
    assert "Traceback" not in out
    return step


def assert_snapshot_at(run_dir: Path, step: int) -> None:
    newest = Snapshot(run_dir / "snapshots" / f"step_{step:08d}")
    newest.verify()
    assert newest.load_shared()["counters"]["step"] == step
    assert list_snapshots(run_dir / "snapshots")[0].step == step


# SIGINT has a handler of its own (a second one stops at once); SIGTERM's is also SIGHUP's, SIGUSR1's and
# SIGUSR2's (disttrain.worker.STOP_SIGNALS): SIGHUP has tests of its own in test_reliability, and SIGUSR2,
# SLURM's warning signal, reaches a real cluster's job in test_slurm.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_stops_a_one_process_run_with_a_snapshot_of_its_step(tmp_path, reference, sig) -> None:
    run_dir = tmp_path / "run"
    command = [*JOB, f"run_dir={run_dir}"]
    job = start(*command, **slow_writes(0.2, tmp_path / "slow_writes"))  # a few seconds of run to catch
    wait_for_step(job, run_dir, 30)
    os.kill(job.pid, sig)  # Ctrl-C sends SIGINT to the terminal's process group: here, this process
    out, _ = job.communicate(timeout=120)
    assert slowed(tmp_path / "slow_writes"), "the snapshot writes were not slowed (tests/hooks)"
    assert job.returncode == 128 + sig, out[-3000:]
    step = stopped_at(out, sig)
    assert 30 <= step < 225
    assert "done:" not in out
    assert summary(run_dir)["stopped"] == f"stopped by signal {sig.name}"
    assert summary(run_dir)["steps"] == step
    assert_snapshot_at(run_dir, step)

    again = disttrain(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir}/snapshots/step_{step:08d} " in again.stderr
    assert summary(run_dir)["params_sha256"] == summary(reference)["params_sha256"]
    assert losses(run_dir) == losses(reference)


def test_a_second_ctrl_c_stops_a_one_process_run_now_in_one_line(tmp_path, reference) -> None:
    run_dir = tmp_path / "run"
    command = [*JOB, f"run_dir={run_dir}"]
    # Every snapshot commit takes 2 s more: the first Ctrl-C's snapshot is still being written (or the
    # one before it, which the training waits for) when the second comes.
    job = start(*command, **slow_writes(2, tmp_path / "slow_writes"))
    wait_for_step(job, run_dir, 30)
    os.kill(job.pid, signal.SIGINT)
    time.sleep(0.5)
    os.kill(job.pid, signal.SIGINT)
    out, _ = job.communicate(timeout=120)
    assert slowed(tmp_path / "slow_writes"), "the snapshot writes were not slowed (tests/hooks)"
    assert job.returncode == 130, out[-3000:]
    newest = list_snapshots(run_dir / "snapshots")[0]
    assert out.strip().splitlines()[-1] == (
        f"disttrain: stopped now by a second SIGINT: the newest snapshot is {newest.path.name}; run the same "
        "command to resume"
    )
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert not (run_dir / "summary.json").exists()
    for snap in list_snapshots(run_dir / "snapshots"):
        snap.verify()

    again = disttrain(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {newest.path} " in again.stderr
    assert summary(run_dir)["params_sha256"] == summary(reference)["params_sha256"]
    assert losses(run_dir) == losses(reference)


def test_ctrl_c_while_the_config_is_checked_is_one_line(tmp_path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "importing"
    waits = "model._target_=tests.targets_import_waits.Model"
    job = start(*JOB, waits, f"run_dir={run_dir}", DISTTRAIN_TEST_MARKER=str(marker))
    deadline = time.monotonic() + 60
    while not marker.exists():  # the check imports the model's module, which takes its time
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGINT)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 130, out
    assert out == "disttrain: interrupted by SIGINT; run the same command to resume\n"
    assert not run_dir.exists()


def test_sigterm_to_the_torchrun_launcher_stops_the_whole_job_with_a_snapshot(
    tmp_path, ddp_reference
) -> None:
    run_dir = tmp_path / "run"
    command = [*DDP_JOB, *DDP, f"run_dir={run_dir}"]
    job = start(*command, **slow_writes(0.2, tmp_path / "slow_writes"))
    wait_for_step(job, run_dir, 30)
    os.kill(job.pid, signal.SIGTERM)  # the launcher alone, as `kill PID` or a scheduler does
    out, _ = job.communicate(timeout=120)
    assert slowed(tmp_path / "slow_writes"), "the snapshot writes were not slowed (tests/hooks)"
    assert job.returncode == 143, out[-3000:]
    assert gone(run_dir, timeout=0) == []  # torchrun and both workers ended before the launcher
    step = stopped_at(out, signal.SIGTERM)
    assert 30 <= step < 226
    assert "rank 0 done" not in out
    assert_snapshot_at(run_dir, step)
    assert summary(run_dir)["world_size"] == 2

    again = disttrain(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir}/snapshots/step_{step:08d} " in again.stderr + again.stdout
    assert summary(run_dir)["params_sha256"] == ddp_reference


def test_a_second_ctrl_c_to_the_torchrun_launcher_kills_the_job_now(tmp_path) -> None:
    run_dir = tmp_path / "run"
    job = start(*DDP_JOB, *DDP, f"run_dir={run_dir}", **slow_writes(2, tmp_path / "slow_writes"))
    deadline = time.monotonic() + 120
    while not (run_dir / "snapshots" / "step_00000050").exists():  # one committed: a newest to name
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGINT)
    time.sleep(0.5)
    os.kill(job.pid, signal.SIGINT)
    out, _ = job.communicate(timeout=120)
    assert slowed(tmp_path / "slow_writes"), "the snapshot writes were not slowed (tests/hooks)"
    assert job.returncode == 130, out[-3000:]
    assert gone(run_dir, timeout=0) == []
    newest = list_snapshots(run_dir / "snapshots")[0]
    assert out.strip().splitlines()[-1] == (
        f"disttrain: stopped now by a second SIGINT: the newest snapshot is {newest.path.name}; run the same "
        "command to resume"
    )
    for snap in list_snapshots(run_dir / "snapshots"):
        snap.verify()
