"""One training script for one process, DDP under torchrun, and SLURM's srun: the Trainer reads its place
in the job from the environment (torchrun's RANK/WORLD_SIZE, SLURM's SLURM_PROCID/SLURM_NTASKS).

    python train.py                                     # one process
    torchrun --nproc-per-node=2 train.py                # DDP over 2 processes (gloo on CPU, nccl on GPUs)
    torchrun --nproc-per-node=2 train.py --run-dir R    # again on the same run dir: resumes

The global batch is fixed (`global_batch_size`), so every run takes the same optimizer steps over the
same samples whatever the number of processes: one process accumulates two micro-batches where two
processes take one each, and their per-step losses agree to float rounding.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn
from torch.utils.data import TensorDataset

import disttrain
from disttrain import TrainConfig, Trainer
from disttrain.config import TrainerConfig


def make_data(samples: int = 2048, features: int = 16, classes: int = 4) -> TensorDataset:
    """A seeded classification task: the class is the argmax of a fixed projection of the inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)  # (inputs, target) batches: the Trainer's default loss is cross-entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/ddp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    # disttrain logs what it decides (a resume, and from which snapshot) at INFO; warnings show anyway.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("disttrain").setLevel(logging.INFO)

    disttrain.seed_everything(0)  # before the model is built: every rank starts from the same weights
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    cfg = TrainConfig(
        name="ddp",
        run_dir=args.run_dir,
        trainer=TrainerConfig(
            batch_size=16,  # per process and micro-batch
            global_batch_size=32,  # per optimizer step, on all processes together
            max_epochs=args.epochs,
            num_threads=1,  # the same float arithmetic however the job is launched
        ),
    )
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), make_data(args.samples), cfg)
    summary = trainer.fit()  # sets up the process group (and tears it down) unless one exists
    if trainer.env.is_main:
        world, steps, loss = summary["world_size"], summary["steps"], summary["final_loss"]
        print(f"{steps} steps on {world} process{'es' if world > 1 else ''}, final loss {loss:.4f}")


if __name__ == "__main__":
    main()
