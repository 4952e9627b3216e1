"""What a run says while it trains: metrics.jsonl's lines, the callbacks' `on_log`, rank 0's progress
display and its epoch lines (the loggers are callbacks: disttrain.loggers).

A step's loss is the mean over every loss item of its window on all ranks: each rank holds its part
(StepResult.loss_sum / loss_over), and on more than one process a step's line waits until the ranks sum
their parts. They sum the parts of every waiting step in one all-reduce, where the ranks meet anyway
(one a step would cost a small DDP step several percent on gloo: docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from disttrain.callbacks import CallbackError, Callbacks, RunView
from disttrain.config import TrainConfig
from disttrain.dist import DistEnv
from disttrain.metrics import ItemMeans, MetricsLog
from disttrain.progress import Progress
from disttrain.run_state import Counters, StepResult

log = logging.getLogger("disttrain")


def global_losses(results: list[StepResult], env: DistEnv) -> list[float]:
    """The steps' losses, each the mean over every loss item of its window on all ranks: the ranks' loss
    sums added up (collective on more than one process: one all-reduce for all the steps)."""
    sums = [r.loss_sum for r in results]
    if env.world_size > 1:
        summed = torch.tensor(sums, dtype=torch.float64, device=env.device)
        dist.all_reduce(summed)
        sums = summed.tolist()
    return [s / r.loss_over if r.loss_over else math.nan for s, r in zip(sums, results, strict=True)]


class Reporter:
    """metrics.jsonl (rank 0 writes; fields: disttrain.metrics), `on_log`, the progress display."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        counters: Counters,
        callbacks: Callbacks,
        run_view: RunView,
        optimizer: torch.optim.Optimizer,
        peak_samples_per_s: float | None,
        step_metrics: ItemMeans,
    ) -> None:
        """`step_metrics`: the step function's extra metrics, which the step adds up (TrainingStep)."""
        self.cfg, self.env, self.counters = cfg, env, counters
        self.callbacks, self.run_view, self.optimizer = callbacks, run_view, optimizer
        self.peak_samples_per_s = peak_samples_per_s
        self.metrics = MetricsLog(Path(cfg.run_dir) / "metrics.jsonl", enabled=env.is_main)
        self.step_metrics = step_metrics
        self.on_cuda = env.device.type == "cuda"
        self._on_log = callbacks.handlers["on_log"]
        #: Steps whose line waits for the ranks' sum of their loss (more than one process).
        self._unlogged: list[tuple[StepResult, dict[str, Any] | None, float]] = []
        self.epoch_loss = 0.0  # the sum of this epoch's step losses logged so far
        self.progress: Progress | None = None  # rank 0's bar or lines, from open() on

    def open(self, total_steps: int) -> None:
        """Once the snapshot has said where the run stands."""
        t, step = self.cfg.trainer, self.counters.step
        self.metrics.open(resume_step=step)
        self.progress = Progress(total_steps, step, t.log_every_steps, self.env.is_main)

    def close(self, clean: bool) -> None:
        """The display closes; an error on its way out (in fit()'s finally) reaches `on_exception`."""
        if self.progress is not None:
            self.progress.close()
        error = None if clean else sys.exc_info()[1]
        if error is not None and self.callbacks.handlers["on_exception"]:
            try:
                self.callbacks.fire("on_exception", self.run_view, error)
            except CallbackError as e:  # the run's own error is the one to report
                log.warning("%s", e)

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self._on_log and self.env.is_main:
            self.callbacks.fire("on_log", self.run_view, record)

    def log_step(self, result: StepResult, data_time: float, step_time: float, log_line: bool) -> None:
        """A step's line, from values the step already has on the host: no device sync here, except on the
        steps that log a step function's extra metrics (`log_line`: every trainer.log_every_steps and at
        the end of an epoch), where the ranks average them over items (one all-reduce). On more than one
        process the line waits for its loss, the ranks' sum (log_summed_losses)."""
        extra = self.step_metrics.read(self.env.world_size) if log_line and self.step_metrics else None
        record: dict[str, Any] | None = None
        if self.env.is_main:
            c, verdict = self.counters, result.verdict
            samples_per_s = result.samples / step_time
            record = {
                "step": c.step,
                "epoch": c.epoch,
                "loss": None,  # below, or once the ranks have summed it
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": result.grad_norm,
                "skipped": not verdict.apply,
                "explosion": verdict.explosion,
                "samples_per_s": samples_per_s,
                "step_time_s": step_time,
                "data_time_s": data_time,
            }
            if result.items is not None:
                record["tokens_per_s"] = result.items / step_time
            if self.peak_samples_per_s:
                record["mfu"] = samples_per_s / self.peak_samples_per_s
            if self.on_cuda:
                # The allocator's own counters, read on the host: per step, since the previous reset.
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
                torch.cuda.reset_peak_memory_stats(self.env.device)
            if result.grad_flow is not None:
                record["grad_flow"] = result.grad_flow
            if extra:
                record.update({f"train_{name}": value for name, value in extra.items()})
        if self.env.world_size == 1:
            loss = result.loss_sum / result.loss_over if result.loss_over else math.nan
            self._log_loss(result, record, loss)
        else:
            self._unlogged.append((result, record, time.perf_counter()))

    def log_summed_losses(self) -> None:
        """Log the steps that wait for their loss. Called where every rank is at the same step with the
        same steps waiting: at the stop agreement (about ten times a second), before a validation line,
        and at a snapshot (which writes the metrics out), so a line is at most that late and every
        snapshot's metrics are whole."""
        waiting, self._unlogged = self._unlogged, []
        if waiting:
            losses = global_losses([result for result, _, _ in waiting], self.env)
            for (result, record, ended), loss in zip(waiting, losses, strict=True):
                self._log_loss(result, record, loss, ended)

    def _log_loss(
        self, result: StepResult, record: dict[str, Any] | None, loss: float, ended: float | None = None
    ) -> None:
        """A step's loss is known: its line goes out (rank 0), and the run's last and epoch's losses move."""
        self.counters.last_loss = loss
        self.epoch_loss += loss
        if record is not None:
            record["loss"] = loss
            self.log(record)
            assert self.progress is not None
            self.progress.update(
                record["step"], record["epoch"], loss, result.samples, record["samples_per_s"], ended
            )

    def epoch_line(self, steps: int, samples: int, seconds: float, has_validation: bool) -> None:
        """Rank 0's line at the end of an epoch: its mean step loss (every step is logged by then: the
        epoch's snapshot logged them) and throughput."""
        if self.progress is None:
            return
        c = self.counters
        val = f"  val loss {c.last_val_loss:.4f}" if has_validation else ""
        self.progress.write(
            f"epoch {c.epoch}/{self.cfg.trainer.max_epochs}  step {c.step}  train loss "
            f"{self.epoch_loss / steps:.4f}{val}  {samples / seconds:,.0f} samples/s"
        )
