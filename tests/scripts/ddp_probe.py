"""Run under torchrun with 2 processes: counts DDP gradient all-reduces per optimizer step (through a
communication hook) and checks validation ignores the samples DistributedSampler pads in."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from disttrain import TrainConfig, Trainer, distributed
from disttrain.config import SnapshotConfig, StrategyConfig, TrainerConfig
from disttrain.data import RandomRegression

out = Path(sys.argv[1])
cfg = TrainConfig(
    run_dir=str(out.parent / "run"),
    strategy=StrategyConfig(name="ddp"),
    # 40 samples → 20 per rank → 5 micro-batches of 4 an epoch → windows of 3 and 2 micro-batches.
    trainer=TrainerConfig(batch_size=4, accumulate=3, max_epochs=2, val_fraction=0.0, num_threads=1),
    snapshot=SnapshotConfig(keep_last=1),
)
calls = []


def counting_allreduce(state, bucket):
    calls.append(bucket.index())
    return allreduce_hook(state, bucket)


def main() -> None:
    with distributed() as env:
        torch.manual_seed(0)
        model = nn.Linear(20, 1)
        val = RandomRegression(size=5, seed=1)  # 5 samples on 2 ranks: DistributedSampler pads one
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            RandomRegression(size=40),
            cfg,
            val_dataset=val,
        )
        trainer.model.register_comm_hook(None, counting_allreduce)
        result = trainer.fit()
        with torch.no_grad():
            expected = nn.functional.mse_loss(trainer.module(val.x), val.y).item()
        counts = [None] * env.world_size
        dist.all_gather_object(counts, len(calls))
        if env.is_main:
            out.write_text(
                json.dumps(
                    {
                        "steps": result["steps"],
                        "allreduce_calls": counts,
                        "val_loss": trainer.counters.last_val_loss,
                        "expected_val_loss": expected,
                    }
                )
            )
        # The Trainer's DDP reducer holds the group: free it before the group is destroyed, as
        # disttrain's own worker does (a group freed at interpreter exit can abort under gloo).
        del trainer


main()
