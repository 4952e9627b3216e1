"""A dataset that logs the order its samples are read in, for the tests of resuming on another number
of processes: each process appends the indices it reads to `$ORDER_LOG/rank<RANK>.txt`, one per line,
as the loader reads them (num_workers=0: in the training process, in the order the steps consume them).
The log dir comes from the environment, not the config: a resume compares the data's config. A worker
that torchrun's elastic agent restarted logs into `restart<N>/` below it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from disttrain.shards import Shards


class LoggedRegression(Dataset):
    """`size` samples of 8 features and a noisy sum, as dicts with their index; reading one takes
    `delay` seconds, so that a kill lands while the job runs."""

    def __init__(self, size: int = 192, delay: float = 0.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 8, generator=g)
        self.y = self.x.sum(1, keepdim=True) + 0.1 * torch.randn(size, 1, generator=g)
        self.delay = delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        log_dir = Path(os.environ["ORDER_LOG"])
        if restart := int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")):  # an elastic agent's next try
            log_dir = log_dir / f"restart{restart}"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"rank{os.environ.get('RANK', '0')}.txt", "a") as f:
            f.write(f"{i}\n")
        if self.delay:
            time.sleep(self.delay)
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i)}


class Regressor(nn.Module):
    """A dict batch's model: the mean squared error of a linear prediction (a mean over samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return nn.functional.mse_loss(self.linear(x), y)


def steps_read(
    log_dir: Path, first_step: int, global_batch: int, epoch_samples: int | None = None
) -> dict[int, list[int]]:
    """step -> the samples it consumed, in the epoch's global order, from one life's logs: rank r's
    i-th sample of a step is the step's (i·world + r)-th (the sampler gives rank r perm[r::world]).
    An epoch of `epoch_samples` that does not divide by the global batch ends on a shorter step, of
    which rank r holds the positions r, r + world, ... of what is left (some ranks one fewer).
    Only whole steps count (a killed life read samples of a step it never finished)."""
    paths = sorted(log_dir.glob("rank*.txt"), key=lambda p: int(p.stem.removeprefix("rank")))
    ranks = [[int(v) for v in p.read_text().split()] for p in paths]
    world = len(ranks)
    n = epoch_samples or 0
    per_epoch = -(-n // global_batch)
    steps, read, step = {}, [0] * world, first_step
    while True:
        size = global_batch
        if per_epoch and step % per_epoch == 0:  # the epoch's last step
            size = n - (per_epoch - 1) * global_batch
        shares = [max(0, -(-(size - r) // world)) for r in range(world)]
        if any(read[r] + shares[r] > len(ranks[r]) for r in range(world)):
            return steps
        chunk = [ranks[r][read[r] : read[r] + shares[r]] for r in range(world)]
        steps[step] = [chunk[r][i] for i in range(shares[0]) for r in range(world) if i < shares[r]]
        read = [n + share for n, share in zip(read, shares, strict=True)]
        step += 1


class LoggedShards(Shards):
    """disttrain.shards.Shards that logs the global id of every sample it reads, as LoggedRegression does
    (`delay` seconds a sample); a loader worker logs into its rank's file too, in the order it reads.
    With `$ORDER_PAUSE_AT` set to a global id, the batch that holds it is logged, `$ORDER_LOG/paused`
    written and the reader stops there for good: a test kills the job at that known sample."""

    def __init__(self, *args: Any, delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay

    def __getitems__(self, indices: list[int]) -> list[Any]:  # (__getitem__ reads through it too)
        log_dir = Path(os.environ["ORDER_LOG"])
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"rank{os.environ.get('RANK', '0')}.txt", "a") as f:
            f.write("".join(f"{i}\n" for i in indices))
        if self.delay:
            time.sleep(self.delay * len(indices))
        if (pause := os.environ.get("ORDER_PAUSE_AT")) is not None and int(pause) in indices:
            (log_dir / "paused").touch()
            while True:
                time.sleep(1)
        return super().__getitems__(indices)
