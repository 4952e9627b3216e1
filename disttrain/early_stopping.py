"""Early stopping on a validation metric, as a callback (public events only).

    callbacks:
      early_stop:
        _target_: disttrain.early_stopping.EarlyStopping
        monitor: val_loss     # a key of the validation's metrics: val_loss, val_<your step's metric>
        mode: min             # min: lower is better; max: higher is better
        patience: 3           # validations in a row without improvement before the run stops
        min_delta: 0.0        # an improvement is by more than this

`trainer.early_stop_patience: N` is this callback with patience N on val_loss (named `early_stop`).
The validation's metrics are all-reduced, so every rank decides the same at the same validation, and
the run stops there on every rank at once (`run.request_stop(all_ranks=True)`), with a snapshot. The
best value and the count are in the snapshot: a resumed run counts on.
"""

from __future__ import annotations

import math
from typing import Any

from disttrain.callbacks import Callback, RunView


class EarlyStopping(Callback):
    """Stops the run after `patience` validations in a row without an improvement of `monitor`."""

    def __init__(
        self, monitor: str = "val_loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode={mode!r}: must be min or max")
        if patience < 1 or min_delta < 0:
            raise ValueError(
                f"EarlyStopping patience={patience}, min_delta={min_delta}: must be >= 1 and >= 0"
            )
        self.monitor, self.mode = monitor, mode
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best = math.inf if mode == "min" else -math.inf
        self.bad = 0

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise ValueError(
                f"EarlyStopping monitor={self.monitor!r}: the validation has no such metric; it has "
                + ", ".join(sorted(metrics))
            )
        value = float(metrics[self.monitor])
        if self.improved(value):
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            run.request_stop(
                f"{self.monitor} has not improved on {self.best:.6g} for {self.bad} validations",
                all_ranks=True,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "monitor": self.monitor, "mode": self.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("monitor") == self.monitor and state.get("mode") == self.mode:
            self.best, self.bad = float(state["best"]), int(state["bad"])
