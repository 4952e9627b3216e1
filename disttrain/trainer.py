"""The Trainer: one readable training step, a life of small named methods, and exact resume.

    trainer = Trainer(model, optimizer, dataset, cfg)   # cfg: disttrain.config.TrainConfig
    summary = trainer.fit()

Launch the same script with `python train.py` (one process), `torchrun --nproc-per-node=2 train.py`
(DDP over gloo on CPU, nccl on GPUs) or `srun python train.py`; the Trainer reads its place in the job
from the environment.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from disttrain import runlock
from disttrain.callbacks import CallbackError, Callbacks, RunView, set_path
from disttrain.config import (
    ConfigError,
    OptimConfig,
    TrainConfig,
    accumulate_for,
    checked,
    describe_exception,
    resolve_strategy,
    resume_mismatch,
    to_dict,
)
from disttrain.data import (
    EpochSampler,
    InProcessLoader,
    WorkerLoader,
    make_loader,
    one_sample_micro_batches,
    training_splits,
)
from disttrain.dist import DistEnv, placement, setup_distributed, teardown
from disttrain.early_stopping import EarlyStopping
from disttrain.health import GradHealth, Verdict, full, grad_flow, halve_lr
from disttrain.loggers import with_config_loggers
from disttrain.metrics import (
    ItemMeans,
    MetricsLog,
    params_sha256,
    peak_samples_per_s,
    write_summary,
)
from disttrain.progress import Progress
from disttrain.snapshot import DCP_DIR, RunFileError, Snapshot, SnapshotError, SnapshotStore, step_dir_name
from disttrain.step import (
    DefaultStep,
    Step,
    StepOutput,
    as_step_output,
    callable_name,
    collate,
    describe,
    num_samples,
    take,
    to_device,
)
from disttrain.strategy import FSDPStrategy, compiler_missing, make_strategy
from disttrain.streams import StreamLoader, is_stream, stream_loader, val_batches

log = logging.getLogger("disttrain")
# The schedule advances with every optimizer step, applied or skipped (non-finite gradients): torch
# warns once when the first step is skipped, which fp16 does by design.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

#: A reusable empty context (a new contextlib.nullcontext() per use costs a little, every micro-batch).
NO_CONTEXT = contextlib.nullcontext()
#: Seconds of training between two agreements of the ranks on a stop signal (_stop_requested_anywhere).
STOP_CHECK_SECONDS = 0.1
#: trainer.compile: steps after which the Trainer looks at what torch.compile did (_say_how_compile_went).
COMPILE_CHECK_STEPS = 5
#: The name of trainer.early_stop_patience's callback; a stop it asks for is summed up as `early_stop`.
EARLY_STOP = "early_stop"


def make_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def check_model(model: Any, key: str = "model") -> None:
    """What the Trainer trains must be a module with something to train: anything else fails later, deep
    inside the optimizer or the strategy, in a traceback that does not name it."""
    if not isinstance(model, nn.Module):
        made = "returned" if "_target_" in key else "is"
        raise ConfigError(f"{key}: {made} a {class_name(model)}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            f"{key}: {class_name(model)} has no parameters that require grad, so there is nothing to train"
        )
    for name, p in model.named_parameters():
        if p.numel() == 0:  # a layer of width 0: its first batch would fail on shapes that do not fit
            raise ConfigError(f"{key}: parameter {name} of shape {tuple(p.shape)} has no elements")


def _check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """An optimizer built over another model's parameters would step those and train nothing; one with a
    learning rate that is not a finite number would make every parameter NaN at its first step."""
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if lr is not None and not math.isfinite(float(lr)):
            raise ConfigError(f"optimizer: param group {i} has lr={float(lr)!r}: must be a finite number")
    own = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in own for p in held)
    if foreign:
        raise ConfigError(
            f"optimizer: {foreign} of its {len(held)} parameters are not the model's, so training would "
            "not change the model; build the optimizer from this model's parameters()"
        )


def check_tail_for_batchnorm(model: nn.Module, n: int, t: Any, world: int) -> None:
    """An epoch's short last step that leaves a rank a micro-batch of one sample (of a training split
    of `n`) would stop a model with BatchNorm there (its batch statistics need two): refused before
    training, in one line."""
    ranks = one_sample_micro_batches(n, t, world)
    if ranks and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        where = "a micro-batch" if world == 1 else f"rank {ranks[0]} a micro-batch"
        raise ConfigError(
            f"trainer.drop_last=False: the epoch's last step leaves {where} of one sample, which the "
            "model's BatchNorm cannot train on; set trainer.drop_last=true, or a batch size that leaves more"
        )


def class_name(obj: Any) -> str:
    """`torch.optim.adamw.AdamW`: the class an object is, as its module names it."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def make_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Counters:
    """Where the run is. Everything here goes into a snapshot."""

    epoch: int = 0
    step: int = 0
    #: Samples of the current epoch already consumed on all ranks together: the data position, the same
    #: on any number of processes (a multiple of the global batch mid-epoch; docs/design.md, contract 3).
    samples_in_epoch: int = 0
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
    #: Optimizer steps skipped in a row, up to the latest step (health.max_skipped_steps acts on it).
    skip_streak: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain data (loadable with weights_only=True)."""
    state = np.random.get_state()
    assert isinstance(state, tuple)  # np.random's global generator is an MT19937: its legacy state is a tuple
    _, keys, pos, has_gauss, gauss = state
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
    #: The window's loss as this rank's part: the step's loss, the mean over every loss item of the
    #: window on all ranks, is the sum over ranks of `loss_sum` / `loss_over` (Trainer._step_losses).
    loss_sum: float
    loss_over: float
    grad_norm: float
    verdict: Verdict
    #: Per-module gradient norms on the steps health.grad_flow_every asks for, else None.
    grad_flow: dict[str, float] | None
    #: Samples of the window on all ranks.
    samples: int
    #: Loss items (tokens) of the window on all ranks: counted, or the targets of a token dataset whose
    #: items are samples; None for other sample losses.
    items: float | None


def derived_seed(seed: int, step: int, rank: int) -> int:
    """A seed for rank `rank` of a run resumed at `step` on another number of processes."""
    digest = hashlib.sha256(f"disttrain:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


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
    step: Step
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
        step: Step | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        scheduler: Any = None,
        env: DistEnv | None = None,
        callbacks: Mapping[str, Any] | Sequence[Any] | None = None,
    ) -> None:
        """`step(model, batch)` computes a micro-batch's loss (disttrain.step: the contract, and the
        default step, which calls the model as the batch says); `loss_fn(output, target)` replaces the
        built-in loss of `(inputs, target)` batches (a mean over samples); `collate_fn` builds a batch
        from samples (default: disttrain.step.collate); `callbacks` (a list, or a mapping of name to
        callback) are called at the run's events (disttrain.callbacks)."""
        # Everything a user can get wrong is refused here, before a process group exists: the same
        # rules as the CLI's, and what only the objects can tell (optimizer, dataset sizes).
        world_size = env.world_size if env is not None else placement().world_size
        self.cfg = cfg = checked(cfg or TrainConfig(), world_size)
        t = cfg.trainer
        check_model(model)
        _check_optimizer(optimizer, model)
        self.callbacks = Callbacks(with_config_loggers(callbacks, cfg.logger))
        patience = cfg.trainer.early_stop_patience
        if patience and EARLY_STOP not in self.callbacks.named:  # the config's shorthand for the callback
            early_stop = EarlyStopping(monitor="val_loss", patience=patience)
            self.callbacks = Callbacks({**self.callbacks.named, EARLY_STOP: early_stop})
        #: The events that fire every step, looked up once (an event without handlers costs a test).
        self._on_before_optimizer_step = self.callbacks.handlers["on_before_optimizer_step"]
        self._on_step_end = self.callbacks.handlers["on_step_end"]
        self._on_log = self.callbacks.handlers["on_log"]
        self.run_view = RunView(self)
        # What a dataset declares is read before training_splits() wraps it in a Subset: its loss,
        # whether its samples all carry the same loss items (disttrain.step.DefaultStep), and a
        # vocabulary (a token dataset: tokens_per_s counts its targets).
        self.counts_tokens = hasattr(dataset, "vocab_size") and step is None
        loss = t.loss if t.loss != "auto" else getattr(dataset, "loss", "cross_entropy")
        if step is not None and not cfg.step:
            cfg.step = {"_target_": callable_name(step)}  # what a resume compares
        self.step = step or DefaultStep(model, loss, loss_fn, getattr(dataset, "loss_items", "targets"))
        dataset, val_dataset = training_splits(dataset, val_dataset, t, world_size)
        if not is_stream(dataset):  # (a stream's tail is known only as it runs)
            check_tail_for_batchnorm(model, len(dataset), t, world_size)  # type: ignore[arg-type]
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self._owns_process_group = env is None and not dist.is_initialized()
        self.env = env or setup_distributed(t.device, t.timeout_s)
        self.run_dir = Path(cfg.run_dir)
        name = resolve_strategy(cfg, self.env.world_size)
        self.strategy = make_strategy(name, self.env, cfg.strategy, t.precision)
        self.model, self.module = self._wrap(model, optimizer)
        self.optimizer = optimizer
        pin = self.env.device.type == "cuda"
        self.accumulate = accumulate_for(t, self.env.world_size)
        #: Samples of one optimizer step on all ranks, and of one epoch (a multiple of it with drop_last).
        self.global_batch = self.env.world_size * t.batch_size * self.accumulate
        loading = (t.batch_size, t.num_workers, pin, collate_fn or collate)
        #: A user's IterableDataset (disttrain.streams): its windows, their size agreed by the ranks.
        self.stream: StreamLoader | None = None
        self.loader: InProcessLoader | WorkerLoader
        self.sampler: EpochSampler | None
        self.val_loader: InProcessLoader | WorkerLoader | None = None
        if is_stream(dataset):
            stream = StreamLoader(dataset, self.env, self.accumulate, *loading, drop_last=t.drop_last)  # type: ignore[arg-type]
            self.stream = stream
            self.loader, self.sampler, self.epoch_samples = stream.loader, None, 0
            self.steps_per_epoch = stream.steps_per_epoch()  # 0: unknown (trainer.max_steps ends it)
        else:
            n = len(dataset)  # type: ignore[arg-type]
            self.epoch_samples = n - n % self.global_batch if t.drop_last else n
            self.sampler = self.strategy.sampler(dataset, t.shuffle, seed=t.seed, length=self.epoch_samples)
            self.loader = make_loader(dataset, self.sampler, *loading)
            self.steps_per_epoch = math.ceil(self.epoch_samples / self.global_batch)
        if is_stream(val_dataset):
            self.val_loader = stream_loader(val_dataset, *loading)  # type: ignore[arg-type]
        elif val_dataset is not None:
            val_sampler = self.strategy.sampler(val_dataset, shuffle=False, seed=t.seed, pad=True)
            self.val_loader = make_loader(val_dataset, val_sampler, *loading)
        total_steps = t.max_epochs * self.steps_per_epoch
        self.total_steps = min(total_steps or t.max_steps, t.max_steps) if t.max_steps else total_steps
        self.scheduler = scheduler or make_scheduler(cfg.optim, optimizer, self.total_steps)
        #: Whether the learning rate changes once warm-up is over (a user's scheduler may change it).
        self.lr_moves = scheduler is not None or cfg.optim.schedule != "constant"
        self.scaler = self.strategy.make_scaler()
        self.autocast_dtype = self.strategy.autocast_dtype()
        self.on_cuda = self.env.device.type == "cuda"
        self.fp16 = t.precision == "fp16"
        # Rank 0 logs per-module norms; sharded gradients need every rank to compute them.
        mine = self.env.is_main or self.strategy.shards_parameters
        self.grad_flow_every = cfg.health.grad_flow_every if mine else 0
        self.counters = Counters()
        self.snapshots = SnapshotStore(self.run_dir, self.env, cfg.snapshot.keep_last)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.env.is_main)
        self.health = GradHealth(cfg.health, t.grad_clip_norm, t.precision, announce=self.env.is_main)
        self.train_metrics = ItemMeans()  # a step's extra metrics, summed until the next log line
        #: Steps whose metrics line waits for the ranks' sum of their loss (more than one process).
        self._unlogged: list[tuple[StepResult, dict[str, Any] | None, float]] = []
        self._epoch_loss = 0.0  # the sum of this epoch's step losses logged so far
        self._first_step_checked = False
        self.peak_samples_per_s = peak_samples_per_s(
            self.module, self.env.device, t.precision, t.peak_tflops, self.env.world_size
        )
        self.progress: Progress | None = None  # rank 0's bar or lines, from fit() on
        self._pending: dict[str, Any] = {}  # loader and RNG state from a snapshot, applied at epoch start
        self._stop_signal = 0
        self._callback_stop = 0  # 1 + the index of the callback that asked the run to stop
        self._agreed_stop = 0  # the same, asked by every rank at once (request_stop(all_ranks=True))
        # The ranks' agreement on stopping, see _stop_requested_anywhere: the all-reduce in flight and
        # its tensor, the step at which the next one starts, and (step, time) when the last one started.
        self._stop_flag = torch.zeros(3)
        self._stop_work: Any = None
        self._stop_next_step = 0
        self._stop_started_at: tuple[int, float] | None = None
        self._stop_reason = ""
        self._snapshot_step: int | None = None  # of the newest snapshot saved or loaded, on every rank
        self._spare: Any = None  # this rank's latest micro-batch, the stuff of a filler (_filler)
        #: The latest step's gradient norm, before clipping (callbacks read it: RunView.metrics).
        self.grad_norm = math.nan
        self._fitted = False
        #: Why the run diverged (the skipped steps, or the parameters that are not finite), if it did.
        self._diverged = ""
        seed_everything(t.seed + self.env.rank)

    def _wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, nn.Module]:
        """The model as the strategy runs it, and the user's module (what snapshots save and hashes
        cover). FSDP shards the parameters in place into new DTensor parameters and moves each shard
        to the device itself; the optimizer, built over the unsharded ones, is pointed at them by name
        (it holds no state yet). torch.compile compiles the module in place (its state-dict keys
        stay): before DDP or DataParallel wraps it, after FSDP shards it."""
        compile_now = self.cfg.trainer.compile
        if compile_now:
            if (missing := compiler_missing()) is not None:
                raise ConfigError(f"trainer.compile=True: {missing}")
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache/disttrain/inductor"))
        if not self.strategy.shards_parameters:
            model = model.to(self.env.device)
            if compile_now:
                model.compile()
            wrapped = self.strategy.wrap(model)
            return wrapped, self.strategy.unwrap(wrapped)
        names = {id(p): n for n, p in model.named_parameters()}
        wrapped = self.strategy.wrap(model)
        sharded_params = dict(wrapped.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded_params[names[id(p)]] for p in group["params"]]
        if compile_now:
            wrapped.compile()
        return wrapped, wrapped

    def _say_how_compile_went(self) -> None:
        """trainer.compile that compiled nothing, or that recompiles at every step, costs compile time
        and gains nothing: said in one line (rank 0), with dynamo's reason."""
        from torch._dynamo.utils import counters, get_compilation_metrics

        if not self.env.is_main:
            return
        steps = COMPILE_CHECK_STEPS
        if not counters["stats"]["unique_graphs"]:
            breaks = "; ".join(sorted(counters["graph_break"])[:2]) or "the model's forward is not traced"
            message = "captured no graph in %d steps, so the model runs eager (%s)"
            log.warning("trainer.compile=true: torch.compile " + message, steps, breaks)
        metrics = get_compilation_metrics()
        recompiles = [m.recompile_reason for m in metrics if getattr(m, "recompile_reason", None)]
        if len(recompiles) >= steps - 1:
            message = "recompiled %d times in %d steps (last reason: %s)"
            log.warning(
                "trainer.compile=true: torch.compile " + message, len(recompiles), steps, recompiles[-1]
            )

    def _optimizer_names(self) -> list[str]:
        """The optimizer's parameters' names, in its param_groups order (what its integer keys mean)."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    # -- the run ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until max_epochs, max_steps, early stopping or a stop signal; return the summary.

        The run dir is this job's while fit() runs (runlock): rank 0 takes its lock unless this process
        or its launcher holds it already; another job on it is refused in one line on every rank."""
        if self._fitted:
            # A second fit() would find its process group torn down, its wrapper gone and its schedule
            # built for the first limit: a new Trainer on the same run_dir resumes exactly instead.
            c = self.counters
            raise ConfigError(
                f"Trainer.fit(): this Trainer has trained already (to step {c.step}, "
                f"{self._stop_reason or 'ended by an error'}); to train further, build a new Trainer with "
                "the raised trainer.max_steps or max_epochs on the same run_dir: it resumes from its snapshot"
            )
        self._fitted = True
        clean = False
        release = lambda: None  # noqa: E731
        try:
            release = self._hold_run_dir()
            self.callbacks.fire("on_setup", self.run_view)
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
        self._compile_check_step = self.counters.step + COMPILE_CHECK_STEPS
        start = time.perf_counter()
        self.callbacks.fire("on_fit_start", self.run_view)
        while not self._should_stop():
            self._run_epoch()
        if self._stop_reason.startswith("stopped by") and self._snapshot_step != self.counters.step:
            self._save_snapshot()  # stopped before its first step: a stop promises a snapshot of its step
        # Rank 0 commits the last snapshot on its own thread: wait for it (a failure stops the run in one
        # line) before the summary says the run is done, and before a SLURM requeue ends the job.
        self._log_summed_losses()  # (a snapshot has logged them all already; no rank waits on this)
        self.snapshots.wait()
        self.metrics.close()
        if self._diverged and self.env.is_main:
            log.error("%s", self._diverged_line())
        summary = self._summary(time.perf_counter() - start)
        self.callbacks.fire("on_fit_end", self.run_view, summary)  # a logger adds its run id to it
        if self.env.is_main:
            write_summary(self.run_dir, summary)
        return summary

    def _diverged_line(self) -> str:
        """The one line of a run that stopped because it no longer trains: why, and what it left."""
        c = self.counters
        if self._snapshot_step == c.step:
            kept = f"snapshot {step_dir_name(c.step)} written"
            if c.skip_streak:
                kept += f" (the weights of step {c.step - c.skip_streak}, the last step taken)"
        else:
            kept = f"not written as a snapshot; {self.snapshots.newest_good()}"
        return (
            f"diverged at step {c.step}: {self._diverged}; {kept}; run dir {self.run_dir}; lower optim.lr "
            "(or fix the data) and run the same command to resume"
        )

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

    def request_callback_stop(self, name: str, reason: str, all_ranks: bool = False) -> None:
        """A callback's stop (RunView.request_stop): like a signal's, agreed by the ranks; or at this
        step, when every rank asks at once (all_ranks)."""
        if all_ranks and not self._agreed_stop:
            self._agreed_stop = 1 + self.callbacks.index(name)
        if not self._callback_stop:
            self._callback_stop = 1 + self.callbacks.index(name)
            log.warning(
                "step %d: callback %s asked the run to stop%s",
                self.counters.step,
                name,
                f": {reason}" if reason else "",
            )

    def _should_stop(self) -> bool:
        t, c = self.cfg.trainer, self.counters
        if self._stop_reason:
            return True
        asked: int | bool
        if self._agreed_stop:
            self._callback_stop = self._agreed_stop
            asked = True
        elif self.env.world_size == 1:
            asked = self._stop_signal or self._callback_stop
        else:
            asked = self._stop_requested_anywhere()
        if self._agreed_stop and self.callbacks.name_at(self._agreed_stop - 1) == EARLY_STOP:
            self._stop_reason = "early_stop"  # trainer.early_stop_patience's callback: its old name
        elif asked and self._stop_signal:
            self._stop_reason = f"stopped by signal {signal.Signals(self._stop_signal).name}"
        elif asked:
            self._stop_reason = f"stopped by callback {self.callbacks.name_at(self._callback_stop - 1)}"
        elif t.max_steps and c.step >= t.max_steps:
            self._stop_reason = "max_steps"
        elif c.epoch >= t.max_epochs:
            self._stop_reason = "max_epochs"
        return bool(self._stop_reason)

    def _stop_requested_anywhere(self) -> bool:
        """A signal reaches the ranks at different steps (or one rank only: SLURM signals a step, torchrun
        its group), yet every rank must stop at the same step. So the ranks agree with an all-reduce
        (MAX) of [signal, steps until the next one, a callback's stop], started at a step boundary and
        read one step later while it ran in the background. Each rank proposes as many steps as take
        STOP_CHECK_SECONDS: the all-reduce runs ten times a second whatever the step time (one every
        step would be a few percent of a small DDP step on gloo: docs/benchmarks.md), every
        rank reads the same result at the same step, and they stop together at most STOP_CHECK_SECONDS
        and two steps after the signal."""
        if self.env.world_size == 1:
            return bool(self._stop_signal)
        step = self.counters.step
        if self._stop_work is not None and self._stop_started_at is not None:  # one started, with its step
            self._stop_work.wait()
            signum, interval, asked = (int(v) for v in self._stop_flag.tolist())
            self._stop_work = None
            if signum or asked:
                self._stop_signal, self._callback_stop = signum, asked
                return True
            self._stop_next_step = self._stop_started_at[0] + interval
        if step >= self._stop_next_step:
            self._log_summed_losses()
            now, proposal = time.perf_counter(), 1
            if self._stop_started_at is not None:
                last_step, last_time = self._stop_started_at
                proposal = max(1, int(STOP_CHECK_SECONDS * (step - last_step) / (now - last_time)))
            self._stop_started_at = (step, now)
            flag = [self._stop_signal, proposal, self._callback_stop]
            self._stop_flag = torch.tensor(flag, device=self.env.device)
            self._stop_work = dist.all_reduce(self._stop_flag, op=dist.ReduceOp.MAX, async_op=True)
        return False

    def _run_epoch(self) -> None:
        c, k, world = self.counters, self.accumulate, self.env.world_size
        stream = self.stream
        if self.sampler is not None:
            # Before the iterator exists: with workers, a late set_epoch would replay the previous order.
            # Mid-epoch (after a resume) the sampler starts at this rank's share of the samples consumed:
            # rank r's i-th sample is the (r + i·world)-th of the epoch's one permutation, whatever world is.
            self.sampler.set_epoch(c.epoch, start=c.samples_in_epoch // world)
            # The loader draws its workers' seed from its own generator, not the global RNG, so a restored
            # RNG is the one the first life had, before or after iter().
            self.loader.generator = torch.Generator().manual_seed(self.cfg.trainer.seed + c.epoch)
        if "rng" in self._pending:
            set_rng_state(self._pending.pop("rng"))
        self.callbacks.fire("on_epoch_start", self.run_view)
        if stream is not None:
            stream.start_epoch(c.epoch, self.cfg.trainer.seed + c.epoch)
        batches = iter(self.loader) if stream is None else iter(())
        n, whole = self.epoch_samples, self.global_batch
        log_every, val_every = self.cfg.trainer.log_every_steps, self.cfg.trainer.val_every_steps
        snapshot_every = self.cfg.snapshot.every_steps
        self._epoch_loss, epoch_steps, epoch_start = 0.0, 0, time.perf_counter()
        compiled = self.cfg.trainer.compile
        while c.samples_in_epoch < n or stream is not None:
            tick = time.perf_counter()
            micro, last = None, False
            if stream is not None:  # the window's size is known once the ranks have pulled theirs
                window, size, micro, last = stream.pull()
                if not size:
                    return self._end_epoch_after_its_last_step(epoch_steps, epoch_start)
            else:
                size = min(whole, n - c.samples_in_epoch)  # the window's samples on all ranks
                if size == whole:
                    window = [next(batches)] if k == 1 else list(itertools.islice(batches, k))
                else:  # the epoch's last window: this rank's part of what is left, maybe nothing
                    window = list(itertools.islice(batches, self._micro_batches(size, self.env.rank)))
            data_time = time.perf_counter() - tick
            result = self._train_step(window, size, micro)
            c.step += 1
            if compiled and self._compile_check_step == c.step:
                self._say_how_compile_went()
            c.samples_in_epoch += size
            epoch_steps += 1
            epoch_done = last if stream is not None else c.samples_in_epoch == n
            log_line = epoch_done or c.step % log_every == 0
            self._log_step(result, data_time, time.perf_counter() - tick, log_line)
            if self._on_step_end:
                self.callbacks.fire("on_step_end", self.run_view)
            if epoch_done:
                # Let the loader see the end of the epoch, else its next iterator continues this one.
                next(batches, None)
                c.epoch, c.samples_in_epoch = c.epoch + 1, 0
            if epoch_done or (val_every and c.step % val_every == 0):
                self._validate()
            if result.verdict.apply:
                c.skip_streak = 0
            else:
                c.skip_streak += 1
                self._check_skips(result)
            stopping = self._should_stop()
            if epoch_done or stopping or (snapshot_every and c.step % snapshot_every == 0):
                self._save_snapshot()
                stopping = stopping or self._should_stop()  # parameters that are not finite stop the run
            if epoch_done:  # (the snapshot has logged every step's loss: _epoch_loss is whole)
                seconds = time.perf_counter() - epoch_start
                self._print_epoch(self._epoch_loss / epoch_steps, seconds, epoch_steps)
                self.callbacks.fire("on_epoch_end", self.run_view)
            if stopping or epoch_done:
                return

    def _end_epoch_after_its_last_step(self, epoch_steps: int, epoch_start: float) -> None:
        """Every rank's stream ended on a window's boundary, seen one pull after the epoch's last step:
        the epoch's end without a step (validation, a snapshot unless the step has one, on_epoch_end)."""
        c = self.counters
        if not c.samples_in_epoch:  # (else every epoch would end at once, training nothing)
            assert self.stream is not None
            raise ConfigError(f"data: {self.stream.name} yields no sample in epoch {c.epoch}, on any rank")
        c.epoch, c.samples_in_epoch = c.epoch + 1, 0
        self._validate()
        self._should_stop()
        if self._snapshot_step != c.step:
            self._save_snapshot()
        if epoch_steps:
            self._print_epoch(self._epoch_loss / epoch_steps, time.perf_counter() - epoch_start, epoch_steps)
        self.callbacks.fire("on_epoch_end", self.run_view)

    def _check_skips(self, result: StepResult) -> None:
        """health.max_skipped_steps steps skipped in a row: the run no longer trains, and stops as diverged.
        Every rank counts the same skips (the verdicts come from all-reduced values), so every rank
        stops at the same step without a message."""
        limit, streak = self.cfg.health.max_skipped_steps, self.counters.skip_streak
        if not limit or streak < limit:
            return
        if not math.isfinite(result.grad_norm):
            why = f"non-finite gradients, norm {result.grad_norm}"
        elif result.verdict.explosion:
            why = "gradient explosions under health.on_explosion=skip"
        else:
            why = "windows without loss items"
        self._diverged = f"{streak} steps in a row skipped ({why}; health.max_skipped_steps={limit})"
        self._stop_reason = "diverged"

    def _micro_batches(self, size: int, rank: int) -> int:
        """Micro-batches rank `rank` holds of a window of `size` samples on all ranks: its share of them,
        perm[r::world] of the window (EpochSampler), in batches of trainer.batch_size."""
        world, batch_size = self.env.world_size, self.cfg.trainer.batch_size
        return -(-max(0, -(-(size - rank) // world)) // batch_size)

    def _train_step(self, window: list[Any], size: int, micro: int | None = None) -> StepResult:
        """One optimizer step over an accumulation window of micro-batches, `size` samples on all ranks.
        Its gradient is that of the mean loss over all loss items of the window on all ranks (the
        design page's first contract):
        - items that are samples (known from the batches and `size`): each micro-batch's mean is
          weighted by world size × its samples / `size` before backward, which DDP's mean over ranks
          turns into the window's mean;
        - counted items (tokens): each mean is multiplied by its count (a sum), and once the window's
          count on all ranks is known (one all-reduce, on the device) the gradients are multiplied by
          world size / that count, which also undoes DDP's mean over ranks.
        Every rank runs as many micro-batches as rank 0, which holds the most: in an epoch's last window
        a rank with fewer (or none) runs one sample of a batch again, weighted by zero, so that the
        strategy's collectives (DDP's all-reduce, FSDP's gathers) meet on every rank.
        A stream's window says how many micro-batches every rank runs (`micro`, disttrain.streams).
        One micro-batch in one process needs none of this: its mean is the window's (_one_batch_step)."""
        world = self.env.world_size
        if world == 1 and len(window) == 1 and not self.fp16:
            return self._one_batch_step(window[0])
        samples = list(map(num_samples, window))
        if micro is None:
            micro = self.accumulate if size == self.global_batch else self._micro_batches(size, 0)
        if len(window) < micro:
            window = window + [self._filler(window)] * (micro - len(window))
            samples += [0] * (micro - len(samples))
        elif world > 1:
            self._spare = window[-1]
        whole = len(window) == 1 and world == 1
        losses, counts, counted = [], [], 0
        for i, batch in enumerate(window):
            batch = to_device(batch, self.env.device)
            final = i == len(window) - 1
            # Forward too must run inside no_sync: DDP decides in forward whether backward all-reduces.
            with NO_CONTEXT if final else self.strategy.no_sync(self.model):
                out = self._run_step(batch)
                batch_items = out.items
                if batch_items is None:  # samples (the whole window's mean needs no multiply, nor its cost)
                    weight = samples[i] * world / size
                    loss = out.loss * weight if weight != 1 else out.loss
                else:
                    if not samples[i]:  # a filler counts no items
                        batch_items = 0
                    loss = out.loss if whole else out.loss * batch_items
                    counted += 1
                (self.scaler.scale(loss) if self.fp16 else loss).backward()
            losses.append(out.loss)  # detached where it is read
            counts.append(batch_items)
            if out.metrics and samples[i]:
                self.train_metrics.add(out.metrics, samples[i] if out.items is None else out.items)
        if counted not in (0, len(window)):
            raise ConfigError("step: returned items for some micro-batches of a window and not for others")
        if self.fp16:
            self.scaler.unscale_(self.optimizer)  # clip in real units, not scaled ones
        all_items = self._rescale_by_items(counts, whole) if counted else None
        flow = self._grad_flow() if self.grad_flow_every else None  # per-module norms
        grad_norm = self._clip_gradients()
        values = self._to_host([*losses, grad_norm, *([all_items, *counts] if counted else [])])
        micro_losses, norm_value = values[: len(window)], values[len(window)]
        if counted:  # this rank's sum of loss × items, over the items of all ranks
            window_items, local = values[len(window) + 1], values[len(window) + 2 :]
            loss_sum = sum(v * n for v, n in zip(micro_losses, local, strict=True) if n)
            loss_over = window_items
        else:  # this rank's sum of loss × samples, over the window's samples on all ranks
            window_items = float(size)
            loss_sum = sum(v * n for v, n in zip(micro_losses, samples, strict=True) if n)
            loss_over = window_items
        verdict = self._optimizer_step(norm_value, window_items)
        tokens = window_items if counted else self._targets(window, size)
        return StepResult(loss_sum, loss_over, norm_value, verdict, flow, size, tokens)

    def _val_batches(self) -> Iterator[tuple[Any, int]]:
        """The validation batches with their real samples (the rest is padding): a stream's (each rank
        its own, disttrain.streams.val_batches), or the padded sampler's, whose positions past the
        split's length are repeats."""
        assert self.val_loader is not None
        if is_stream(self.val_loader.dataset):
            yield from val_batches(self.val_loader, self.env, lambda: self._filler([]))
            return
        world, batch_size = self.env.world_size, self.cfg.trainer.batch_size
        val_split = self.val_loader.dataset
        assert isinstance(val_split, Sized)  # training_splits refused a split without len()
        n_real = len(val_split)
        for j, batch in enumerate(self.val_loader):
            # Rank r's k-th sample of batch j sits at global position r + world·(j·batch_size + k).
            first = self.env.rank + world * j * batch_size
            yield batch, min(num_samples(batch), max(0, -(-(n_real - first) // world)))

    def _filler(self, window: list[Any]) -> Any:
        """A micro-batch for a rank that holds fewer than rank 0 in an epoch's last window, weighted by
        zero (its gradient adds exactly nothing): this rank's latest batch again, whole (a BatchNorm
        could not train on one sample of it). Only a rank resumed right into that window, holding none
        of it, reads a batch of the dataset's first samples."""
        if window:
            return window[-1]
        if self._spare is None and self.stream is not None:
            self._spare = self.stream.first_batch()
        if self._spare is None:
            first = [self.loader.dataset[i] for i in range(self.cfg.trainer.batch_size)]
            self._spare = self.loader.collate_fn(first)
        return self._spare

    def _one_batch_step(self, batch: Any) -> StepResult:
        """The window of one micro-batch in one process (fp32, bf16): its mean loss is the window's, so
        there is nothing to weigh, count on other ranks or rescale, and the step is the loop a user
        writes by hand (zero_grad, forward, loss, backward, clip, step) plus the health check and the
        numbers it reports: the general path gives the same gradients at a cost a small model notices. The
        loss it reports is the micro-batch's mean as the step returned it (the general path's weighted sum
        over micro-batches, (mean × n) / n here, could differ from it in the last bit)."""
        batch = to_device(batch, self.env.device)
        out = self._run_step(batch)
        out.loss.backward()
        samples = num_samples(batch)
        if out.metrics:
            self.train_metrics.add(out.metrics, samples if out.items is None else out.items)
        flow = self._grad_flow() if self.grad_flow_every else None
        grad_norm = self._clip_gradients()
        if out.items is None:
            if self.env.device.type == "cpu":  # (the values as they are: no list, no loop)
                loss_value, norm_value = out.loss.item(), grad_norm.item()
            else:
                loss_value, norm_value = self._to_host([out.loss, grad_norm])
            verdict = self._optimizer_step(norm_value, samples)
            items = self._targets([batch], samples)
        else:
            loss_value, norm_value, items = self._to_host([out.loss, grad_norm, out.items])
            verdict = self._optimizer_step(norm_value, items)
        # (no items: the loss is NaN, 0/0)
        return StepResult(
            loss_value, 1.0 if items is None or items else 0.0, norm_value, verdict, flow, samples, items
        )

    def _optimizer_step(self, norm_value: float, window_items: float) -> Verdict:
        """The optimizer step, if the gradients allow it, then zero_grad and the learning rate schedule.
        Gradients are identical on every rank after the all-reduce, so every rank decides alike:
        non-finite gradients, and explosions under health.on_explosion=skip, skip the step."""
        self.grad_norm = norm_value
        if self._on_before_optimizer_step:
            self.callbacks.fire("on_before_optimizer_step", self.run_view)
        verdict = self.health.judge(norm_value, self.counters, step=self.counters.step + 1)
        if not window_items:
            verdict = self._no_items(verdict)
        if self.fp16:  # GradScaler steps unless the gradients overflowed, and adjusts its scale
            if verdict.apply:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif verdict.apply:  # (not a disabled GradScaler's step and update: two calls doing nothing)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if verdict.halve_lr:
            halve_lr(self.optimizer, self.scheduler)
        # A constant learning rate past its warm-up is not stepped: LambdaLR.step would set the same
        # rate again (also after halve_lr, which halves the base too), at a cost every step.
        if self.lr_moves or self.scheduler.last_epoch < self.cfg.optim.warmup_steps:
            self.scheduler.step()
        return verdict

    def _targets(self, window: list[Any], size: int) -> float | None:
        """All targets of a window of `size` samples on all ranks, of `(inputs, target)` batches of a token
        dataset weighted by samples: every sample has as many, all count (tokens_per_s); None for other
        datasets and batches."""
        if not self.counts_tokens or not isinstance(window[0], (list, tuple)):
            return None
        return float(size * window[0][1][0].numel())

    def _to_host(self, values: list[Any]) -> list[float]:
        """The step's numbers (0-dim tensors, ints) as Python floats. On CUDA one transfer, the step's
        one sync; on the CPU nothing moves, and reading each one (exactly) is cheaper than stacking them
        as float64 for one .tolist()."""
        if self.env.device.type == "cpu":  # (.item(): float() of a tensor that requires grad warns)
            return [float(v.item() if isinstance(v, torch.Tensor) else v) for v in values]
        with torch.no_grad():
            return torch.stack(
                [torch.as_tensor(v).to(self.env.device, torch.float64) for v in values]
            ).tolist()

    def _run_step(self, batch: Any) -> StepOutput:
        """The step on one micro-batch under autocast (bf16, fp16), its result checked; the first call
        also turns a batch the model cannot be called with into one line. fp32 enters no context at all
        (even an empty one is three calls a step)."""
        if not self._first_step_checked:
            return self._first_step(batch)
        if self.autocast_dtype is None:
            return as_step_output(self.step(self.model, batch))
        with torch.autocast(self.env.device.type, dtype=self.autocast_dtype):
            return as_step_output(self.step(self.model, batch))

    def _first_step(self, batch: Any) -> StepOutput:
        """_run_step on the run's first micro-batch: a model or step that cannot take the batch (shapes
        that do not fit, a wrong type) is one line naming the batch and the innermost module that was
        running, before any optimizer step."""
        running: list[str] = []  # the modules whose forward has begun and not returned
        names = {id(m): f"{name} ({type(m).__name__})" for name, m in self.module.named_modules()}

        def enter(module: nn.Module, _: Any) -> None:
            if id(module) in names:
                running.append(names[id(module)])

        def leave(module: nn.Module, _: Any, __: Any) -> None:
            if id(module) in names and running:
                running.pop()

        # Hooks on every module for this one call (not under torch.compile, which would trace them).
        watch = not self.cfg.trainer.compile
        hooks = []
        if watch:
            hooks = [
                nn.modules.module.register_module_forward_pre_hook(enter),
                nn.modules.module.register_module_forward_hook(leave),
            ]
        try:
            with self._autocast():
                out = as_step_output(self.step(self.model, batch))
        except ConfigError:
            raise
        except TypeError as e:
            if not isinstance(self.step, DefaultStep):
                raise self._first_step_error(batch, running, e) from None
            raise ConfigError(f"batch: calling the model with {describe(batch)} failed: {e}") from None
        except Exception as e:
            raise self._first_step_error(batch, running, e) from None
        finally:
            for hook in hooks:
                hook.remove()
        self._first_step_checked = True
        return out

    def _first_step_error(self, batch: Any, running: list[str], e: Exception) -> ConfigError:
        # The root module's name is empty: " (Linear)" is then the model itself.
        where = ""
        if running:
            where = (
                f" in module {running[-1]}"
                if not running[-1].startswith(" ")
                else f" in the model{running[-1]}"
            )
        what = "the model" if isinstance(self.step, DefaultStep) else f"step {callable_name(self.step)}"
        return ConfigError(
            f"step 1: {what} failed on the first batch ({describe(batch)}){where}: {describe_exception(e)}"
        )

    def _rescale_by_items(self, counts: list[Any], whole: bool) -> torch.Tensor:
        """The window's loss items on all ranks; the gradients (of sums over items) become those of the
        mean over them. DDP has averaged over ranks, so the factor is world size / items."""
        device = self.env.device
        items = torch.stack([torch.as_tensor(c, device=device) for c in counts]).sum().to(torch.float64)
        if self.env.world_size > 1:
            dist.all_reduce(items)
        if not whole:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            scale = (self.env.world_size / items.clamp(min=1)).to(torch.float32)
            torch._foreach_mul_(grads, scale)
        return items

    def _step_losses(self, results: list[StepResult]) -> list[float]:
        """The steps' losses, each the mean over every loss item of its window on all ranks: the ranks'
        loss sums added up (collective on more than one process: one all-reduce for all the steps)."""
        sums = [r.loss_sum for r in results]
        if self.env.world_size > 1:
            summed = torch.tensor(sums, dtype=torch.float64, device=self.env.device)
            dist.all_reduce(summed)
            sums = summed.tolist()
        return [s / r.loss_over if r.loss_over else math.nan for s, r in zip(sums, results, strict=True)]

    def _no_items(self, verdict: Verdict) -> Verdict:
        """A window without a single loss item on any rank: nothing to learn from. On the first step it is
        the data's or the step's mistake (every label ignored?), refused in one line; later it skips the
        step, as a non-finite one would."""
        if self.counters.step == self.counters.skipped_steps and not self.counters.step:
            raise ConfigError(
                "step 1: the window holds no loss items on any rank (every target ignored, -100?); a step's "
                "items count the targets its loss averages over"
            )
        if verdict.apply:
            self.counters.skipped_steps += 1
            if self.env.is_main:
                log.warning("step %d: no loss items on any rank: step skipped", self.counters.step + 1)
        return Verdict(apply=False, explosion=verdict.explosion, halve_lr=False)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16/fp16 autocast on the job's device; for fp32 none (a disabled one still costs its calls)."""
        if self.autocast_dtype is None:
            return NO_CONTEXT
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _grad_flow(self) -> dict[str, float] | None:
        """Per-module gradient norms, every health.grad_flow_every steps (rank 0, every rank if sharded)."""
        if (self.counters.step + 1) % self.grad_flow_every:
            return None
        return grad_flow(self.module)

    def _clip_gradients(self) -> torch.Tensor:
        """The global gradient norm before clipping (what clip_grad_norm_ returns; over sharded gradients
        a replicated DTensor, the same value on every rank: its plain value)."""
        if self.cfg.trainer.grad_clip_norm:
            return full(nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.trainer.grad_clip_norm))
        return full(nn.utils.get_total_norm([p.grad for p in self.module.parameters() if p.grad is not None]))

    @torch.no_grad()
    def _validate(self) -> None:
        """Mean loss over all loss items of the held-out split on all ranks (and the step's extra metrics,
        means over the same items). The sampler pads the last shard with repeated samples; those
        positions (global index >= the split's length) are cut from the batch, so they never count."""
        if self.val_loader is None:
            return
        self._log_summed_losses()  # the step lines before this validation's line
        c, world, device = self.counters, self.env.world_size, self.env.device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # sum of loss × items, items
        means = ItemMeans()
        self.callbacks.fire("on_validation_start", self.run_view)
        self.model.eval()
        for batch, real in self._val_batches():
            # A batch of padding only still runs (FSDP's ranks must all call forward), weighted by 0.
            batch = to_device(take(batch, max(real, 1)), device)
            with self._autocast():
                out = as_step_output(self.step(self.model, batch))
            items = torch.as_tensor(real if out.items is None else out.items, device=device) * (real > 0)
            totals += torch.stack([torch.nan_to_num(out.loss.double()) * items, items.double()])
            if out.metrics:
                means.add(out.metrics, items)
        self.model.train()
        if world > 1:
            dist.all_reduce(totals)
        c.last_val_loss = (totals[0] / totals[1]).item()
        if c.last_val_loss < c.best_val_loss:
            c.best_val_loss, c.bad_validations = c.last_val_loss, 0
        else:
            c.bad_validations += 1
        record = {"step": c.step, "epoch": c.epoch, "val_loss": c.last_val_loss}
        record.update({f"val_{name}": value for name, value in means.read(world).items()})
        self._log(record)
        metrics = {key: value for key, value in record.items() if key.startswith("val_")}
        self.callbacks.fire("on_validation_end", self.run_view, metrics)

    # -- snapshots ----------------------------------------------------------------------------------------
    def _nonfinite_state(self) -> str | None:
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

    def _save_snapshot(self) -> None:
        c = self.counters
        if (bad := self._nonfinite_state()) is not None:
            # The newest snapshot is what a resume starts from: weights that are not finite would make
            # every later attempt train nothing. The run stops as diverged instead.
            why = f"the model's state is not finite (the first: {bad})"
            self._diverged = f"{self._diverged}; {why}" if self._diverged else why
            self._stop_reason = "diverged"
            return
        self.callbacks.fire("on_before_snapshot", self.run_view, c.step)
        self._log_summed_losses()  # every rank is at this step; the counters hold its loss
        self.metrics.flush()  # every line up to this step reaches the file before the snapshot does
        # A callback's DTensors (its shards, under FSDP) go with the model's shards, every rank's own.
        callback_state, callback_shards = self.callbacks.split_state()
        shared = {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "counters": c.state_dict(),
            "callbacks": callback_state,
        }
        write_sharded = None
        if self.strategy.shards_parameters:  # every rank writes its shards of the model and optimizer
            write_sharded = functools.partial(self._write_shards, extra=callback_shards)
        elif self.env.is_main:
            shared |= {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        # The snapshot writes `own` after this returns, while training goes on: nothing in it may be
        # an object training changes (rng_state() is new). The data position is in the counters.
        own = {"rng": rng_state()}
        if self.stream is not None:
            own["stream"] = self.stream.state_dict()
        meta = {"epoch": c.epoch, "config": to_dict(self.cfg), "optimizer": class_name(self.optimizer)}
        self.snapshots.save(c.step, shared if self.env.is_main else {}, own, meta, write_sharded)
        self._snapshot_step = c.step
        self.callbacks.fire("on_snapshot", self.run_view, c.step)

    def _load_snapshot(self) -> Snapshot | None:
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
        self.scheduler.load_state_dict(shared["scheduler"])
        self.scaler.load_state_dict(shared["scaler"])
        self.counters.load_state_dict(shared["counters"])
        self.callbacks.load_state_dict(self._callback_state(snap, shared.get("callbacks", {})))
        self._snapshot_step = snap.step
        written_by = snap.world_size
        if "samples_in_epoch" not in shared["counters"]:  # a snapshot from before the global position
            batch = snap.manifest["config"]["trainer"]["batch_size"]
            self.counters.samples_in_epoch = shared["counters"]["batches_in_epoch"] * written_by * batch
        own = snap.load_rank(self.env.rank) if written_by == self.env.world_size else {}
        if self.stream is not None:
            workers = snap.manifest["config"]["trainer"].get("num_workers", 0)
            c = self.counters
            self.stream.resume(own.get("stream"), c.epoch, c.samples_in_epoch, written_by, workers)
        if written_by == self.env.world_size:
            self._pending = {"rng": own["rng"]}
        else:
            # A rank's RNG belongs to the world size that wrote it: each rank now draws from a stream
            # derived from (seed, step, rank), the same every time this resume runs.
            seed_everything(derived_seed(self.cfg.trainer.seed, self.counters.step, self.env.rank))
        if self.env.is_main:
            c, world = self.counters, self.env.world_size
            moved = f", {written_by} -> {world} processes" if written_by != world else ""
            log.info("resumed from %s (epoch %d, step %d%s)", snap.path, c.epoch, c.step, moved)
        return snap

    def _callback_state(self, snap: Snapshot, state: dict[str, Any]) -> dict[str, Any]:
        """The callbacks' saved state, with the tensors a sharded snapshot holds for them loaded into
        the ones their state_dict() has now (resharded to this job, DTensor or not)."""
        if not snap.sharded:
            return state
        from disttrain import sharded

        templates = self.callbacks.tensor_templates()
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

    # -- reporting ------------------------------------------------------------------------------------
    def _open_reporting(self) -> None:
        """Rank 0's progress display, once the snapshot has said where the run stands (the loggers are
        callbacks: disttrain.loggers)."""
        t = self.cfg.trainer
        self.progress = Progress(self.total_steps, self.counters.step, t.log_every_steps, self.env.is_main)

    def _close_reporting(self, clean: bool) -> None:
        if self.progress is not None:
            self.progress.close()
        error = None if clean else sys.exc_info()[1]  # (in fit()'s finally: the error on its way out)
        if error is not None and self.callbacks.handlers["on_exception"]:
            try:
                self.callbacks.fire("on_exception", self.run_view, error)
            except CallbackError as e:  # the run's own error is the one to report
                log.warning("%s", e)

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self._on_log and self.env.is_main:
            self.callbacks.fire("on_log", self.run_view, record)

    def _log_step(self, result: StepResult, data_time: float, step_time: float, log_line: bool) -> None:
        """One line of metrics.jsonl (fields: disttrain.metrics) and on_log, and the progress display. All
        from values the step already has on the host: no device sync here, except on the steps that log
        a step function's extra metrics (`log_line`: every trainer.log_every_steps and at the end of an
        epoch), where the ranks average them over items (one all-reduce). On more than one process the
        line waits for its loss, the ranks' sum (_log_summed_losses)."""
        extra = self.train_metrics.read(self.env.world_size) if log_line and self.train_metrics else None
        record: dict[str, Any] | None = None
        if self.env.is_main:
            c, verdict = self.counters, result.verdict
            samples_per_s = result.samples / step_time
            record = {
                "step": c.step,
                "epoch": c.epoch,
                "loss": None,  # below, or once the ranks have summed it
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": result.grad_norm,
                "skipped": not verdict.apply,
                "explosion": verdict.explosion,
                "samples_per_s": samples_per_s,
                "step_time_s": step_time,
                "data_time_s": data_time,
            }
            if result.items is not None:
                record["tokens_per_s"] = result.items / step_time
            if self.peak_samples_per_s:
                record["mfu"] = samples_per_s / self.peak_samples_per_s
            if self.on_cuda:
                # The allocator's own counters, read on the host: per step, since the previous reset.
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
                torch.cuda.reset_peak_memory_stats(self.env.device)
            if result.grad_flow is not None:
                record["grad_flow"] = result.grad_flow
            if extra:
                record.update({f"train_{name}": value for name, value in extra.items()})
        if self.env.world_size == 1:
            self._log_loss(
                result, record, result.loss_sum / result.loss_over if result.loss_over else math.nan
            )
        else:
            self._unlogged.append((result, record, time.perf_counter()))

    def _log_summed_losses(self) -> None:
        """Log the steps that wait for their loss: the ranks sum their parts of every such step in one
        all-reduce (one a step cost 6% of the seed MLP's DDP step on gloo). Called where every rank is
        at the same step with the same steps waiting: at the stop agreement (ten times a second), before
        a validation line, and at a snapshot (which writes the metrics out), so a line is at most that
        late and every snapshot's metrics are whole."""
        waiting, self._unlogged = self._unlogged, []
        if waiting:
            losses = self._step_losses([result for result, _, _ in waiting])
            for (result, record, ended), loss in zip(waiting, losses, strict=True):
                self._log_loss(result, record, loss, ended)

    def _log_loss(
        self, result: StepResult, record: dict[str, Any] | None, loss: float, ended: float | None = None
    ) -> None:
        """A step's loss is known: its line goes out (rank 0), and the run's last and epoch's losses move."""
        self.counters.last_loss = loss
        self._epoch_loss += loss
        if record is not None:
            record["loss"] = loss
            self._log(record)
            assert self.progress is not None
            samples = result.samples
            self.progress.update(
                record["step"], record["epoch"], loss, samples, record["samples_per_s"], ended
            )

    def _print_epoch(self, train_loss: float, seconds: float, steps: int) -> None:
        if self.progress is None:
            return
        c = self.counters
        val = f"  val loss {c.last_val_loss:.4f}" if self.val_loader is not None else ""
        samples = steps * self.cfg.trainer.batch_size * self.accumulate * self.env.world_size
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
        return summary
