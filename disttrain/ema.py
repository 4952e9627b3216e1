"""An exponential moving average of the model's weights, as a callback (public events only).

    callbacks:
      ema:
        _target_: disttrain.ema.EMA
        decay: 0.999          # ema = decay * ema + (1 - decay) * weights
        start_step: 0         # until this step the average is the weights themselves
        every_n_steps: 1      # then it moves every N steps (steps start_step + N, + 2N, ...)
        validate: false       # validation runs on the averaged weights (swapped in, then back)

Under DDP every rank keeps the same average of its replica; under FSDP each rank keeps the average of
its own DTensor shards, so no rank ever holds the full model: the shards go into the snapshot's sharded
part, beside the model's, and reshard on a resume on another number of processes. `disttrain export
--ema` writes the averaged weights (with the model's buffers) as one plain file.
"""

from __future__ import annotations

from typing import Any

import torch

from disttrain.callbacks import Callback, RunView

#: The marker of an EMA's state in a snapshot (`disttrain export --ema` looks for it).
KIND = "ema"


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (in place updates reach the DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA(Callback):
    """The average of the model's floating-point parameters, updated after optimizer steps."""

    def __init__(
        self, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1, validate: bool = False
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay={decay}: must be between 0 and 1")
        if start_step < 0 or every_n_steps < 1:
            raise ValueError(
                f"EMA start_step={start_step}, every_n_steps={every_n_steps}: must be >= 0 and >= 1"
            )
        self.decay, self.start_step, self.every_n_steps = float(decay), int(start_step), int(every_n_steps)
        self.validate = bool(validate)
        self.weights: dict[str, torch.Tensor] = {}
        self.updates = 0
        self._params: list[torch.Tensor] = []
        self._averages: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] | None = None
        self._loaded = False

    # -- events -------------------------------------------------------------------------------------------
    def on_setup(self, run: RunView) -> None:
        # Shaped like the parameters (a DTensor shard each under FSDP): what a resume loads into.
        self.weights = {n: p.detach().clone() for n, p in _named(run)}
        self._averages = [_local(t) for t in self.weights.values()]
        # A tied parameter (GPT's output layer is its embedding) is averaged once and saved under
        # each of its names, as the model's state_dict has it.
        first = {id(p): n for n, p in reversed(_named(run, remove_duplicate=False))}
        for name, p in _named(run, remove_duplicate=False):
            self.weights.setdefault(name, self.weights[first[id(p)]])

    def on_fit_start(self, run: RunView) -> None:
        self._params = [_local(p.detach()) for _, p in _named(run)]  # the ones a resume loaded into
        if not self._loaded:  # a fresh run, or an EMA added on a resume: it starts from the weights now
            self._copy_weights()

    @torch.no_grad()
    def on_step_end(self, run: RunView) -> None:
        step = run.step
        if step <= self.start_step:
            self._copy_weights()
        elif (step - self.start_step) % self.every_n_steps == 0:
            torch._foreach_lerp_(self._averages, self._params, 1.0 - self.decay)
            self.updates += 1

    @torch.no_grad()
    def on_validation_start(self, run: RunView) -> None:
        if self.validate:
            self._saved = [p.clone() for p in self._params]
            torch._foreach_copy_(self._params, self._averages)
            _reshard(run)

    @torch.no_grad()
    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        if self._saved is not None:
            torch._foreach_copy_(self._params, self._saved)
            self._saved = None
            _reshard(run)

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The tensors themselves (the snapshot serialises before training goes on); DTensors go into
        # the sharded part of the snapshot, every rank's own shards.
        return {"kind": KIND, "weights": self.weights, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state.get("weights", {})
        missing = sorted(set(self.weights) - set(weights))
        if missing:
            raise ValueError(
                f"the snapshot's average lacks {len(missing)} of the model's parameters ({missing[0]}, ...)"
            )
        with torch.no_grad():
            for name, mine in self.weights.items():
                saved = weights[name]
                if saved is mine:  # a sharded snapshot loaded into this tensor already
                    continue
                if _is_dtensor(mine) and not _is_dtensor(saved):
                    # A plain snapshot's full average (every rank read it) into this rank's shards.
                    from torch.distributed.tensor import DTensor, distribute_tensor

                    assert isinstance(mine, DTensor)
                    saved = distribute_tensor(saved, mine.device_mesh, mine.placements, src_data_rank=None)
                if _local(saved).shape != _local(mine).shape:
                    raise ValueError(
                        f"the snapshot's average of {name} has shape {tuple(saved.shape)}, the model's "
                        f"{tuple(mine.shape)}"
                    )
                _local(mine).copy_(_local(saved))
        self.updates = int(state.get("updates", 0))
        self._loaded = True

    def _copy_weights(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self._averages, self._params)


def _named(run: RunView, remove_duplicate: bool = True) -> list[tuple[str, torch.Tensor]]:
    named = run.model.named_parameters(remove_duplicate=remove_duplicate)
    return [(n, p) for n, p in named if p.is_floating_point()]


def _reshard(run: RunView) -> None:
    """Under FSDP a module left unsharded (the root keeps its weights gathered after a forward) would go
    on with the weights it gathered: every FSDP module drops its gathered copy after a swap."""
    for module in run.model.modules():
        reshard = getattr(module, "reshard", None)
        if callable(reshard) and type(module).__name__.startswith("FSDP"):
            reshard()
