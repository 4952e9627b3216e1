"""One optimizer step over an accumulation window of micro-batches: the design page's first contract.

    result = training_step(window, size)    # window: this rank's micro-batches; size: samples on all ranks

A step's gradient is that of the mean loss over all loss items of the window on all ranks, however the
items fall on micro-batches and ranks:
- items that are samples (known from the batches and `size`): each micro-batch's mean is weighted by
  world size × its samples / `size` before backward, which DDP's mean over ranks turns into the window's
  mean;
- counted items (tokens): each mean is multiplied by its count (a sum), and once the window's count on all
  ranks is known (one all-reduce, on the device) the gradients are multiplied by world size / that count,
  which also undoes DDP's mean over ranks.
One micro-batch in one process is the case where neither applies: its mean is the window's, so nothing is
weighted or rescaled, and the step is the loop a user writes by hand.

Every rank runs as many micro-batches as rank 0, which holds the most: in an epoch's last window a rank
with fewer (or none) runs a batch again, weighted by zero, so that the strategy's collectives (DDP's
all-reduce, FSDP's gathers) meet on every rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from disttrain.callbacks import Callbacks, RunView
from disttrain.config import ConfigError, TrainConfig, describe_exception
from disttrain.dist import DistEnv
from disttrain.health import GradHealth, Verdict, full, grad_flow, halve_lr
from disttrain.metrics import ItemMeans
from disttrain.precision import NO_CONTEXT, Precision
from disttrain.run_state import Counters, StepResult
from disttrain.step import (
    DefaultStep,
    Step,
    StepOutput,
    as_step_output,
    callable_name,
    describe,
    num_samples,
    to_device,
)
from disttrain.strategy import Strategy
from disttrain.streams import first_batch, is_stream

log = logging.getLogger("disttrain")


class TrainingStep:
    """The step, its gradients' health check and the optimizer's step; it reports the numbers of the
    step (StepResult) and keeps the step function's extra metrics until the reporter reads them."""

    def __init__(
        self,
        step: Step,
        model: nn.Module,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        lr_moves: bool,
        strategy: Strategy,
        precision: Precision,
        cfg: TrainConfig,
        env: DistEnv,
        counters: Counters,
        callbacks: Callbacks,
        run_view: RunView,
        loader: Any,
        counts_tokens: bool,
        accumulate: int,
    ) -> None:
        """`model` is the module as the strategy runs it, `module` the user's (what the gradients are
        read from); `lr_moves`: whether the learning rate changes once warm-up is over."""
        self.step, self.model, self.module = step, model, module
        self.optimizer, self.scheduler, self.lr_moves = optimizer, scheduler, lr_moves
        self.strategy, self.precision, self.cfg, self.env = strategy, precision, cfg, env
        self.counters, self.callbacks, self.run_view = counters, callbacks, run_view
        self.loader, self.counts_tokens, self.accumulate = loader, counts_tokens, accumulate
        t = cfg.trainer
        self.global_batch = env.world_size * t.batch_size * accumulate
        self.health = GradHealth(cfg.health, t.grad_clip_norm, t.precision, announce=env.is_main)
        # Rank 0 logs per-module norms; sharded gradients need every rank to compute them.
        mine = env.is_main or strategy.shards_parameters
        self.grad_flow_every = cfg.health.grad_flow_every if mine else 0
        self.metrics = ItemMeans()  # the step function's extra metrics, summed until read
        #: The latest step's gradient norm, before clipping (callbacks read it: RunView.metrics).
        self.grad_norm = float("nan")
        self._on_before_optimizer_step = callbacks.handlers["on_before_optimizer_step"]
        self._first_step_checked = False
        self._spare: Any = None  # this rank's latest micro-batch, the stuff of a filler (_filler)

    def micro_batches(self, size: int, rank: int) -> int:
        """Micro-batches rank `rank` holds of a window of `size` samples on all ranks: its share of them,
        perm[r::world] of the window (EpochSampler), in batches of trainer.batch_size."""
        world, batch_size = self.env.world_size, self.cfg.trainer.batch_size
        return -(-max(0, -(-(size - rank) // world)) // batch_size)

    def __call__(self, window: list[Any], size: int, micro: int | None = None) -> StepResult:
        world = self.env.world_size
        samples = list(map(num_samples, window))
        if micro is None:  # (a stream's window says it: disttrain.streams)
            micro = self.accumulate if size == self.global_batch else self.micro_batches(size, 0)
        if len(window) < micro:
            window = window + [self._filler(window)] * (micro - len(window))
            samples += [0] * (micro - len(samples))
        elif world > 1:
            self._spare = window[-1]
        whole = len(window) == 1 and world == 1  # the micro-batch's mean is the window's
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
                self.precision.backward(loss)
            losses.append(out.loss)  # detached where it is read
            counts.append(batch_items)
            if out.metrics and samples[i]:
                self.metrics.add(out.metrics, samples[i] if out.items is None else out.items)
        if counted not in (0, len(window)):
            raise ConfigError("step: returned items for some micro-batches of a window and not for others")
        self.precision.unscale(self.optimizer)  # clip and judge in real units, not scaled ones
        all_items = self._rescale_by_items(counts, whole) if counted else None
        flow = self._grad_flow() if self.grad_flow_every else None  # per-module norms
        grad_norm = self._clip_gradients()
        values = self._to_host([*losses, grad_norm, *([all_items, *counts] if counted else [])])
        micro_losses, norm_value = values[: len(window)], values[len(window)]
        if counted:  # this rank's sum of loss × items, over the items of all ranks
            window_items, local = values[len(window) + 1], values[len(window) + 2 :]
            loss_sum = sum(v * n for v, n in zip(micro_losses, local, strict=True) if n)
        else:  # this rank's sum of loss × samples, over the window's samples on all ranks
            window_items = float(size)
            loss_sum = sum(v * n for v, n in zip(micro_losses, samples, strict=True) if n)
        verdict = self._optimizer_step(norm_value, window_items)
        tokens = window_items if counted else self._targets(window, size)
        return StepResult(loss_sum, window_items, norm_value, verdict, flow, size, tokens)

    def _filler(self, window: list[Any]) -> Any:
        """A micro-batch for a rank that holds fewer than rank 0 in an epoch's last window, weighted by
        zero (its gradient adds exactly nothing): this rank's latest batch again, whole (a BatchNorm
        could not train on one sample of it). Only a rank resumed right into that window, holding none
        of it, reads a batch of the dataset's first samples (a stream's: disttrain.streams.first_batch)."""
        if window:
            return window[-1]
        if self._spare is None and is_stream(self.loader.dataset):
            self._spare = first_batch(self.loader)
        if self._spare is None:
            first = [self.loader.dataset[i] for i in range(self.cfg.trainer.batch_size)]
            self._spare = self.loader.collate_fn(first)
        return self._spare

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
        self.precision.step(self.optimizer, verdict.apply)
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
        """The step function on one micro-batch under the precision's autocast, its result checked; the
        first call also turns a batch the model cannot be called with into one line."""
        if not self._first_step_checked:
            return self._first_step(batch)
        with self.precision.autocast():
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
        hooks = []
        if not self.cfg.trainer.compile:
            hooks = [
                nn.modules.module.register_module_forward_pre_hook(enter),
                nn.modules.module.register_module_forward_hook(leave),
            ]
        try:
            with self.precision.autocast():
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
