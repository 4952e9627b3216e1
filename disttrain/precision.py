"""How a step's numbers are computed: the forward's autocast, and fp16's loss scaling.

    precision = make_precision("fp16", strategy)
    with precision.autocast():
        loss = ...
    precision.backward(loss)
    precision.unscale(optimizer)         # gradients in real units: clip and judge them now
    precision.step(optimizer, apply)     # the optimizer step (unless skipped), and the scale's update

The strategy says what autocast runs in (FSDP2 casts its parameters itself, so it asks for none) and
which scaler fits its gradients (FSDP's sharded one); this object owns nothing else, so the step reads
the same for every precision.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from disttrain.strategy import Strategy

#: A reusable empty context: fp32 enters no autocast at all (a disabled one still costs its calls).
NO_CONTEXT = contextlib.nullcontext()


class Precision:
    """fp32: no autocast, no scaling; bf16: autocast (where the strategy asks for it)."""

    #: fp16's GradScaler (a sharded one under FSDP), else None.
    scaler: Any = None

    def __init__(self, strategy: Strategy) -> None:
        self.device_type = strategy.env.device.type
        self.dtype = strategy.autocast_dtype()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return NO_CONTEXT
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradients in real units (a no-op unless the loss was scaled)."""

    def step(self, optimizer: torch.optim.Optimizer, apply: bool) -> None:
        if apply:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (a snapshot written under fp16 holds a scale this precision does not use)."""


class LossScaled(Precision):
    """fp16: autocast, and a GradScaler that scales the loss so small gradients survive fp16, skips the
    optimizer step when they overflowed, and moves its scale."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self.scaler = strategy.make_scaler()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, apply: bool) -> None:
        if apply:
            self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return dict(self.scaler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:  # (a snapshot of another precision has no scale: the scaler starts as new)
            self.scaler.load_state_dict(state)


def make_precision(name: str, strategy: Strategy) -> Precision:
    """trainer.precision: fp32 | bf16 (autocast) | fp16 (autocast and loss scaling)."""
    return LossScaled(strategy) if name == "fp16" else Precision(strategy)
