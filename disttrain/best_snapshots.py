"""Keep the best K snapshots by a validation metric, besides the newest ones, as a callback.

    callbacks:
      best:
        _target_: disttrain.best_snapshots.BestSnapshots
        monitor: val_loss     # a key of the validation's metrics
        mode: min             # min: lower is better; max: higher is better
        k: 1                  # how many of the best to keep

A snapshot's score is the validation of its own step (an epoch's end has both; else set
snapshot.every_steps to a multiple of trainer.val_every_steps): snapshots without one are not
candidates. Retention keeps the K best besides the `snapshot.keep_last` newest (RunView.keep_snapshots),
so the newest good snapshot is never deleted. `RUN_DIR/best_snapshots.json` lists them, best first
(`[{"step": 120, "snapshot": "step_00000120", "val_loss": 0.71}, ...]`); the list is in the snapshot
and resumes with it.
"""

from __future__ import annotations

import json
from typing import Any

from disttrain.callbacks import Callback, RunView
from disttrain.snapshot import atomic_write, step_dir_name

FILE = "best_snapshots.json"


class BestSnapshots(Callback):
    """Protects the snapshots of the K best validations from retention."""

    def __init__(self, monitor: str = "val_loss", mode: str = "min", k: int = 1) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"BestSnapshots mode={mode!r}: must be min or max")
        if k < 1:
            raise ValueError(f"BestSnapshots k={k}: must be >= 1")
        self.monitor, self.mode, self.k = monitor, mode, int(k)
        self.best: list[tuple[int, float]] = []  # (step, value), best first
        self._validated: tuple[int, float] | None = None

    def on_fit_start(self, run: RunView) -> None:
        run.keep_snapshots(step for step, _ in self.best)

    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise ValueError(
                f"BestSnapshots monitor={self.monitor!r}: the validation has no such metric; it has "
                + ", ".join(sorted(metrics))
            )
        self._validated = (run.step, float(metrics[self.monitor]))

    def on_snapshot(self, run: RunView, step: int) -> None:
        if self._validated is None or self._validated[0] != step:
            return
        sign = 1.0 if self.mode == "min" else -1.0
        ranked = sorted([*(b for b in self.best if b[0] != step), self._validated], key=lambda b: sign * b[1])
        self.best = ranked[: self.k]
        run.keep_snapshots(s for s, _ in self.best)
        if run.is_main:
            rows = [{"step": s, "snapshot": step_dir_name(s), self.monitor: v} for s, v in self.best]
            atomic_write(run.run_dir / FILE, lambda f: f.write(json.dumps(rows, indent=1).encode()))

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "best": [list(b) for b in self.best]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("monitor") == self.monitor and state.get("mode") == self.mode:
            self.best = [(int(s), float(v)) for s, v in state["best"]][: self.k]
