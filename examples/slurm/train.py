"""A Python API training script for SLURM: every task of `srun` is one rank (the Trainer reads
SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS), and a preemption warning becomes a snapshot and a requeue.

    sbatch train.sbatch                 # see train.sbatch; the run dir is runs/slurm-<job id>

SLURM sends `--signal=USR2@120` to every task 120 s before the time limit. Each rank asks its Trainer to
stop; the ranks agree on one step, write a snapshot of it, and `fit()` returns. Rank 0 then requeues the
job, and the requeued job, with the same job id and so the same run dir, resumes from that snapshot.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import disttrain
from disttrain import TrainConfig, Trainer
from disttrain.config import SnapshotConfig, TrainerConfig


def make_data(samples: int = 2048, features: int = 16, classes: int = 4) -> TensorDataset:
    """A seeded classification task: the class is the argmax of a fixed projection of the inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=f"runs/slurm-{os.environ.get('SLURM_JOB_ID', 'local')}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    # disttrain logs what it decides (a resume, and from which snapshot) at INFO: said once, by rank 0.
    logging.basicConfig(format="%(name)s: %(message)s")
    rank0 = os.environ.get("SLURM_PROCID", "0") == "0"
    logging.getLogger("disttrain").setLevel(logging.INFO if rank0 else logging.WARNING)

    disttrain.seed_everything(0)  # before the model is built: every rank starts from the same weights
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    cfg = TrainConfig(
        name="slurm",
        run_dir=args.run_dir,
        trainer=TrainerConfig(batch_size=16, global_batch_size=32, max_epochs=args.epochs, num_threads=1),
        snapshot=SnapshotConfig(every_steps=100),
    )
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), make_data(args.samples), cfg)
    # The Trainer installs no signal handlers of its own; request_stop only sets a flag, so it is safe
    # in one. SIGTERM too: scancel and a node's shutdown send it.
    for signum in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(signum, trainer.request_stop)
    summary = trainer.fit()
    if not trainer.env.is_main:
        return 0
    if summary["stopped"].startswith("stopped by signal") and "SLURM_JOB_ID" in os.environ:
        # The snapshot of the stop step is on disk: the requeued job resumes from it.
        requeue = subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        print(f"{summary['stopped']} at step {summary['steps']}: requeued", flush=True)
        return 0 if requeue.returncode == 0 else 1  # a failed requeue must not look like a finished run
    print(f"done: {summary['steps']} steps on {summary['world_size']} processes, {summary['params_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
