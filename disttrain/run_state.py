"""Where a run stands, as plain data: the counters a snapshot saves, the RNG state of a process, the
numbers one optimizer step reports, and the seeds of a run's processes."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch

from disttrain.health import Verdict


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
    #: window on all ranks, is the sum over ranks of `loss_sum` / `loss_over` (reporting.global_losses).
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
