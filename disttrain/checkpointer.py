"""The run's durable state and its way into and out of snapshots (disttrain.snapshot writes the files).

A snapshot holds the model and the optimizer (rank 0's full state, or every rank's shards under FSDP),
the run's state (RunState: counters, schedule, loss scale, the callbacks' state) and each rank's RNG.
The data position is in the counters (samples of the epoch consumed on all ranks), so a snapshot resumes
on any number of processes.
"""

from __future__ import annotations

import functools
import itertools
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from disttrain.callbacks import Callbacks, set_path
from disttrain.config import TrainConfig, resume_mismatch, to_dict
from disttrain.dist import DistEnv
from disttrain.precision import Precision
from disttrain.run_state import Counters, derived_seed, rng_state, seed_everything, set_rng_state
from disttrain.snapshot import DCP_DIR, Snapshot, SnapshotError, SnapshotStore
from disttrain.strategy import FSDPStrategy, Strategy
from disttrain.streams import StreamLoader

log = logging.getLogger("disttrain")


def class_name(obj: Any) -> str:
    """`torch.optim.adamw.AdamW`: the class an object is, as its module names it."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class RunState:
    """Where the run stands besides its weights, as one state_dict: the counters, the learning rate
    schedule, the loss scale and every callback's state (without the DTensors a callback holds under
    FSDP, which go with the model's shards: Callbacks.split_state)."""

    def __init__(self, counters: Counters, scheduler: Any, precision: Precision, callbacks: Callbacks):
        self.counters, self.scheduler = counters, scheduler
        self.precision, self.callbacks = precision, callbacks

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the state, {sharded key: DTensor} of the callbacks' shards)."""
        callback_state, callback_shards = self.callbacks.split_state()
        state = {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.state_dict(),
            "counters": self.counters.state_dict(),
            "callbacks": callback_state,
        }
        return state, callback_shards

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Everything but the callbacks, whose state may need its shards first (Checkpointer.load)."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["scaler"])
        self.counters.load_state_dict(state["counters"])


class Checkpointer:
    """Saves the run into the run dir's snapshots and loads the newest good one back, resharded to this
    job. `step` is the step of the newest snapshot saved or loaded (the same on every rank)."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        strategy: Strategy,
        model: nn.Module,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: RunState,
        stream: StreamLoader | None = None,
    ) -> None:
        """`model` is the module as the strategy runs it, `module` the user's (a plain snapshot's);
        `stream` a user's IterableDataset, whose loader state is each rank's (disttrain.streams)."""
        self.cfg, self.env, self.strategy, self.stream = cfg, env, strategy, stream
        self.model, self.module, self.optimizer, self.state = model, module, optimizer, state
        self.snapshots = SnapshotStore(Path(cfg.run_dir), env, cfg.snapshot.keep_last)
        self.step: int | None = None
        self._rng: dict[str, Any] | None = None  # the loaded RNG state, applied when the epoch starts

    def nonfinite_state(self) -> str | None:
        """The name of the first parameter or floating-point buffer (BatchNorm's running statistics, which
        every forward moves, skipped steps' too) holding a NaN or an infinity, else None; the same answer
        on every rank: the ranks agree (sharded parameters are each rank's own shards, and BatchNorm's
        statistics move with each rank's own batches), or one rank would snapshot alone and wait forever."""
        names, flags = [], []
        tensors = itertools.chain(self.module.named_parameters(), self.module.named_buffers())
        for name, t in tensors:
            if not t.is_floating_point():
                continue
            local = t.to_local() if hasattr(t, "to_local") else t
            names.append(name)
            flags.append(torch.isfinite(local.detach()).all())
        if not flags:
            return None
        finite = torch.stack(flags).to(torch.int32)
        if self.env.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        bad = (finite == 0).nonzero()
        return names[int(bad[0])] if len(bad) else None

    def save(self) -> None:
        """A snapshot of this step: rank 0 commits it on its own thread while training goes on."""
        c = self.state.counters
        shared, callback_shards = self.state.state_dict()
        write_sharded = None
        if self.strategy.shards_parameters:  # every rank writes its shards of the model and optimizer
            write_sharded = functools.partial(self._write_shards, extra=callback_shards)
        elif self.env.is_main:
            shared |= {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        # The snapshot writes `own` after this returns, while training goes on: nothing in it may be
        # an object training changes (rng_state() is new).
        own = {"rng": rng_state()}
        if self.stream is not None:
            own["stream"] = self.stream.state_dict()
        meta = {"epoch": c.epoch, "config": to_dict(self.cfg), "optimizer": class_name(self.optimizer)}
        meta["samples_in_epoch"] = c.samples_in_epoch  # (a stream's resume is checked before a job starts)
        self.snapshots.save(c.step, shared if self.env.is_main else {}, own, meta, write_sharded)
        self.step = c.step

    def load(self) -> Snapshot | None:
        """The newest good snapshot, loaded into the model, the optimizer and the run's state; None if
        the run dir has none. A snapshot this job cannot continue is refused in one line."""
        snap = self.snapshots.find_latest()
        if snap is None:
            return None
        mismatch = resume_mismatch(snap.manifest, self.cfg, self.env.world_size)
        if mismatch:
            raise SnapshotError(f"cannot resume from {snap.path}: {mismatch}")
        # A Trainer built in Python may get another optimizer than the config says (cfg.optim.name is
        # only the config's): its state would load into the wrong slots, or fail at the first step.
        saved_optimizer, mine = snap.manifest.get("optimizer"), class_name(self.optimizer)
        if saved_optimizer is not None and saved_optimizer != mine:
            raise SnapshotError(
                f"cannot resume from {snap.path}: the optimizer differs: the snapshot was written with "
                f"{saved_optimizer} and this Trainer has {mine}; resume with {saved_optimizer}, or start a "
                "new run_dir"
            )
        shared = snap.load_shared()
        self._load_model_and_optimizer(snap, shared)
        self.state.load_state_dict(shared)
        self.state.callbacks.load_state_dict(self._callback_state(snap, shared.get("callbacks", {})))
        self.step = snap.step
        counters, written_by = self.state.counters, snap.world_size
        if "samples_in_epoch" not in shared["counters"]:  # a snapshot from before the global position
            batch = snap.manifest["config"]["trainer"]["batch_size"]
            counters.samples_in_epoch = shared["counters"]["batches_in_epoch"] * written_by * batch
        own = snap.load_rank(self.env.rank) if written_by == self.env.world_size else {}
        if self.stream is not None:  # (mid-epoch: restored, continued from the position, or refused)
            workers = snap.manifest["config"]["trainer"].get("num_workers", 0)
            position = (own.get("stream"), counters.epoch, counters.samples_in_epoch)
            self.stream.resume(*position, written_by, workers)
        if written_by == self.env.world_size:
            self._rng = own["rng"]
        else:
            # A rank's RNG belongs to the world size that wrote it: each rank now draws from a stream
            # derived from (seed, step, rank), the same every time this resume runs.
            seed_everything(derived_seed(self.cfg.trainer.seed, counters.step, self.env.rank))
        if self.env.is_main:
            world = self.env.world_size
            moved = f", {written_by} -> {world} processes" if written_by != world else ""
            log.info("resumed from %s (epoch %d, step %d%s)", snap.path, counters.epoch, counters.step, moved)
        return snap

    def restore_rng(self) -> None:
        """The loaded snapshot's RNG state, once: at the start of the epoch it resumes in (after the
        loader and the sampler are set up for it, which draw nothing from it)."""
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None

    def _callback_state(self, snap: Snapshot, state: dict[str, Any]) -> dict[str, Any]:
        """The callbacks' saved state, with the tensors a sharded snapshot holds for them loaded into
        the ones their state_dict() has now (resharded to this job, DTensor or not)."""
        if not snap.sharded:
            return state
        from disttrain import sharded

        templates = self.state.callbacks.tensor_templates()
        try:
            loaded = sharded.load_tensors({k: t for k, (_, _, t) in templates.items()}, snap.path / DCP_DIR)
        except sharded.ShardedStateError as e:
            raise SnapshotError(f"cannot resume from {snap.path}: a callback's state differs: {e}") from None
        for key, tensor in loaded.items():
            name, path, _ = templates[key]
            set_path(state.setdefault(name, {}), path, tensor)
        return state

    def _write_shards(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        assert isinstance(self.strategy, FSDPStrategy)  # the one strategy that shards parameters
        from disttrain import sharded  # DCP's import is a large share of a worker's start: FSDP jobs only

        self.strategy.sync_buffers()  # rank 0's buffers, as every rank's next synchronised forward has
        sharded.save(self.model, self.optimizer, path, extra)

    def _load_model_and_optimizer(self, snap: Snapshot, shared: dict[str, Any]) -> None:
        """A sharded snapshot (FSDP's) loads through DCP into any strategy, resharded to this job; a
        plain one (single/DDP/DP) loads as is, or into FSDP from rank 0's full state."""
        from disttrain import sharded

        differs = f"cannot resume from {snap.path}"
        if snap.sharded:
            try:
                sharded.load(self.module, self.optimizer, snap.path / DCP_DIR)
            except sharded.ShardedStateError as e:
                raise SnapshotError(f"{differs}: the model differs: {e}") from None
            return
        if self.strategy.shards_parameters:
            full_state = shared if self.env.is_main else None
            sharded.load_full(self.model, self.optimizer, full_state, self._optimizer_names())
            return
        try:
            self.module.load_state_dict(shared["model"])
        except RuntimeError as e:
            detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
            raise SnapshotError(f"{differs}: the model differs: {detail}") from None
        try:
            self.optimizer.load_state_dict(shared["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:  # parameter groups of another shape
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SnapshotError(f"{differs}: the optimizer differs: {detail}") from None

    def _optimizer_names(self) -> list[str]:
        """The optimizer's parameters' names, in its param_groups order (what its integer keys mean)."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
