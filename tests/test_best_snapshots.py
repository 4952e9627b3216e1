"""disttrain.best_snapshots.BestSnapshots: the K best snapshots by a validation metric stay besides the
newest ones, across a resume, and best_snapshots.json names them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from disttrain.best_snapshots import BestSnapshots
from disttrain.config import SnapshotConfig, TrainConfig, TrainerConfig
from disttrain.data import RandomRegression
from disttrain.snapshot import list_snapshots
from disttrain.trainer import Trainer, seed_everything
from tests.callbacks import StopAt
from tests.support import summary


def trainer(run_dir: Path, callbacks) -> Trainer:
    """Validation and a snapshot every 2 steps, 25 steps; a learning rate of 2 makes the validation
    loss jump about, so the best snapshots are not the newest."""
    seed_everything(0)
    model = nn.Linear(20, 1)
    cfg = TrainConfig(
        run_dir=str(run_dir),
        trainer=TrainerConfig(batch_size=8, max_epochs=5, val_fraction=0.25, val_every_steps=2),
        snapshot=SnapshotConfig(every_steps=2, keep_last=1),
    )
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=2.0), RandomRegression(size=48), cfg,
                   callbacks=callbacks)  # fmt: skip


def test_the_best_k_stay_besides_the_newest_across_a_resume(tmp_path) -> None:
    trainer(tmp_path / "run", {"best": BestSnapshots(k=2), "stop": StopAt(11)}).fit()
    assert summary(tmp_path / "run")["steps"] == 11
    trainer(tmp_path / "run", {"best": BestSnapshots(k=2)}).fit()
    assert summary(tmp_path / "run")["steps"] == 25
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Every step with both a validation and a snapshot: the even ones and the epochs' ends.
    scored = sorted((r["val_loss"], r["step"]) for r in rows if "val_loss" in r and r["step"] != 11)
    best = [step for _, step in scored[:2]]
    # (Else the test would not tell the best from the newest, nor a list resumed from one started afresh.)
    assert 25 not in best and min(best) < 11
    kept = {s.step for s in list_snapshots(tmp_path / "run" / "snapshots")}
    assert kept == {25, *best}
    listed = json.loads((tmp_path / "run" / "best_snapshots.json").read_text())
    assert [(b["step"], b["snapshot"]) for b in listed] == [(s, f"step_{s:08d}") for s in best]
