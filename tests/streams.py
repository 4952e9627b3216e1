"""IterableDatasets as users write them, for the tests of disttrain.streams: each yields its rank's
samples (torch.distributed's rank and world size) and, in a loader worker, its worker's batches of
them. Samples are dicts {x, y, index} for tests.order.Regressor; `index` is the sample's global id.

The model LoggedRegressor logs the ids of every training forward, with its step, into
`$ORDER_LOG/rank<RANK>.txt` (in the training process, in the order the steps consume them; a filler
repeats the batch before it, which steps_consumed drops)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from tests.order import Regressor

#: The feature rows and targets of ids 0..1023: every stream's samples, whatever their order.
_g = torch.Generator().manual_seed(0)
X = torch.randn(1024, 8, generator=_g)
Y = X.sum(1, keepdim=True) + 0.1 * torch.randn(1024, 1, generator=_g)


def sample(i: int) -> dict[str, torch.Tensor]:
    return {"x": X[i], "y": Y[i], "index": torch.tensor(i)}


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Unstated(IterableDataset):
    """`size` ids in an order shuffled by (seed, epoch). Rank r of R reads the positions r, r + R, ...
    of it (as torch's DistributedSampler), and loader worker w of W the batches w, w + W, ... of its
    rank's (the loader takes them round robin), so every optimizer step holds the same ids on any R and
    W. A pass read to its end starts again. Without state: a resume can only re-read what was consumed."""

    def __init__(self, size: int = 120, batch_size: int = 4, seed: int = 0, delay: float = 0.0) -> None:
        self.size, self.batch_size, self.seed, self.delay = size, batch_size, seed, delay
        self.epoch, self.yielded, self.start = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.yielded, self.start = epoch, 0, 0

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def mine(self) -> list[int]:
        """This rank's ids from its position `start` on, then this worker's batches of them."""
        rank, world = rank_and_world()
        ids = self.order(self.epoch)[rank::world][self.start :]
        info = get_worker_info()
        if info is None:
            return ids
        b = self.batch_size
        return [i for j in range(info.id * b, len(ids), info.num_workers * b) for i in ids[j : j + b]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in self.mine()[self.yielded :]:
            if self.delay:
                time.sleep(self.delay)
            self.yielded += 1
            yield sample(i)
        self.yielded = 0  # a whole pass: the next one starts from the beginning (a validation's)


class Counting(Unstated):
    """Unstated with state the torchdata way: a copy's state is its epoch and how many samples it has
    yielded of its part."""

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "yielded": self.yielded, "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.yielded, self.start = state["epoch"], state["yielded"], state["start"]


class ReshardableCounting(Counting):
    """Counting that continues an epoch from a global position on any number of processes and workers."""

    def load_global_position(self, epoch: int, samples: int) -> None:
        _, world = rank_and_world()
        self.epoch, self.yielded, self.start = epoch, 0, samples // world  # (a multiple of the global batch)


class Uneven(IterableDataset):
    """Rank r of `len(sizes)` streams `sizes[r]` ids of its own (rank 0 the first sizes[0], ...), so the
    ranks' streams end at different steps. In one process it streams the same windows as the ranks
    together: each rank's next `window` ids in rank order (a window of the sizes' run holds `window`
    of each rank's), so every step holds the same samples."""

    def __init__(self, sizes: list[int], window: int) -> None:
        self.sizes, self.window = list(sizes), window

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        starts = [sum(self.sizes[:r]) for r in range(len(self.sizes))]
        streams = [list(range(s, s + n)) for s, n in zip(starts, self.sizes, strict=True)]
        rank, world = rank_and_world()
        if world > 1:
            ids = streams[rank]
        else:
            w = self.window
            ids = [i for j in range(0, max(self.sizes), w) for stream in streams for i in stream[j : j + w]]
        return iter([sample(i) for i in ids])


#: The step the next training forward belongs to (StepMarker keeps it).
STEP = [0]


class StepMarker:
    """A callback: the step LoggedRegressor's forwards belong to."""

    def on_fit_start(self, run: Any) -> None:
        STEP[0] = run.step + 1

    def on_step_end(self, run: Any) -> None:
        STEP[0] = run.step + 1


class LoggedRegressor(Regressor):
    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and index is not None and "ORDER_LOG" in os.environ:
            log_dir = Path(os.environ["ORDER_LOG"])
            log_dir.mkdir(parents=True, exist_ok=True)
            with open(log_dir / f"rank{os.environ.get('RANK', '0')}.txt", "a") as f:
                f.write(f"{STEP[0]} {' '.join(map(str, index.tolist()))}\n")
        return super().forward(x, y)


def steps_consumed(log_dir: Path, up_to: int | None = None) -> dict[int, list[int]]:
    """step -> the sorted ids its forwards read on all ranks, fillers (a repeat of the line before on
    that rank) dropped; only steps up to `up_to` (a killed life ran forwards of a step it never took)."""
    steps: dict[int, list[int]] = {}
    for path in log_dir.glob("rank*.txt"):
        previous = None
        for line in path.read_text().splitlines():
            step, *ids = line.split()
            if ids == previous:
                continue
            previous = ids
            if up_to is None or int(step) <= up_to:
                steps.setdefault(int(step), []).extend(map(int, ids))
    return {s: sorted(ids) for s, ids in sorted(steps.items())}
