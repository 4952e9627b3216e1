"""A run with two callbacks of your own (callbacks.py): a CSV of every step, and a stop once the loss is
low enough.

    python train.py                          # stops by itself when the loss has stayed low
    python train.py --target 0               # never stops early: the same run dir resumes and goes on
    torchrun --nproc-per-node=2 train.py     # the same, on 2 processes: the stop is agreed by both ranks
"""

from __future__ import annotations

import argparse
import logging

import torch
from callbacks import StepsCSV, StopBelow
from torch import nn
from torch.utils.data import TensorDataset

import disttrain
from disttrain import TrainConfig, Trainer
from disttrain.config import TrainerConfig


def make_data(samples: int = 1024) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 8, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))  # a linear target: the loss can go near zero


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/callback")
    parser.add_argument("--target", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    # disttrain logs what it decides (a resume, a callback's stop) at INFO; warnings show anyway.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("disttrain").setLevel(logging.INFO)
    disttrain.seed_everything(0)
    model = nn.Linear(8, 1)
    cfg = TrainConfig(
        run_dir=args.run_dir,
        trainer=TrainerConfig(
            batch_size=32, max_epochs=args.epochs, val_fraction=0, loss="mse", num_threads=1
        ),
    )
    callbacks = {"csv": StepsCSV(), "stop": StopBelow(args.target)}
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.05), make_data(), cfg, callbacks=callbacks
    )
    summary = trainer.fit()
    if trainer.env.is_main:
        print(f"{summary['stopped']} at step {summary['steps']}, final loss {summary['final_loss']:.4f}")


if __name__ == "__main__":
    main()
