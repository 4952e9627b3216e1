"""The Trainer: one readable training step, a life of small named methods, and exact resume.

    trainer = Trainer(model, optimizer, dataset, cfg)   # cfg: disttrain.config.TrainConfig
    summary = trainer.fit()

Launch the same script with `python train.py` (one process), `torchrun --nproc-per-node=2 train.py`
(DDP over gloo on CPU, nccl on GPUs) or `srun python train.py`; the Trainer reads its place in the job
from the environment.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from disttrain import runlock
from disttrain.config import ConfigError, OptimConfig, TrainConfig, resolve_strategy, to_dict
from disttrain.data import make_loader, split
from disttrain.dist import DistEnv, setup_distributed, teardown
from disttrain.health import GradHealth, Verdict, grad_flow, halve_lr
from disttrain.metrics import MetricsLog, params_sha256, peak_samples_per_s, read_metrics, write_summary
from disttrain.progress import Progress, WandbRun
from disttrain.snapshot import RunFileError, Snapshot, SnapshotError, SnapshotStore, step_dir_name
from disttrain.strategy import make_strategy

log = logging.getLogger("disttrain")
# The schedule advances with every optimizer step, applied or skipped (non-finite gradients): torch
# warns once when the first step is skipped, which fp16 does by design.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[..., torch.Tensor]

#: Seconds of training between two agreements of the ranks on a stop signal (_stop_requested_anywhere).
STOP_CHECK_SECONDS = 0.1

#: Config keys a resumed run must share with the run that wrote the snapshot: change any of them and
#: the snapshot no longer describes this run (shapes, data order, or the meaning of a step differ).
RESUME_KEYS = (
    "model",
    "data",
    "trainer.batch_size",
    "trainer.accumulate",
    "trainer.seed",
    "trainer.val_fraction",
    "trainer.precision",
    "trainer.loss",
    "optim.name",
)


def cross_entropy(out: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, -2).float(), target.flatten(), reduction=reduction)


def mse(out: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.mse_loss(out.float(), target, reduction=reduction)


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse}


def make_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def make_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_name(obj: Any) -> str:
    """`torch.optim.adamw.AdamW`: the class an object is, as its module names it."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def get_config_value(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def resume_mismatch(saved: dict[str, Any], cfg: TrainConfig, world_size: int) -> str | None:
    """One line naming what differs between a snapshot's manifest and this run, or None."""
    if saved.get("world_size") != world_size:
        return (
            f"the snapshot was written by {saved.get('world_size')} processes and this job has {world_size}: "
            f"resume with {saved.get('world_size')} processes, or start a new run_dir"
        )
    now = to_dict(cfg)
    for key in RESUME_KEYS:
        before, after = get_config_value(saved.get("config", {}), key), get_config_value(now, key)
        if isinstance(before, dict) and isinstance(after, dict):
            for sub in sorted(set(before) | set(after)):
                if before.get(sub) != after.get(sub):
                    key, before, after = f"{key}.{sub}", before.get(sub), after.get(sub)
                    break
        if before != after:
            return f"{key} was {before!r} when the snapshot was written and is {after!r} now"
    return None


@dataclass
class Counters:
    """Where the run is. Everything here goes into a snapshot."""

    epoch: int = 0
    step: int = 0
    #: Micro-batches of the current epoch already consumed (a multiple of `accumulate` mid-epoch).
    batches_in_epoch: int = 0
    last_loss: float = math.nan
    last_val_loss: float = math.nan
    best_val_loss: float = math.inf
    #: Validations in a row without improvement (early stopping).
    bad_validations: int = 0
    #: Optimizer steps not taken: non-finite gradients, or explosions under health.on_explosion=skip.
    skipped_steps: int = 0
    #: Steps whose gradient norm exceeded health.explosion_factor × trainer.grad_clip_norm, and how many
    #: of the latest came in a row (health.on_explosion=halve_lr acts when it reaches health.patience).
    explosions: int = 0
    explosion_streak: int = 0
    #: Times health.on_explosion=halve_lr halved the learning rate.
    lr_halvings: int = 0
    #: The wandb run this run logs to (rank 0's; "" without logger=wandb): a resumed job continues it.
    wandb_run_id: str = ""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain data (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StepResult(NamedTuple):
    loss: float
    grad_norm: float
    verdict: Verdict
    #: Per-module gradient norms on the steps health.grad_flow_every asks for, else None.
    grad_flow: dict[str, float] | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    cfg: TrainConfig
    env: DistEnv
    run_dir: Path
    model: nn.Module  # as wrapped by the strategy; `self.module` is the user's model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: LossFn
    counters: Counters
    snapshots: SnapshotStore
    metrics: MetricsLog

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        cfg: TrainConfig | None = None,
        *,
        val_dataset: Dataset | None = None,
        loss_fn: LossFn | None = None,
        scheduler: Any = None,
        env: DistEnv | None = None,
    ) -> None:
        self.cfg = cfg = cfg or TrainConfig()
        t = cfg.trainer
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self._owns_process_group = env is None and not dist.is_initialized()
        self.env = env or setup_distributed(t.device, t.timeout_s)
        self.run_dir = Path(cfg.run_dir)
        self.strategy = make_strategy(resolve_strategy(cfg, self.env.world_size), self.env, cfg.strategy)
        self.model = self.strategy.wrap(model.to(self.env.device))
        self.module = self.strategy.unwrap(self.model)  # what snapshots save and hashes cover
        self.optimizer = optimizer
        self.loss_fn = (
            loss_fn or LOSSES[t.loss if t.loss != "auto" else getattr(dataset, "loss", "cross_entropy")]
        )
        # Token datasets declare a vocabulary; read before split() wraps the dataset in a Subset.
        self.counts_tokens = hasattr(dataset, "vocab_size")
        if val_dataset is None and t.val_fraction:
            dataset, val_dataset = split(dataset, t.val_fraction)
        pin = self.env.device.type == "cuda"
        self.sampler = self.strategy.sampler(dataset, shuffle=True, seed=t.seed)
        self.loader = make_loader(dataset, self.sampler, t.batch_size, t.num_workers, pin)
        self.val_loader = None
        if val_dataset is not None:
            val_sampler = self.strategy.sampler(val_dataset, shuffle=False, seed=t.seed)
            self.val_loader = make_loader(val_dataset, val_sampler, t.batch_size, t.num_workers, pin)
        self.steps_per_epoch = math.ceil(len(self.loader) / t.accumulate)
        total_steps = t.max_epochs * self.steps_per_epoch
        self.total_steps = min(total_steps, t.max_steps) if t.max_steps else total_steps
        self.scheduler = scheduler or make_scheduler(cfg.optim, optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=t.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        self.counters = Counters()
        self.snapshots = SnapshotStore(self.run_dir, self.env, cfg.snapshot.keep_last)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.env.is_main)
        self.health = GradHealth(cfg.health, t.grad_clip_norm, t.precision, announce=self.env.is_main)
        self.peak_samples_per_s = peak_samples_per_s(
            self.module, self.env.device, t.precision, t.peak_tflops, self.env.world_size
        )
        self.progress: Progress | None = None  # rank 0's bar or lines, from fit() on
        self.wandb: WandbRun | None = None  # rank 0's, with logger=wandb
        self._pending: dict[str, Any] = {}  # loader and RNG state from a snapshot, applied at epoch start
        self._stop_signal = 0
        # The ranks' agreement on stopping, see _stop_requested_anywhere: the all-reduce in flight and
        # its tensor, the step at which the next one starts, and (step, time) when the last one started.
        self._stop_flag = torch.zeros(2)
        self._stop_work: Any = None
        self._stop_next_step = 0
        self._stop_started_at: tuple[int, float] | None = None
        self._stop_reason = ""
        self._snapshot_step: int | None = None  # of the newest snapshot saved or loaded, on every rank
        seed_everything(t.seed + self.env.rank)

    # -- the run ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until max_epochs, max_steps, early stopping or a stop signal; return the summary.

        The run dir is this job's while fit() runs (runlock): rank 0 takes its lock unless this process
        or its launcher holds it already; another job on it is refused in one line on every rank."""
        clean = False
        release = lambda: None  # noqa: E731
        try:
            release = self._hold_run_dir()
            self._load_snapshot()
            self.metrics.open(resume_step=self.counters.step)
            try:
                summary = self._train()
            except RunFileError as e:  # metrics.jsonl or summary.json: say what is left to resume from
                raise RunFileError(f"{e}; {self.snapshots.newest_good()}") from None
            clean = True
            return summary
        finally:
            if clean and self._stop_work is not None:  # every rank has one in flight: finish it first
                self._stop_work.wait()
            self._stop_work = None
            self._close_reporting(clean)
            with contextlib.suppress(RunFileError):  # closed already unless an error is on its way out
                self.metrics.close()
            self.snapshots.settle()  # what this run leaves is final before the run dir is let go
            release()
            if self._owns_process_group:
                # The group goes now, and so must the DDP wrapper, whose reducer holds it: a gloo group
                # still alive at interpreter exit can abort the process (dist.teardown).
                self.model = self.module
                teardown(clean)

    def _train(self) -> dict[str, Any]:
        self._open_reporting()
        start = time.perf_counter()
        while not self._should_stop():
            self._run_epoch()
        if self._stop_reason.startswith("stopped by signal") and self._snapshot_step != self.counters.step:
            self._save_snapshot()  # stopped before its first step: a stop promises a snapshot of its step
        # Rank 0 commits the last snapshot on its own thread: wait for it (a failure stops the run in one
        # line) before the summary says the run is done, and before a SLURM requeue ends the job.
        self.snapshots.wait()
        self.metrics.close()
        return self._summary(time.perf_counter() - start)

    def _hold_run_dir(self) -> Any:
        """Rank 0 takes the run dir's lock; every rank hears whether it could (a refused rank 0 alone
        would leave the others waiting in their first collective)."""
        failure: tuple[bool, str] | None = None
        release: Any = lambda: None  # noqa: E731
        if self.env.is_main:
            try:
                release = runlock.acquire(self.cfg.run_dir)
            except (ConfigError, SnapshotError) as e:
                failure = (isinstance(e, ConfigError), str(e))
        if dist.is_initialized() and self.env.world_size > 1:
            box = [failure]
            dist.broadcast_object_list(box, src=0)
            failure = box[0]
        if failure is not None:
            raise (ConfigError if failure[0] else SnapshotError)(failure[1])
        return release

    def request_stop(self, signum: int = signal.SIGTERM, *_: Any) -> None:
        """Signal-handler safe: only sets a flag; the run stops and snapshots at the next step boundary.
        The first signal names the stop; later ones change nothing."""
        self._stop_signal = self._stop_signal or signum

    def _should_stop(self) -> bool:
        t, c = self.cfg.trainer, self.counters
        if self._stop_reason:
            return True
        if self._stop_requested_anywhere():
            self._stop_reason = (
                f"stopped by signal {signal.Signals(self._stop_signal or signal.SIGTERM).name}"
            )
        elif t.max_steps and c.step >= t.max_steps:
            self._stop_reason = "max_steps"
        elif c.epoch >= t.max_epochs:
            self._stop_reason = "max_epochs"
        elif t.early_stop_patience and c.bad_validations >= t.early_stop_patience:
            self._stop_reason = "early_stop"
        return bool(self._stop_reason)

    def _stop_requested_anywhere(self) -> bool:
        """A signal reaches the ranks at different steps (or one rank only: SLURM signals a step, torchrun
        its group), yet every rank must stop at the same step. So the ranks agree with an all-reduce
        (MAX) of [signal, steps until the next one], started at a step boundary and read one step
        later while it ran in the background. Each rank proposes as many steps as take
        STOP_CHECK_SECONDS: the all-reduce runs ten times a second whatever the step time (one every
        step cost 0.1-0.7 ms a step on gloo, 2-6% of a small DDP step; ten a second cost ~0.15%), every
        rank reads the same result at the same step, and they stop together at most STOP_CHECK_SECONDS
        and two steps after the signal."""
        if self.env.world_size == 1:
            return bool(self._stop_signal)
        step = self.counters.step
        if self._stop_work is not None and self._stop_started_at is not None:  # one started, with its step
            self._stop_work.wait()
            signum, interval = (int(v) for v in self._stop_flag.tolist())
            self._stop_work = None
            if signum:
                self._stop_signal = signum
                return True
            self._stop_next_step = self._stop_started_at[0] + interval
        if step >= self._stop_next_step:
            now, proposal = time.perf_counter(), 1
            if self._stop_started_at is not None:
                last_step, last_time = self._stop_started_at
                proposal = max(1, int(STOP_CHECK_SECONDS * (step - last_step) / (now - last_time)))
            self._stop_started_at = (step, now)
            self._stop_flag = torch.tensor([self._stop_signal, proposal], device=self.env.device)
            self._stop_work = dist.all_reduce(self._stop_flag, op=dist.ReduceOp.MAX, async_op=True)
        return False

    def _run_epoch(self) -> None:
        c, k = self.counters, self.cfg.trainer.accumulate
        # Before the iterator exists: with workers, a late set_epoch would replay the previous order.
        self.sampler.set_epoch(c.epoch)
        if "loader" in self._pending:
            self.loader.load_state_dict(self._pending.pop("loader"))
        batches = iter(self.loader)
        if "rng" in self._pending:  # after iter(), which draws a worker seed from the global RNG
            set_rng_state(self._pending.pop("rng"))
        n = len(self.loader)
        epoch_loss, epoch_steps, epoch_start = 0.0, 0, time.perf_counter()
        while c.batches_in_epoch < n:
            tick = time.perf_counter()
            window = [next(batches) for _ in range(min(k, n - c.batches_in_epoch))]
            data_time = time.perf_counter() - tick
            result = self._run_batch(window)
            c.step += 1
            c.batches_in_epoch += len(window)
            c.last_loss = result.loss
            epoch_loss, epoch_steps = epoch_loss + result.loss, epoch_steps + 1
            self._log_step(window, result, data_time, time.perf_counter() - tick)
            epoch_done = c.batches_in_epoch == n
            if epoch_done:
                # Let the loader see the end of the epoch, else its next iterator continues this one.
                next(batches, None)
                c.epoch, c.batches_in_epoch = c.epoch + 1, 0
            val_every = self.cfg.trainer.val_every_steps
            if epoch_done or (val_every and c.step % val_every == 0):
                self._validate()
            every = self.cfg.snapshot.every_steps
            stopping = self._should_stop()
            if epoch_done or stopping or (every and c.step % every == 0):
                self._save_snapshot()
            if epoch_done:
                self._print_epoch(epoch_loss / epoch_steps, time.perf_counter() - epoch_start, epoch_steps)
            if stopping or epoch_done:
                return

    def _run_batch(self, window: list[Batch]) -> StepResult:
        """One optimizer step over an accumulation window of micro-batches. Each micro-batch's mean loss is
        weighted by its share of the window's samples, so the gradient equals that of one batch of the
        whole window, also when the window or its last micro-batch is cut short by the end of an epoch."""
        total = sum(len(y) for _, y in window)
        losses = []
        for i, (x, y) in enumerate(window):
            x = x.to(self.env.device, non_blocking=True)
            y = y.to(self.env.device, non_blocking=True)
            final = i == len(window) - 1
            # Forward too must run inside no_sync: DDP decides in forward whether backward all-reduces.
            with contextlib.nullcontext() if final else self.strategy.no_sync(self.model):
                with self._autocast():
                    loss = self.loss_fn(self.model(x), y)
                # The window's mean loss: each micro-batch weighted by its share of the samples (no
                # multiply when it is the whole window: a graph op, 12 us of a small model's step).
                weight = len(y) / total
                self.scaler.scale(loss * weight if weight != 1 else loss).backward()
            losses.append(loss.detach())
        self.scaler.unscale_(self.optimizer)  # clip in real units, not scaled ones
        flow = self._grad_flow()  # per-module norms, every health.grad_flow_every steps
        grad_norm = self._clip_gradients()
        # One transfer to the host for every number the step reports (on CUDA, the step's one sync).
        *micro_losses, norm_value = torch.stack([*losses, grad_norm.float()]).tolist()
        loss_value = sum(v * len(y) for v, (_, y) in zip(micro_losses, window, strict=True)) / total
        # Gradients are identical on every rank after the all-reduce, so every rank decides alike:
        # non-finite gradients, and explosions under health.on_explosion=skip, skip the step.
        verdict = self.health.judge(norm_value, self.counters, step=self.counters.step + 1)
        if verdict.apply:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if verdict.halve_lr:
            halve_lr(self.optimizer, self.scheduler)
        self.scheduler.step()
        return StepResult(loss_value, norm_value, verdict, flow)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16/fp16 autocast on the job's device; for fp32 none (a disabled autocast costs 5 us a step)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _grad_flow(self) -> dict[str, float] | None:
        every = self.cfg.health.grad_flow_every
        if not (every and self.env.is_main and (self.counters.step + 1) % every == 0):
            return None
        return grad_flow(self.module)

    def _clip_gradients(self) -> torch.Tensor:
        """The global gradient norm before clipping (what clip_grad_norm_ returns)."""
        if self.cfg.trainer.grad_clip_norm:
            return nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.trainer.grad_clip_norm)
        return nn.utils.get_total_norm([p.grad for p in self.module.parameters() if p.grad is not None])

    @torch.no_grad()
    def _validate(self) -> None:
        """Mean loss over the held-out split on all ranks. DistributedSampler pads the last shard with
        repeated samples; those positions (global index >= the split's length) are not counted."""
        if self.val_loader is None:
            return
        c, world = self.counters, self.env.world_size
        n_real = len(self.val_loader.dataset)  # type: ignore[arg-type]
        batch = self.cfg.trainer.batch_size
        totals = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        self.model.eval()
        for j, (x, y) in enumerate(self.val_loader):
            x = x.to(self.env.device, non_blocking=True)
            y = y.to(self.env.device, non_blocking=True)
            with self._autocast():
                per_sample = self.loss_fn(self.model(x), y, reduction="none").reshape(len(y), -1).mean(1)
            position = self.env.rank + world * (j * batch + torch.arange(len(y), device=self.env.device))
            real = position < n_real
            totals += torch.stack([per_sample.double()[real].sum(), real.sum().double()])
        self.model.train()
        if world > 1:
            dist.all_reduce(totals)
        c.last_val_loss = (totals[0] / totals[1]).item()
        if c.last_val_loss < c.best_val_loss:
            c.best_val_loss, c.bad_validations = c.last_val_loss, 0
        else:
            c.bad_validations += 1
        self._log({"step": c.step, "epoch": c.epoch, "val_loss": c.last_val_loss})

    # -- snapshots ----------------------------------------------------------------------------------------
    def _save_snapshot(self) -> None:
        c = self.counters
        self.metrics.flush()  # every line up to this step reaches the file before the snapshot does
        shared = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "counters": c.state_dict(),
        }
        # The snapshot writes `own` after this returns, while training goes on: nothing in it may be
        # an object training changes. rng_state() is new; a dataset's state_dict may not be.
        loader = copy.deepcopy(self.loader.state_dict()) if c.batches_in_epoch else None
        own = {"rng": rng_state(), "loader": loader}
        meta = {"epoch": c.epoch, "config": to_dict(self.cfg), "optimizer": class_name(self.optimizer)}
        self.snapshots.save(c.step, shared if self.env.is_main else {}, own, meta)
        self._snapshot_step = c.step

    def _load_snapshot(self) -> Snapshot | None:
        snap = self.snapshots.find_latest()
        if snap is None:
            return None
        mismatch = resume_mismatch(snap.manifest, self.cfg, self.env.world_size)
        if mismatch:
            raise SnapshotError(f"cannot resume from {snap.path}: {mismatch}")
        # A Trainer built in Python may get another optimizer than the config says (cfg.optim.name is
        # only the config's): its state would load into the wrong slots, or fail at the first step.
        written_by, mine = snap.manifest.get("optimizer"), class_name(self.optimizer)
        if written_by is not None and written_by != mine:
            raise SnapshotError(
                f"cannot resume from {snap.path}: the optimizer differs: the snapshot was written with "
                f"{written_by} and this Trainer has {mine}; resume with {written_by}, or start a new run_dir"
            )
        shared, own = snap.load_shared(), snap.load_rank(self.env.rank)
        try:
            self.module.load_state_dict(shared["model"])
        except RuntimeError as e:
            detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
            raise SnapshotError(f"cannot resume from {snap.path}: the model differs: {detail}") from None
        try:
            self.optimizer.load_state_dict(shared["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:  # parameter groups of another shape
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SnapshotError(f"cannot resume from {snap.path}: the optimizer differs: {detail}") from None
        self.scheduler.load_state_dict(shared["scheduler"])
        self.scaler.load_state_dict(shared["scaler"])
        self.counters.load_state_dict(shared["counters"])
        self._snapshot_step = snap.step
        self._pending = {"rng": own["rng"]}
        if own["loader"] is not None:
            self._pending["loader"] = own["loader"]
        if self.env.is_main:
            log.info(
                "resumed from %s (epoch %d, step %d)", snap.path, self.counters.epoch, self.counters.step
            )
        return snap

    # -- reporting ------------------------------------------------------------------------------------
    def _open_reporting(self) -> None:
        """Rank 0's progress display and wandb run, once the snapshot has said where the run stands."""
        t = self.cfg.trainer
        self.progress = Progress(self.total_steps, self.counters.step, t.log_every_steps, self.env.is_main)
        if self.env.is_main and self.cfg.logger.name == "wandb":
            self.wandb = WandbRun(
                self.cfg.logger, self.run_dir, self.counters.wandb_run_id, to_dict(self.cfg)
            )
            self.counters.wandb_run_id = self.wandb.id
            self.wandb.replay(read_metrics(self.run_dir))

    def _close_reporting(self, clean: bool) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb is not None:
            self.wandb.finish(0 if clean else 1, preempted=self._stop_reason.startswith("stopped by signal"))

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.log(record)

    def _log_step(self, window: list[Batch], result: StepResult, data_time: float, step_time: float) -> None:
        """One line of metrics.jsonl (fields: disttrain.metrics) and wandb, and the progress display. All
        from values the step already has on the host: no device sync here."""
        if not self.env.is_main:
            return
        c, world = self.counters, self.env.world_size
        samples = sum(len(y) for _, y in window) * world
        record: dict[str, Any] = {
            "step": c.step,
            "epoch": c.epoch,
            "loss": result.loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": result.grad_norm,
            "skipped": not result.verdict.apply,
            "explosion": result.verdict.explosion,
            "samples_per_s": samples / step_time,
            "step_time_s": step_time,
            "data_time_s": data_time,
        }
        if self.counts_tokens:
            record["tokens_per_s"] = sum(y.numel() for _, y in window) * world / step_time
        if self.peak_samples_per_s:
            record["mfu"] = record["samples_per_s"] / self.peak_samples_per_s
        if self.env.device.type == "cuda":
            # The allocator's own counters, read on the host: per step, since the previous reset.
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.env.device)
        if result.grad_flow is not None:
            record["grad_flow"] = result.grad_flow
        self._log(record)
        assert self.progress is not None
        self.progress.update(c.step, c.epoch, result.loss, samples, record["samples_per_s"])

    def _print_epoch(self, train_loss: float, seconds: float, steps: int) -> None:
        if self.progress is None:
            return
        c = self.counters
        val = f"  val loss {c.last_val_loss:.4f}" if self.val_loader is not None else ""
        samples = steps * self.cfg.trainer.batch_size * self.cfg.trainer.accumulate * self.env.world_size
        self.progress.write(
            f"epoch {c.epoch}/{self.cfg.trainer.max_epochs}  step {c.step}  train loss {train_loss:.4f}{val}"
            f"  {samples / seconds:,.0f} samples/s"
        )

    def _summary(self, seconds: float) -> dict[str, Any]:
        c = self.counters
        summary = {
            "steps": c.step,
            "epochs": c.epoch,
            "final_loss": c.last_loss,
            "final_val_loss": c.last_val_loss,
            "params_sha256": params_sha256(self.module),
            "world_size": self.env.world_size,
            "strategy": self.strategy.name,
            "precision": self.cfg.trainer.precision,
            "stopped": self._stop_reason,
            "snapshot": step_dir_name(self._snapshot_step) if self._snapshot_step is not None else None,
            "seconds": seconds,
            "skipped_steps": c.skipped_steps,
            "explosions": c.explosions,
            "lr_halvings": c.lr_halvings,
        }
        if c.wandb_run_id:
            summary["wandb_run_id"] = c.wandb_run_id
        if self.env.is_main:
            write_summary(self.run_dir, summary)
        return summary
