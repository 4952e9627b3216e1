"""What rank 0 shows while a run goes: a progress bar or plain progress lines.

Progress: on a terminal a tqdm bar (steps, loss, samples/s, ETA) redraws in place; when stdout is not a
terminal (a SLURM log, CI, a pipe) a redrawn bar would fill the file with carriage returns, so one plain
line is printed every `trainer.log_every_steps` steps instead:

    step 200/1407  epoch 0  loss 3.0187  21,877 samples/s  eta 0:00:01

The loggers (wandb, TensorBoard, CSV, MLflow) are callbacks: disttrain.loggers.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(self, total: int, initial: int, every: int, enabled: bool, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.total, self.every = total, every
        self.bar: Any = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=self.stream, dynamic_ncols=True)
        self._start = self._mark = time.perf_counter()
        self._initial = initial
        self._samples = 0

    def update(
        self, step: int, epoch: int, loss: float, samples: int, samples_per_s: float, at: float | None = None
    ) -> None:
        """After each optimizer step: `samples` of this step (all ranks) and its own samples/s; `at`, the
        time.perf_counter() the step ended at, when it is shown later than that."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{loss:.4f}", "samples/s": f"{samples_per_s:,.0f}"}, refresh=False)
            self.bar.update()
            return
        self._samples += samples
        if step % self.every == 0:
            now = time.perf_counter() if at is None else at
            # Rates over the whole interval since the last line, validation and snapshots included: what
            # the user waits for, not the best step.
            rate = self._samples / (now - self._mark)
            eta = (now - self._start) / (step - self._initial) * (self.total - step)
            self.write(
                f"step {step}/{self.total}  epoch {epoch}  loss {loss:.4f}  {rate:,.0f} samples/s"
                f"  eta {_clock(eta)}"
            )
            self._mark, self._samples = now, 0

    def write(self, line: str) -> None:
        """Print a line on rank 0 without tearing the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
