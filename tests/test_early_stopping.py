"""disttrain.early_stopping.EarlyStopping: monitor, mode, patience and min_delta; the stop at the very
validation that decides it, with a snapshot; its state resumes; trainer.early_stop_patience is it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from disttrain.callbacks import CallbackError
from disttrain.config import SnapshotConfig, TrainConfig, TrainerConfig
from disttrain.data import RandomRegression
from disttrain.early_stopping import EarlyStopping
from disttrain.snapshot import list_snapshots
from disttrain.trainer import Trainer, seed_everything
from tests.callbacks import StopAt
from tests.support import summary


def trainer(run_dir: Path, callbacks, lr: float = 0.05, **options) -> Trainer:
    """48 samples, 12 held out: steps of 8, validation every 2 steps, 5 epochs (25 steps)."""
    seed_everything(0)
    model = nn.Linear(20, 1)
    options = {"batch_size": 8, "max_epochs": 5, "val_fraction": 0.25, "val_every_steps": 2, **options}
    cfg = TrainConfig(
        run_dir=str(run_dir), trainer=TrainerConfig(**options), snapshot=SnapshotConfig(every_steps=0)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return Trainer(model, optimizer, RandomRegression(size=48), cfg, callbacks=callbacks)


def validations(run_dir: Path) -> list[tuple[int, float]]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def expected_stop(vals: list[tuple[int, float]], patience: int, mode: str, min_delta: float) -> int:
    best, bad = (float("inf"), 0) if mode == "min" else (float("-inf"), 0)
    for step, value in vals:
        better = value < best - min_delta if mode == "min" else value > best + min_delta
        best, bad = (value, 0) if better else (best, bad + 1)
        if bad >= patience:
            return step
    raise AssertionError("never stops")


@pytest.mark.parametrize(("mode", "patience", "min_delta"), [("min", 2, 0.05), ("max", 1, 0.0)])
def test_it_stops_at_the_validation_that_decides_with_a_snapshot(tmp_path, mode, patience, min_delta) -> None:
    trainer(tmp_path / "all", []).fit()  # every validation of the whole run
    stop = expected_stop(validations(tmp_path / "all"), patience, mode, min_delta)
    early = EarlyStopping(mode=mode, patience=patience, min_delta=min_delta)
    trainer(tmp_path / "run", {"early": early}).fit()
    assert summary(tmp_path / "run")["steps"] == stop < 25
    assert summary(tmp_path / "run")["stopped"] == "stopped by callback early"
    assert list_snapshots(tmp_path / "run" / "snapshots")[0].step == stop


def test_trainer_early_stop_patience_is_the_callback_and_its_count_resumes(tmp_path) -> None:
    # A learning rate of 2 makes the validation loss jump about.
    trainer(tmp_path / "all", [], lr=2.0).fit()
    vals = validations(tmp_path / "all")
    stop = expected_stop(vals, 3, "min", 0.0)
    # Stopped at step 6 with validations without improvement counted, then resumed: the count goes on
    # (counted afresh, the run would stop later).
    assert expected_stop([(s, v) for s, v in vals if s > 6], 3, "min", 0.0) > stop > 6
    trainer(tmp_path / "run", [StopAt(6)], lr=2.0, early_stop_patience=3).fit()
    assert summary(tmp_path / "run")["steps"] == 6
    trainer(tmp_path / "run", [], lr=2.0, early_stop_patience=3).fit()
    assert summary(tmp_path / "run")["stopped"] == "early_stop"
    assert summary(tmp_path / "run")["steps"] == stop


def test_a_metric_the_validation_lacks_is_one_line(tmp_path) -> None:
    line = (
        "callback early raised in on_validation_end: ValueError: EarlyStopping monitor='val_acc': "
        "the validation has no such metric; it has val_loss"
    )
    with pytest.raises(CallbackError, match=f"^{line}"):
        trainer(tmp_path, {"early": EarlyStopping(monitor="val_acc")}).fit()
