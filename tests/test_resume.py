"""Exact resume: a run killed with SIGKILL mid-epoch and started again with the same command ends on the
same weights, with the same loss at every step, as a run never interrupted."""

from __future__ import annotations

import pytest

from tests.support import SMALL, disttrain, gone, kill_at_step, losses, start, summary

DDP = ["launcher=torchrun", "launcher.nproc_per_node=2"]


@pytest.mark.parametrize(
    ("launch", "kill_step"),
    [([], 130), (DDP, 70)],
    ids=["one-process", "ddp-2-processes-torchrun"],
)
def test_sigkill_mid_epoch_then_same_command_resumes_bit_exactly(tmp_path, launch, kill_step) -> None:
    job = [*SMALL, *launch, "snapshot.every_steps=25", "trainer.accumulate=2"]
    reference = disttrain(*job, f"run_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "killed"
    command = [*job, f"run_dir={run_dir}"]
    kill_at_step(start(*command), run_dir, kill_step)
    # Nothing of the job trains on: torchrun's workers (each in a session of its own) die with their
    # launcher, else they would race the resumed job in the run dir whose lock went with the launcher.
    assert gone(run_dir) == []
    assert not (run_dir / "summary.json").exists()
    snapshots = [int(p.name.split("_")[1]) for p in (run_dir / "snapshots").glob("step_*")]
    assert snapshots and max(snapshots) < summary(tmp_path / "reference")["steps"]

    again = disttrain(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    assert summary(run_dir)["params_sha256"] == summary(tmp_path / "reference")["params_sha256"]
    assert losses(run_dir) == losses(tmp_path / "reference")


def test_resume_on_another_world_size_is_refused(tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = disttrain(*SMALL, *DDP, "trainer.max_epochs=1", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    again = disttrain(*SMALL, f"run_dir={run_dir}")
    assert again.returncode == 2
    assert again.stderr == (
        f"disttrain: error: run_dir='{run_dir}': cannot resume: the snapshot was written by 2 processes and "
        "this job has 1: resume with 2 processes, or start a new run_dir\n"
    )


def test_finished_run_started_again_changes_nothing(tmp_path) -> None:
    run_dir = tmp_path / "run"
    assert disttrain(*SMALL, "trainer.max_epochs=1", f"run_dir={run_dir}").returncode == 0
    before = summary(run_dir)
    again = disttrain(*SMALL, "trainer.max_epochs=1", f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr
    after = summary(run_dir)
    assert after["params_sha256"] == before["params_sha256"] and after["steps"] == before["steps"]
