"""Two callbacks of a user's own, written against disttrain's public events only."""

from __future__ import annotations

import csv
from typing import Any

import disttrain


class StepsCSV(disttrain.Callback):
    """Rank 0 writes every step's loss and learning rate to `<run dir>/steps.csv`, each step once: on a
    resume it drops the rows past the snapshot's step (a killed run wrote steps it then redoes)."""

    def on_fit_start(self, run: disttrain.RunView) -> None:
        self.path = run.run_dir / "steps.csv"
        if not run.is_main:
            return
        rows = list(csv.reader(self.path.open())) if self.path.exists() else [["step", "loss", "lr"]]
        kept = [rows[0], *(r for r in rows[1:] if int(r[0]) <= run.step)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)

    def on_log(self, run: disttrain.RunView, record: dict[str, Any]) -> None:  # rank 0's lines
        if "loss" in record:
            with self.path.open("a", newline="") as f:
                csv.writer(f).writerow([record["step"], record["loss"], record["lr"]])


class StopBelow(disttrain.Callback):
    """Stops the run once the loss has stayed below `target` for `patience` steps in a row. Its count is
    in the snapshot, so a resumed run goes on counting where the stopped one was."""

    def __init__(self, target: float, patience: int = 5) -> None:
        self.target, self.patience, self.below = target, patience, 0

    def on_step_end(self, run: disttrain.RunView) -> None:
        # run.metrics["loss"] is the ranks' mean, the same on every rank: every rank counts alike.
        self.below = self.below + 1 if run.metrics["loss"] < self.target else 0
        if self.below >= self.patience:
            run.request_stop(f"loss below {self.target} for {self.below} steps")

    def state_dict(self) -> dict[str, Any]:
        return {"below": self.below}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.below = state["below"]
