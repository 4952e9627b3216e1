"""Callbacks the tests use through the config (`+callbacks.NAME._target_=tests.callbacks.Recorder`) or in
Python: each does what a user's would, through the public events only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from disttrain.callbacks import Callback, RunView
from disttrain.config import SnapshotConfig, TrainConfig, TrainerConfig
from disttrain.data import RandomRegression
from disttrain.trainer import Trainer, seed_everything


class Recorder(Callback):
    """Writes every event it sees, with the step, to `out/rank<RANK>.txt` (one line each, as it happens)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def _write(self, run: RunView, what: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"rank{run.rank}.txt", "a") as f:
            f.write(f"{what} {run.step} {run.epoch}\n")

    def on_setup(self, run: RunView) -> None:
        self._write(run, "setup")

    def on_fit_start(self, run: RunView) -> None:
        self._write(run, "fit_start")

    def on_epoch_start(self, run: RunView) -> None:
        self._write(run, "epoch_start")

    def on_before_optimizer_step(self, run: RunView) -> None:
        self._write(run, "before_optimizer_step")

    def on_step_end(self, run: RunView) -> None:
        self._write(run, "step_end")

    def on_validation_start(self, run: RunView) -> None:
        self._write(run, "validation_start")

    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        self._write(run, f"validation_end {sorted(metrics)}")

    def on_before_snapshot(self, run: RunView, step: int) -> None:
        self._write(run, f"before_snapshot {step}")

    def on_snapshot(self, run: RunView, step: int) -> None:
        self._write(run, f"snapshot {step}")

    def on_epoch_end(self, run: RunView) -> None:
        self._write(run, "epoch_end")

    def on_fit_end(self, run: RunView, summary: dict[str, Any]) -> None:
        self._write(run, f"fit_end {summary['stopped']}")


class StopAt(Callback):
    """Asks the run to stop after optimizer step `step`, on rank `rank` only."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank = step, rank

    def on_step_end(self, run: RunView) -> None:
        if run.rank == self.rank and run.step == self.step:
            run.request_stop(f"step {self.step} reached on rank {self.rank}")


class StepCounter(Callback):
    """Counts the optimizer steps it has seen, across resumes (its count is in the snapshot), and
    writes the count to `out` when the run ends."""

    def __init__(self, out: str = "") -> None:
        self.out, self.steps = out, 0

    def on_step_end(self, run: RunView) -> None:
        self.steps += 1

    def on_fit_end(self, run: RunView, summary: dict[str, Any]) -> None:
        if self.out and run.is_main:
            Path(self.out).write_text(str(self.steps))

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]


class Typo(Callback):
    def on_step_ned(self, run: RunView) -> None: ...


class Raises(Callback):
    """Raises in on_step_end at step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, run: RunView) -> None:
        if run.step == self.step:
            raise ValueError(f"no good at step {run.step}")


class HandEMA(Callback):
    """The average disttrain.ema.EMA keeps, written out by hand in float64 over this rank's own weights
    (a DTensor's shard under FSDP); at the end rank 0 saves the full average to `out` (a test script's
    gather, the one thing EMA itself never does)."""

    def __init__(self, decay: float, start_step: int = 0, every_n_steps: int = 1, out: str = "") -> None:
        self.decay, self.start, self.every, self.out = decay, start_step, every_n_steps, out
        self.average: dict[str, Any] = {}

    def _weights(self, run: RunView) -> dict[str, Any]:
        return {n: p.detach().to(torch.float64) for n, p in run.model.named_parameters()}

    def on_fit_start(self, run: RunView) -> None:
        self.average = self._weights(run)

    def on_step_end(self, run: RunView) -> None:
        if run.step <= self.start:
            self.average = self._weights(run)
        elif (run.step - self.start) % self.every == 0:
            w, d = self._weights(run), self.decay
            self.average = {n: d * e + (1 - d) * w[n] for n, e in self.average.items()}

    def on_fit_end(self, run: RunView, summary: dict[str, Any]) -> None:
        full = {n: e.full_tensor() if hasattr(e, "full_tensor") else e for n, e in self.average.items()}
        if self.out and run.is_main:
            torch.save(full, self.out)


def regression_trainer(run_dir: Path, callbacks, **trainer) -> Trainer:
    """48 samples, 12 held out: steps of 8, the fifth of each epoch takes the 4 left."""
    seed_everything(0)
    model = nn.Linear(20, 1)
    cfg = TrainConfig(
        run_dir=str(run_dir),
        trainer=TrainerConfig(**{"batch_size": 8, "max_epochs": 2, "val_fraction": 0.25, **trainer}),
        snapshot=SnapshotConfig(every_steps=2),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return Trainer(model, optimizer, RandomRegression(size=48), cfg, callbacks=callbacks)


class BreaksWhenBuilt:
    """A callback whose constructor fails as user code can (a service it needs is down): not a mistake in
    the config, so exit 1."""

    def __init__(self) -> None:
        raise RuntimeError("the metrics server is down")
