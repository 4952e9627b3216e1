"""disttrain.ema.EMA: the average equals one written by hand, resumes bit-exactly from its snapshot,
swaps in for validation and out again, and `disttrain export --ema` writes it. (Under FSDP on 2
processes: tests/test_fsdp.py's kill-and-resume test and its validation on the average.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from disttrain.config import SnapshotConfig, TrainConfig, TrainerConfig
from disttrain.data import RandomRegression
from disttrain.ema import EMA
from disttrain.export import main as export
from disttrain.trainer import Trainer, seed_everything
from tests.callbacks import HandEMA, StopAt
from tests.support import summary


def trainer(run_dir: Path, callbacks: list, **options) -> Trainer:
    """48 samples, 12 held out: steps of 8, 5 an epoch, 3 epochs; validation every 2 steps."""
    seed_everything(0)
    model = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 1))
    cfg = TrainConfig(
        run_dir=str(run_dir),
        trainer=TrainerConfig(batch_size=8, max_epochs=3, val_fraction=0.25, val_every_steps=2, **options),
        snapshot=SnapshotConfig(every_steps=3),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    return Trainer(model, optimizer, RandomRegression(size=48), cfg, callbacks=callbacks)


@pytest.mark.parametrize(("start", "every"), [(0, 1), (4, 3)])
def test_the_average_equals_one_written_by_hand(tmp_path, start, every) -> None:
    ema, hand = EMA(decay=0.8, start_step=start, every_n_steps=every), HandEMA(0.8, start, every)
    run = trainer(tmp_path, [ema, hand])
    run.fit()
    assert summary(tmp_path)["steps"] == 15
    assert ema.updates == (15 - start) // every
    for name, average in ema.weights.items():
        torch.testing.assert_close(average.double(), hand.average[name], rtol=0, atol=1e-6)
        # An average, not a copy of the weights.
        assert (average - dict(run.module.named_parameters())[name]).abs().max() > 1e-3


def test_a_stop_and_a_resume_continue_the_average_bit_exactly_and_export_writes_it(tmp_path) -> None:
    whole = EMA(decay=0.7, start_step=2, every_n_steps=2)
    trainer(tmp_path / "whole", [whole]).fit()
    first = EMA(decay=0.7, start_step=2, every_n_steps=2)
    trainer(tmp_path / "run", {"ema": first, "stop": StopAt(7)}).fit()
    assert summary(tmp_path / "run")["steps"] == 7
    resumed = EMA(decay=0.7, start_step=2, every_n_steps=2)
    trainer(tmp_path / "run", {"ema": resumed}).fit()
    assert summary(tmp_path / "run")["steps"] == 15 and resumed.updates == whole.updates == 6
    for name, average in whole.weights.items():
        assert torch.equal(resumed.weights[name], average), name
    out = tmp_path / "ema.pt"
    assert export([str(tmp_path / "run"), "--ema", "-o", str(out)]) == 0
    exported = torch.load(out, weights_only=True)
    assert set(exported) == set(whole.weights)
    for name, average in whole.weights.items():
        assert torch.equal(exported[name], average), name


def test_validation_on_the_average_swaps_it_in_and_the_weights_back(tmp_path) -> None:
    seen: list[bool] = []
    ema = EMA(decay=0.5, validate=True)

    class Probe:
        def on_validation_start(self, run) -> None:  # after EMA's, which swapped the average in
            seen.append(all(torch.equal(p, ema.weights[n]) for n, p in run.model.named_parameters()))

    trainer(tmp_path / "ema", [ema, Probe()]).fit()
    trainer(tmp_path / "plain", [EMA(decay=0.5)]).fit()
    assert seen and all(seen)
    # Training went on with its own weights: the same ones as without the swap, bit for bit.
    assert summary(tmp_path / "ema")["params_sha256"] == summary(tmp_path / "plain")["params_sha256"]
    assert summary(tmp_path / "ema")["final_val_loss"] != summary(tmp_path / "plain")["final_val_loss"]


def test_bad_arguments_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"^EMA decay=1.5: must be between 0 and 1$"):
        EMA(decay=1.5)
