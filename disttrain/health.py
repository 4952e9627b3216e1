"""Gradient health: what one step's global gradient norm says, and what the run does about it.

Every decision is made from the global norm as `clip_grad_norm_` returns it: after the gradient
all-reduce and, under fp16, after unscaling, so it is the same float on every rank. All ranks therefore
skip, warn and halve the learning rate at the same steps without exchanging a message.

- A non-finite norm (inf/NaN gradients) skips the optimizer step and counts in `skipped_steps`. Under
  fp16 that is GradScaler's own overflow handling, routine while the scale settles, so only fp32 and
  bf16 warn about it.
- An explosion is a finite norm above `health.explosion_factor × trainer.grad_clip_norm` (the seed's
  SafeOptimizer: 10 × the limit). `health.on_explosion` says what it does: `warn` (clip and step as
  usual), `skip` (no optimizer step; counted in `skipped_steps`) or `halve_lr` (clip and step; after
  `health.patience` explosions in a row the learning rate is halved for the rest of the run, and the
  count starts again). A normal step ends a streak.
- `health.max_skipped_steps` skipped steps in a row (any cause) stop the run as diverged (the trainer
  counts the streak in `Counters.skip_streak`): a run that no longer trains must not run on to "done".
- Warnings come from rank 0 only, at the 1st, 2nd, 4th, 8th ... occurrence, so an explosion storm does
  not flood a SLURM log; the counters in metrics.jsonl and summary.json hold every one.

The counts live in the trainer's `Counters` and the halving in the scheduler's and optimizer's state, so
they are part of every snapshot and a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from disttrain.config import HealthConfig

log = logging.getLogger("disttrain")


class HealthCounters(Protocol):
    """The snapshot-held counts the policy reads and updates (the trainer's Counters)."""

    skipped_steps: int
    explosions: int
    explosion_streak: int
    lr_halvings: int


@dataclass(frozen=True)
class Verdict:
    #: Take the optimizer step.
    apply: bool
    #: A finite norm above the explosion limit.
    explosion: bool
    #: Halve the learning rate after this step.
    halve_lr: bool


#: The verdict of almost every step, made once (building a frozen dataclass each step costs a little).
HEALTHY = Verdict(apply=True, explosion=False, halve_lr=False)


class GradHealth:
    def __init__(self, cfg: HealthConfig, grad_clip_norm: float, precision: str, announce: bool) -> None:
        self.cfg = cfg
        # Without clipping there is no limit to measure an explosion against (validate() insists on
        # clipping for skip and halve_lr).
        self.limit = cfg.explosion_factor * grad_clip_norm if grad_clip_norm else math.inf
        self.warn_non_finite = announce and precision != "fp16"
        self.announce = announce

    def judge(self, norm: float, c: HealthCounters, step: int) -> Verdict:
        """Decide the step `step` (counted from 1) from its gradient norm, and update the counts."""
        if not math.isfinite(norm):
            c.skipped_steps += 1
            if self.warn_non_finite and _rarely(c.skipped_steps):
                log.warning(
                    "step %d: non-finite gradients (norm %s): step skipped (%d so far)",
                    step,
                    norm,
                    c.skipped_steps,
                )
            return Verdict(apply=False, explosion=False, halve_lr=False)
        if norm <= self.limit:
            c.explosion_streak = 0
            return HEALTHY
        c.explosions += 1
        c.explosion_streak += 1
        policy = self.cfg.on_explosion
        halve = policy == "halve_lr" and c.explosion_streak >= self.cfg.patience
        if halve:
            c.explosion_streak = 0
            c.lr_halvings += 1
        if policy == "skip":
            c.skipped_steps += 1
        if self.announce and (halve or _rarely(c.explosions)):
            action = "step skipped" if policy == "skip" else "clipped"
            if halve:
                action += f", learning rate halved (halving {c.lr_halvings})"
            log.warning(
                "step %d: gradient explosion %d: norm %.4g above %g (health.explosion_factor × "
                "trainer.grad_clip_norm): %s",
                step,
                c.explosions,
                norm,
                self.limit,
                action,
            )
        return Verdict(apply=policy != "skip", explosion=True, halve_lr=halve)


def _rarely(count: int) -> bool:
    """True at counts 1, 2, 4, 8, ...: enough to notice a problem, never a flood."""
    return count & (count - 1) == 0


def halve_lr(optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Halve the learning rate for the rest of the run. A schedule recomputes the rate from its base
    (LambdaLR: base × factor(step)), so the base is halved too, and warm-up or cosine go on from there;
    both live in the snapshot's optimizer and scheduler state."""
    for group in optimizer.param_groups:
        group["lr"] *= 0.5
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * 0.5 for lr in scheduler.base_lrs]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A norm of sharded (FSDP) gradients is a replicated DTensor: its value as a plain tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@torch.no_grad()
def grad_flow(module: nn.Module) -> dict[str, float]:
    """The norm of each module's own parameter gradients (children not included), keyed by module name.

    Measured by a pass over the parameters after backward, not by module backward hooks: the hooks
    would see each micro-batch's local activation gradients before the DDP all-reduce, and wrapping
    module outputs for `register_full_backward_hook` costs on every step they are registered and breaks
    in-place operations after the module. Here the norms are those of the gradients the optimizer
    applies (summed over the accumulation window, all-reduced, unscaled, before clipping), identical on
    every rank, and their root-sum-square is the logged global `grad_norm`. One host sync, on the steps
    asked for only; under FSDP a collective (every rank calls it)."""
    names, norms = [], []
    for name, sub in module.named_modules():
        grads = [p.grad for p in sub.parameters(recurse=False) if p.grad is not None]
        if grads:
            names.append(name or "(root)")
            norms.append(full(nn.utils.get_total_norm(grads)).float())
    if not norms:
        return {}
    return dict(zip(names, torch.stack(norms).tolist(), strict=True))
