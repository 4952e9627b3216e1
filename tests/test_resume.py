"""Exact resume: a run killed with SIGKILL mid-epoch and started again with the same command ends on the
same weights, with the same loss at every step, as a run never interrupted."""

from __future__ import annotations

import pytest

from tests.support import SMALL, disttrain, gone, kill_at_step, losses, start, summary

DDP = ["launcher=torchrun", "launcher.nproc_per_node=2"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_finished_run_started_again_changes_nothing(tmp_path) -> None:
    run_dir = tmp_path / "run"
    assert disttrain(*SMALL, "trainer.max_epochs=1", f"run_dir={run_dir}").returncode == 0
    before = summary(run_dir)
    again = disttrain(*SMALL, "trainer.max_epochs=1", f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr
    after = summary(run_dir)
    assert after["params_sha256"] == before["params_sha256"] and after["steps"] == before["steps"]


def dropout_run(run_dir, max_steps: int) -> str:
    """A model with dropout (it draws from the RNG every step) trained up to `max_steps`, resuming from
    whatever run_dir holds; its params_sha256."""
    import torch
    from torch import nn

    import disttrain
    from disttrain.config import TrainerConfig
    from disttrain.data import RandomRegression

    disttrain.seed_everything(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    trainer_cfg = TrainerConfig(batch_size=8, max_epochs=3, max_steps=max_steps, val_fraction=0)
    cfg = disttrain.TrainConfig(run_dir=str(run_dir), trainer=trainer_cfg)
    trainer = disttrain.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), RandomRegression(64), cfg)
    return trainer.fit()["params_sha256"]


@pytest.mark.parametrize("stop", [8, 5], ids=["at-an-epoch-boundary", "mid-epoch"])
def test_resume_draws_the_same_random_numbers(tmp_path, stop) -> None:
    # 8 steps an epoch. The RNG of a snapshot at an epoch's end predates the next epoch's loader seed.
    dropout_run(tmp_path / "resumed", stop)
    assert dropout_run(tmp_path / "resumed", 20) == dropout_run(tmp_path / "straight", 20)
