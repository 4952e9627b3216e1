"""The Trainer: a run's life, read top to bottom, built from parts that each do one job.

    trainer = Trainer(model, optimizer, dataset, cfg)   # cfg: disttrain.config.TrainConfig
    summary = trainer.fit()

Launch the same script with `python train.py` (one process), `torchrun --nproc-per-node=2 train.py`
(DDP over gloo on CPU, nccl on GPUs) or `srun python train.py`; the Trainer reads its place in the job
from the environment.

The parts: the strategy (how the model runs on the job's processes: disttrain.strategy), the precision
(disttrain.precision), the step (one optimizer step over a window of micro-batches:
disttrain.training_step), the validator (disttrain.validation), the stop agreement between ranks
(disttrain.stop_agreement), reporting (metrics.jsonl and the progress display: disttrain.reporting),
and the checkpointer with the run's durable state (disttrain.checkpointer). Callbacks see the run
through disttrain.callbacks.RunView. The Trainer owns the loop: epochs, windows, when to validate,
snapshot and stop.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from disttrain import runlock
from disttrain.callbacks import Callbacks, RunView
from disttrain.checkpointer import Checkpointer, RunState, class_name
from disttrain.config import (
    ConfigError,
    OptimConfig,
    TrainConfig,
    accumulate_for,
    checked,
    resolve_strategy,
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
from disttrain.loggers import with_config_loggers
from disttrain.metrics import params_sha256, peak_samples_per_s, write_summary
from disttrain.precision import make_precision
from disttrain.reporting import Reporter
from disttrain.run_state import Counters, StepResult, rng_state, seed_everything
from disttrain.snapshot import RunFileError, SnapshotError, step_dir_name
from disttrain.step import DefaultStep, Step, callable_name, collate
from disttrain.stop_agreement import StopAgreement
from disttrain.strategy import check_built, compiler_missing, make_strategy
from disttrain.streams import StreamLoader, is_stream, stream_loader
from disttrain.training_step import TrainingStep
from disttrain.validation import Validator

__all__ = ["Trainer", "make_optimizer", "rng_state", "seed_everything"]

log = logging.getLogger("disttrain")
# The schedule advances with every optimizer step, applied or skipped (non-finite gradients): torch
# warns once when the first step is skipped, which fp16 does by design.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

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


def make_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    cfg: TrainConfig
    env: DistEnv
    run_dir: Path
    model: nn.Module  # as wrapped by the strategy; `self.module` is the user's model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    counters: Counters

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
        check_built(model, resolve_strategy(cfg, world_size), placement().rank if env is None else env.rank)
        self.callbacks = Callbacks(with_config_loggers(callbacks, cfg.logger))
        patience = cfg.trainer.early_stop_patience
        if patience and EARLY_STOP not in self.callbacks.named:  # the config's shorthand for the callback
            early_stop = EarlyStopping(monitor="val_loss", patience=patience)
            self.callbacks = Callbacks({**self.callbacks.named, EARLY_STOP: early_stop})
        self._on_step_end = self.callbacks.handlers["on_step_end"]  # (looked up once: it fires every step)
        self.run_view = RunView(self)
        # What a dataset declares is read before training_splits() wraps it in a Subset: its loss,
        # whether its samples all carry the same loss items (disttrain.step.DefaultStep), and a
        # vocabulary (a token dataset: tokens_per_s counts its targets).
        counts_tokens = hasattr(dataset, "vocab_size") and step is None
        loss = t.loss if t.loss != "auto" else getattr(dataset, "loss", "cross_entropy")
        if step is not None and not cfg.step:
            cfg.step = {"_target_": callable_name(step)}  # what a resume compares
        step = step or DefaultStep(model, loss, loss_fn, getattr(dataset, "loss_items", "targets"))
        dataset, val_dataset = training_splits(dataset, val_dataset, t, world_size)
        if not is_stream(dataset):  # (a stream's tail is known only as it runs)
            check_tail_for_batchnorm(model, len(dataset), t, world_size)  # type: ignore[arg-type]
        if t.num_threads:
            torch.set_num_threads(t.num_threads)

        # The job's processes, and how the model runs on them.
        self._owns_process_group = env is None and not dist.is_initialized()
        self.env = env = env or setup_distributed(t.device, t.timeout_s)
        self.run_dir = Path(cfg.run_dir)
        self.strategy = make_strategy(resolve_strategy(cfg, env.world_size), env, cfg.strategy, t.precision)
        self.model, self.module = self._wrap(model, optimizer)
        self.optimizer = optimizer
        self.precision = make_precision(t.precision, self.strategy)

        # The data, and the run's length in steps.
        accumulate = accumulate_for(t, env.world_size)
        #: Samples of one optimizer step on all ranks, and of one epoch (a multiple of it with drop_last).
        self.global_batch = env.world_size * t.batch_size * accumulate
        loading = (t.batch_size, t.num_workers, env.device.type == "cuda", collate_fn or collate)
        #: A user's IterableDataset (disttrain.streams): its windows, their size agreed by the ranks.
        self.stream: StreamLoader | None = None
        self.loader: InProcessLoader | WorkerLoader
        self.sampler: EpochSampler | None = None
        if is_stream(dataset):
            self.stream = StreamLoader(dataset, env, accumulate, *loading, drop_last=t.drop_last)  # type: ignore[arg-type]
            self.loader, self.epoch_samples = self.stream.loader, 0
            steps_per_epoch = self.stream.steps_per_epoch()  # 0: unknown (trainer.max_steps ends the run)
        else:
            n = len(dataset)  # type: ignore[arg-type]
            self.epoch_samples = n - n % self.global_batch if t.drop_last else n
            self.sampler = self.strategy.sampler(dataset, t.shuffle, seed=t.seed, length=self.epoch_samples)
            self.loader = make_loader(dataset, self.sampler, *loading)
            steps_per_epoch = math.ceil(self.epoch_samples / self.global_batch)
        self.val_loader: InProcessLoader | WorkerLoader | None = None
        if is_stream(val_dataset):
            self.val_loader = stream_loader(val_dataset, *loading)  # type: ignore[arg-type]
        elif val_dataset is not None:
            val_sampler = self.strategy.sampler(val_dataset, shuffle=False, seed=t.seed, pad=True)
            self.val_loader = make_loader(val_dataset, val_sampler, *loading)
        total_steps = t.max_epochs * steps_per_epoch
        self.total_steps = min(total_steps or t.max_steps, t.max_steps) if t.max_steps else total_steps
        self.scheduler = scheduler or make_scheduler(cfg.optim, optimizer, self.total_steps)
        self.accumulate = accumulate

        # The parts.
        self.counters = Counters()
        #: Whether the learning rate changes once warm-up is over (a user's scheduler may change it).
        lr_moves = scheduler is not None or cfg.optim.schedule != "constant"
        self.training_step = TrainingStep(
            step, self.model, self.module, optimizer, self.scheduler, lr_moves, self.strategy,
            self.precision, cfg, env, self.counters, self.callbacks, self.run_view, self.loader,
            counts_tokens, accumulate,
        )  # fmt: skip
        self.validator = None
        if self.val_loader is not None:
            self.validator = Validator(
                self.val_loader, step, self.model, self.precision, env, t.batch_size, self.counters,
                self.callbacks, self.run_view,
            )  # fmt: skip
        peak = peak_samples_per_s(self.module, env.device, t.precision, t.peak_tflops, env.world_size)
        step_metrics = self.training_step.metrics
        self.reporter = Reporter(
            cfg, env, self.counters, self.callbacks, self.run_view, optimizer, peak, step_metrics
        )
        self.stop = StopAgreement(env)
        state = RunState(self.counters, self.scheduler, self.precision, self.callbacks)
        self.checkpointer = Checkpointer(
            cfg, env, self.strategy, self.model, self.module, optimizer, state, self.stream
        )
        self.snapshots = self.checkpointer.snapshots
        self._stop_reason = ""
        self._fitted = False
        #: Why the run diverged (the skipped steps, or the parameters that are not finite), if it did.
        self._diverged = ""
        seed_everything(t.seed + env.rank)

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

    @property
    def grad_norm(self) -> float:
        """The latest step's gradient norm, before clipping."""
        return self.training_step.grad_norm

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
            self.checkpointer.load()
            self.reporter.open(self.total_steps)
            try:
                summary = self._train()
            except RunFileError as e:  # metrics.jsonl or summary.json: say what is left to resume from
                raise RunFileError(f"{e}; {self.snapshots.newest_good()}") from None
            clean = True
            return summary
        finally:
            self.stop.finish(clean)
            self.reporter.close(clean)
            with contextlib.suppress(RunFileError):  # closed already unless an error is on its way out
                self.reporter.metrics.close()
            self.snapshots.settle()  # what this run leaves is final before the run dir is let go
            release()
            if self._owns_process_group:
                # The group goes now, and so must the DDP wrapper, whose reducer holds it: a gloo group
                # still alive at interpreter exit can abort the process (dist.teardown).
                self.model = self.training_step.model = self.checkpointer.model = self.module
                if self.validator is not None:
                    self.validator.model = self.module
                teardown(clean)

    def _train(self) -> dict[str, Any]:
        self._compile_check_step = self.counters.step + COMPILE_CHECK_STEPS
        start = time.perf_counter()
        self.callbacks.fire("on_fit_start", self.run_view)
        while not self._should_stop():
            self._run_epoch()
        if self._stop_reason.startswith("stopped by") and self.checkpointer.step != self.counters.step:
            self._save_snapshot()  # stopped before its first step: a stop promises a snapshot of its step
        # Rank 0 commits the last snapshot on its own thread: wait for it (a failure stops the run in one
        # line) before the summary says the run is done, and before a SLURM requeue ends the job.
        self.reporter.log_summed_losses()  # (a snapshot has logged them all already; no rank waits on this)
        self.snapshots.wait()
        self.reporter.metrics.close()
        if self._diverged and self.env.is_main:
            log.error("%s", self._diverged_line())
        summary = self._summary(time.perf_counter() - start)
        self.callbacks.fire("on_fit_end", self.run_view, summary)  # a logger adds its run id to it
        if self.env.is_main:
            write_summary(self.run_dir, summary)
        return summary

    def _run_epoch(self) -> None:
        c, k, world, stream = self.counters, self.accumulate, self.env.world_size, self.stream
        if self.sampler is not None:
            # Before the iterator exists: with workers, a late set_epoch would replay the previous order.
            # Mid-epoch (after a resume) the sampler starts at this rank's share of the samples consumed:
            # rank r's i-th sample is the (r + i·world)-th of the epoch's one permutation, whatever world is.
            self.sampler.set_epoch(c.epoch, start=c.samples_in_epoch // world)
            # The loader draws its workers' seed from its own generator, not the global RNG, so a restored
            # RNG is the one the first life had, before or after iter().
            self.loader.generator = torch.Generator().manual_seed(self.cfg.trainer.seed + c.epoch)
        self.checkpointer.restore_rng()
        self.callbacks.fire("on_epoch_start", self.run_view)
        if stream is not None:
            stream.start_epoch(c.epoch, self.cfg.trainer.seed + c.epoch)
        batches = iter(self.loader) if stream is None else iter(())
        n, whole = self.epoch_samples, self.global_batch
        t = self.cfg.trainer
        self.reporter.epoch_loss, epoch_steps, epoch_start = 0.0, 0, time.perf_counter()
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
                    mine = self.training_step.micro_batches(size, self.env.rank)
                    window = list(itertools.islice(batches, mine))
            data_time = time.perf_counter() - tick
            result = self.training_step(window, size, micro)
            c.step += 1
            if t.compile and self._compile_check_step == c.step:
                self._say_how_compile_went()
            c.samples_in_epoch += size
            epoch_steps += 1
            epoch_done = last if stream is not None else c.samples_in_epoch == n
            log_line = epoch_done or c.step % t.log_every_steps == 0
            self.reporter.log_step(result, data_time, time.perf_counter() - tick, log_line)
            if self._on_step_end:
                self.callbacks.fire("on_step_end", self.run_view)
            if epoch_done:
                # Let the loader see the end of the epoch, else its next iterator continues this one.
                next(batches, None)
                c.epoch, c.samples_in_epoch = c.epoch + 1, 0
            if epoch_done or (t.val_every_steps and c.step % t.val_every_steps == 0):
                self._validate()
            self._count_skips(result)
            stopping = self._should_stop()
            every = self.cfg.snapshot.every_steps
            if epoch_done or stopping or (every and c.step % every == 0):
                self._save_snapshot()
                stopping = stopping or self._should_stop()  # parameters that are not finite stop the run
            if epoch_done:  # (the snapshot has logged every step's loss: the epoch's loss is whole)
                self._close_epoch(epoch_steps, epoch_start)
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
        if self.checkpointer.step != c.step:
            self._save_snapshot()
        self._close_epoch(epoch_steps, epoch_start)

    def _close_epoch(self, epoch_steps: int, epoch_start: float) -> None:
        """The epoch's line (if it had steps in this life) and on_epoch_end."""
        if epoch_steps:
            seconds = time.perf_counter() - epoch_start
            samples = epoch_steps * self.global_batch
            self.reporter.epoch_line(epoch_steps, samples, seconds, self.validator is not None)
        self.callbacks.fire("on_epoch_end", self.run_view)

    def _validate(self) -> None:
        if self.validator is None:
            return
        self.reporter.log_summed_losses()  # the step lines before this validation's line
        record = self.validator()
        self.reporter.log(record)
        metrics = {key: value for key, value in record.items() if key.startswith("val_")}
        self.callbacks.fire("on_validation_end", self.run_view, metrics)

    def _save_snapshot(self) -> None:
        if (bad := self.checkpointer.nonfinite_state()) is not None:
            # The newest snapshot is what a resume starts from: weights that are not finite would make
            # every later attempt train nothing. The run stops as diverged instead.
            why = f"the model's state is not finite (the first: {bad})"
            self._diverged = f"{self._diverged}; {why}" if self._diverged else why
            self._stop_reason = "diverged"
            return
        step = self.counters.step
        self.callbacks.fire("on_before_snapshot", self.run_view, step)
        self.reporter.log_summed_losses()  # every rank is at this step; the counters hold its loss
        self.reporter.metrics.flush()  # every line up to this step reaches the file before the snapshot does
        self.checkpointer.save()
        self.callbacks.fire("on_snapshot", self.run_view, step)

    # -- stopping ---------------------------------------------------------------------------------------
    def request_stop(self, signum: int = signal.SIGTERM, *_: Any) -> None:
        """Signal-handler safe: only sets a flag; the run stops and snapshots at the next step boundary,
        every rank at the same step. The first signal names the stop; later ones change nothing."""
        self.stop.request_signal(signum)

    def request_callback_stop(self, name: str, reason: str, all_ranks: bool = False) -> None:
        """A callback's stop (RunView.request_stop): like a signal's, agreed by the ranks; or at this
        step, when every rank asks at once (all_ranks)."""
        if self.stop.request_callback(self.callbacks.index(name), all_ranks):
            because = f": {reason}" if reason else ""
            log.warning("step %d: callback %s asked the run to stop%s", self.counters.step, name, because)

    def _should_stop(self) -> bool:
        t, c = self.cfg.trainer, self.counters
        if self._stop_reason:
            return True
        if self.stop.asked(c.step, before_agreement=self.reporter.log_summed_losses):
            early = self.stop.agreed and self.callbacks.name_at(self.stop.agreed - 1) == EARLY_STOP
            # trainer.early_stop_patience's callback keeps its old name for the stop.
            self._stop_reason = "early_stop" if early else self.stop.reason(self.callbacks.name_at)
        elif t.max_steps and c.step >= t.max_steps:
            self._stop_reason = "max_steps"
        elif c.epoch >= t.max_epochs:
            self._stop_reason = "max_epochs"
        return bool(self._stop_reason)

    def _count_skips(self, result: StepResult) -> None:
        """health.max_skipped_steps steps skipped in a row: the run no longer trains, and stops as diverged.
        Every rank counts the same skips (the verdicts come from all-reduced values), so every rank
        stops at the same step without a message."""
        c = self.counters
        c.skip_streak = 0 if result.verdict.apply else c.skip_streak + 1
        limit, streak = self.cfg.health.max_skipped_steps, c.skip_streak
        if result.verdict.apply or not limit or streak < limit:
            return
        if not math.isfinite(result.grad_norm):
            why = f"non-finite gradients, norm {result.grad_norm}"
        elif result.verdict.explosion:
            why = "gradient explosions under health.on_explosion=skip"
        else:
            why = "windows without loss items"
        self._diverged = f"{streak} steps in a row skipped ({why}; health.max_skipped_steps={limit})"
        self._stop_reason = "diverged"

    def _diverged_line(self) -> str:
        """The one line of a run that stopped because it no longer trains: why, and what it left."""
        c = self.counters
        if self.checkpointer.step == c.step:
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

    def _summary(self, seconds: float) -> dict[str, Any]:
        c, snapshot = self.counters, self.checkpointer.step
        return {
            "steps": c.step,
            "epochs": c.epoch,
            "final_loss": c.last_loss,
            "final_val_loss": c.last_val_loss,
            "params_sha256": params_sha256(self.module),
            "world_size": self.env.world_size,
            "strategy": self.strategy.name,
            "precision": self.cfg.trainer.precision,
            "stopped": self._stop_reason,
            "snapshot": step_dir_name(snapshot) if snapshot is not None else None,
            "seconds": seconds,
            "skipped_steps": c.skipped_steps,
            "explosions": c.explosions,
            "lr_halvings": c.lr_halvings,
        }
