"""FSDP2 through disttrain's Python API: the model's parameters, gradients and optimizer state are
sharded over the processes, each holding 1/N of them; snapshots are sharded too (every rank writes its
own shards), and `disttrain export` puts the model back together into one file.

    torchrun --nproc-per-node=2 train.py                 # FSDP needs more than one process
    python -m disttrain export runs/fsdp -o model.pt     # the newest snapshot's model, as one state_dict
"""

from __future__ import annotations

import argparse

import torch
from model import DeepMLP
from torch.utils.data import TensorDataset

import disttrain
from disttrain import TrainConfig, Trainer
from disttrain.config import StrategyConfig, TrainerConfig


def make_data(samples: int = 2048, features: int = 16, classes: int = 4) -> TensorDataset:
    """A seeded classification task: the class is the argmax of a fixed projection of the inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/fsdp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()

    cfg = TrainConfig(
        name="fsdp",
        run_dir=args.run_dir,
        strategy=StrategyConfig(name="fsdp"),
        trainer=TrainerConfig(batch_size=32, max_epochs=args.epochs, num_threads=1),
    )
    disttrain.seed_everything(0)
    # Rank 0 builds the model in full (its weights), every other rank on the meta device (no memory);
    # the Trainer shards it and sends every rank its shards of rank 0's weights.
    model = disttrain.build_model(lambda: DeepMLP(depth=args.depth), cfg)
    total = sum(p.numel() for p in model.parameters())
    # Build the optimizer over the model's parameters as usual: when the Trainer shards the model it
    # points the optimizer at the sharded parameters by name.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    trainer = Trainer(model, optimizer, make_data(args.samples), cfg)
    # Each parameter is now a DTensor; this rank holds its local shard of it.
    local = sum(p.to_local().numel() for p in trainer.module.parameters())
    summary = trainer.fit()
    if trainer.env.is_main:
        print(f"rank 0 held {local:,} of {total:,} parameters ({summary['world_size']} processes)")
        print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}")


if __name__ == "__main__":
    main()
