"""A user's own IterableDataset as the Trainer's data: each rank's stream of micro-batches, the ranks'
agreement on every window's size, and the stream's place in a snapshot.

The dataset yields THIS rank's samples: it splits its stream by `torch.distributed.get_rank()` and
`get_world_size()`, and by loader worker (`torch.utils.data.get_worker_info()`), as in plain torch;
disttrain never splits it. The batches come through torchdata's StatefulDataLoader, so a stateful
dataset's state (`state_dict()` / `load_state_dict()`, torchdata's convention) is kept per loader
worker too, and a snapshot holds each rank's loader state (docs/data.md, "Your own IterableDataset").
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sized
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset

from disttrain.config import ConfigError
from disttrain.data import WorkerLoader, worker_loader
from disttrain.dist import DistEnv
from disttrain.step import num_samples

# (data.py has imported torchdata with its import-time warning silenced)
from torchdata.stateful_dataloader import Stateful  # isort: skip

log = logging.getLogger("disttrain")


class _NoFastForwardNotice(logging.Filter):
    """torchdata announces the skip-ahead of a dataset without state in three lines; the resume says it
    in one (StreamLoader.resume)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Neither dataset nor iter(dataset)")


logging.getLogger("torchdata.stateful_dataloader.stateful_dataloader").addFilter(_NoFastForwardNotice())


def is_stream(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset)


def can_reshard(dataset: Any) -> bool:
    """The dataset declares that it continues an epoch from a global position on any number of processes
    and workers: `load_global_position(epoch, samples)`, the epoch's first `samples` samples on all
    ranks together consumed (MosaicML streaming's kind of state: a global count)."""
    return callable(getattr(dataset, "load_global_position", None))


def stream_loader(
    dataset: IterableDataset,
    batch_size: int,
    num_workers: int,
    pin: bool,
    collate_fn: Callable[[list[Any]], Any],
) -> WorkerLoader:
    """torchdata's StatefulDataLoader over a stream. snapshot_every_n_steps=1 (its default): every batch
    carries its worker's state, so the state at a step boundary is that of exactly the batches the steps
    consumed, however far the workers read ahead."""
    return worker_loader(dataset, None, batch_size, num_workers, pin, collate_fn)


class Window(NamedTuple):
    """An accumulation window as this rank pulled it, and what the ranks agreed about it."""

    #: This rank's micro-batches (fewer than trainer.accumulate, or none, where its stream ended).
    batches: list[Any]
    #: Samples of the window on all ranks; 0 ends the epoch without a step.
    size: int
    #: Micro-batches every rank runs: the most any rank holds (the others add zero-weighted fillers).
    micro: int
    #: Every rank's stream has ended: the epoch's last window.
    last: bool


class StreamLoader:
    """The batches of one rank's IterableDataset, pulled a window at a time, with the ranks' agreement on
    the window's size (one all-reduce a step: the streams may end at different counts), and the loader
    state a snapshot keeps and a resume restores (`state_dict`, `resume`)."""

    def __init__(
        self,
        dataset: IterableDataset,
        env: DistEnv,
        accumulate: int,
        batch_size: int,
        num_workers: int,
        pin: bool,
        collate_fn: Callable[[list[Any]], Any],
        drop_last: bool = False,
    ) -> None:
        self.dataset, self.env, self.accumulate = dataset, env, accumulate
        self.num_workers, self.drop_last = num_workers, drop_last
        self.global_batch = env.world_size * batch_size * accumulate
        self.loader = stream_loader(dataset, batch_size, num_workers, pin, collate_fn)
        self.epoch = -1
        self.ended = True
        self._batches: Iterator[Any] = iter(())
        self._global_position: tuple[int, int] | None = None  # for load_global_position at epoch start

    @property
    def name(self) -> str:
        return type(self.dataset).__name__

    def steps_per_epoch(self) -> int:
        """Optimizer steps of an epoch from the dataset's len() (this rank's samples, as torch's
        DataLoader reads it), agreed by the ranks (the longest stream ends the epoch); 0 without len()."""
        if not isinstance(self.dataset, Sized):
            return 0
        per_rank = self.global_batch // self.env.world_size
        steps = torch.tensor([math.ceil(len(self.dataset) / per_rank)], device=self.env.device)
        if self.env.world_size > 1:
            dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        return int(steps.item())

    def start_epoch(self, epoch: int, seed: int) -> None:
        """A new iterator for `epoch`: `set_epoch(epoch)` first where the dataset has it (before the
        workers copy it), then a resumed position; workers seeded from (seed) like the map-style path."""
        if callable(set_epoch := getattr(self.dataset, "set_epoch", None)):
            set_epoch(epoch)
        if self._global_position is not None:
            self.dataset.load_global_position(*self._global_position)  # type: ignore[attr-defined]
            self._global_position = None
        self.loader.generator = torch.Generator().manual_seed(seed)
        self._batches = iter(self.loader)
        self.epoch, self.ended = epoch, False

    def pull(self) -> Window:
        """Up to trainer.accumulate micro-batches of this rank's stream, and the window's size on all
        ranks. A window of no sample on any rank ends the epoch; with trainer.drop_last so does the
        first one short of a whole global batch (the streams' tails are left unread)."""
        batches: list[Any] = []
        if not self.ended:
            batches = list(itertools.islice(self._batches, self.accumulate))
            self.ended = len(batches) < self.accumulate
        samples = sum(map(num_samples, batches))
        micro, more, size = len(batches), not self.ended, samples
        if self.env.world_size > 1:
            # MAX over [micro-batches, a stream goes on, each rank's samples in its own slot]: one call.
            agreed = torch.zeros(2 + self.env.world_size, dtype=torch.int64, device=self.env.device)
            agreed[0], agreed[1], agreed[2 + self.env.rank] = micro, int(more), samples
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            values = agreed.tolist()
            micro, more, size = values[0], bool(values[1]), sum(values[2:])
        if size == 0 or (self.drop_last and size < self.global_batch):
            return Window([], 0, 0, True)
        return Window(batches, size, micro, not more)

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of a snapshot: the loader's state (its workers' dataset states among it), a
        copy, since the snapshot is written while training goes on."""
        return {
            "epoch": self.epoch,
            "world_size": self.env.world_size,
            "num_workers": self.num_workers,
            "loader": copy.deepcopy(self.loader.state_dict()),
        }

    def resume(
        self, saved: dict[str, Any] | None, epoch: int, position: int, written_by: int, workers: int
    ) -> None:
        """Continue epoch `epoch` after its first `position` samples on all ranks (nothing to do at an
        epoch's start), from this rank's `saved` state of a snapshot written by `written_by` processes
        with `workers` loader workers each (None when another number of processes wrote it):
        - the same shape and a stateful dataset: the loader state, exactly;
        - `load_global_position` (can_reshard): the global position, on any shape;
        - the same shape and a dataset without state: torchdata re-reads the batches consumed and skips
          them (a warning says how many samples);
        - otherwise refused in one line (ConfigError), naming what to do."""
        if position == 0:
            return
        same_shape = (written_by, workers) == (self.env.world_size, self.num_workers)
        stateful = isinstance(self.dataset, Stateful)
        if same_shape and stateful and saved is not None and saved["epoch"] == epoch:
            self.loader.load_state_dict(saved["loader"])
        elif can_reshard(self.dataset):
            self._global_position = (epoch, position)
        elif same_shape and not stateful and saved is not None and saved["epoch"] == epoch:
            self.loader.load_state_dict(saved["loader"])
            if self.env.is_main:
                log.warning(
                    "data: %s has no state_dict(): the resume re-reads and skips the %d samples of epoch %d "
                    "trained on so far (give it state_dict() and load_state_dict() to resume without them)",
                    self.name,
                    position,
                    epoch,
                )
        elif same_shape:  # (a snapshot written before streams kept their state: it cannot say where)
            raise ConfigError(
                f"data: the snapshot holds no loader state of rank {self.env.rank} for {self.name} in epoch "
                f"{epoch}, so the stream cannot continue mid-epoch; start a new run_dir"
            )
        else:
            check_reshard(self.dataset, (written_by, workers), (self.env.world_size, self.num_workers))


def check_reshard(dataset: Any, then: tuple[int, int], now: tuple[int, int]) -> None:
    """A stream resumed mid-epoch on another shape, (processes, loader workers) `then` -> `now`, is
    refused in one line (ConfigError) unless it can reshard (load_global_position)."""
    if then == now or can_reshard(dataset):
        return
    name, stateful = type(dataset).__name__, isinstance(dataset, Stateful)
    kind = "a stateful" if stateful else "an"
    hold = "its state is per rank and worker" if stateful else "its position cannot be re-read there"
    was = shape(*then)
    raise ConfigError(
        f"data: {name} is {kind} IterableDataset resumed mid-epoch from {was} on {shape(*now)}, and "
        f"{hold}; resume on {was} (trainer.num_workers={then[1]}), or give {name} "
        "load_global_position(epoch, samples) to continue on any shape"
    )


def shape(world_size: int, workers: int) -> str:
    processes = f"{world_size} process{'es' if world_size != 1 else ''}"
    return f"{processes} × {workers} loader worker{'s' if workers != 1 else ''}"


def first_batch(loader: Any) -> Any:
    """A batch for a rank that holds none of a window and has seen none yet (resumed where its stream had
    ended, or a validation stream that ended before the others'): the first of a copy of its stream (the
    copy leaves the stream's own position alone), run weighted by zero."""
    samples = list(itertools.islice(iter(copy.deepcopy(loader.dataset)), loader.batch_size))
    if not samples:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise ConfigError(
            f"data: {type(loader.dataset).__name__} yields no sample on rank {rank}, which then has no "
            "batch to run while the other ranks do; give every rank's stream a sample"
        )
    return loader.collate_fn(samples)


def val_batches(loader: Any, env: DistEnv) -> Iterator[tuple[Any, int]]:
    """A validation stream's batches with their real samples: each rank its own stream; on more than one
    process the ranks agree at every batch whether any still has one (one all-reduce a batch), and a
    rank whose stream ended runs its last batch again (or first_batch) weighted by zero, so that FSDP's
    gathers meet on every rank."""
    batches, last = iter(loader), None
    while True:
        batch = next(batches, None)
        if env.world_size > 1:
            anyone = torch.tensor([int(batch is not None)], device=env.device)
            dist.all_reduce(anyone, op=dist.ReduceOp.MAX)
            if not anyone.item():
                return
        elif batch is None:
            return
        if batch is None:
            yield (last if last is not None else first_batch(loader)), 0
        else:
            last = batch
            yield batch, num_samples(batch)
