"""What rank 0 shows while a run goes: a progress bar or plain progress lines, and a wandb run.

Progress: on a terminal a tqdm bar (steps, loss, samples/s, ETA) redraws in place; when stdout is not a
terminal (a SLURM log, CI, a pipe) a redrawn bar would fill the file with carriage returns, so one plain
line is printed every `trainer.log_every_steps` steps instead:

    step 200/1407  epoch 0  loss 3.0187  21,877 samples/s  eta 0:00:01

wandb (`logger=wandb`): see `WandbRun`. wandb is imported only when a run uses it.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from disttrain.config import LoggerConfig
from disttrain.snapshot import atomic_write


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


class WandbRun:
    """Rank 0's wandb run (`logger=wandb`); the other ranks have none.

    One run per run_dir, also across kills, restarts and SLURM requeues: its id is written to
    `RUN_DIR/wandb_run_id` when the run is created (so a job killed before its first snapshot still
    continues it) and kept in every snapshot's counters (which win on resume); wandb is opened with that
    id and `resume="allow"`.

    The history stays contiguous across a SIGKILL: wandb writes its log lazily (seen: a run killed at
    step 150 had 108 steps in its offline file), so steps logged before the snapshot the job resumes
    from may never have reached wandb. On start the run therefore replays metrics.jsonl (already cut back
    to the snapshot's step) from the first step wandb does not have (`run.starting_step`: the server's
    next step online, 0 offline, where every attempt writes a file of its own), and drops any later
    record of a step it already holds. So every step appears once, from one attempt or the other, with
    the same values (resume is exact).

    Files go to `RUN_DIR/wandb/` unless WANDB_DIR says otherwise.
    """

    ID_FILE = "wandb_run_id"

    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_id: str, config: dict[str, Any]) -> None:
        import os

        import wandb  # here, not at the top: wandb costs its import only to runs that log to it

        id_file = run_dir / self.ID_FILE
        if not run_id and id_file.exists():
            run_id = id_file.read_text().strip()
        if not run_id:
            run_id = secrets.token_hex(6)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(id_file, lambda f: f.write(run_id.encode()))
        self.run = wandb.init(
            project=cfg.project,
            # A str checked against WANDB_MODES: OmegaConf's schemas cannot hold the Literal wandb wants.
            mode=cfg.mode,  # type: ignore[arg-type]
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            config=config,
        )
        self.id = run_id
        self.first_step = self.run.starting_step

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """Log the records of metrics.jsonl that wandb does not hold yet (see the class doc)."""
        for row in rows:
            self.log(row)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step >= self.first_step:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def finish(self, exit_code: int, preempted: bool) -> None:
        if preempted:
            self.run.mark_preempting()  # shown as preempted, not failed, until the requeued job resumes it
        self.run.finish(exit_code=exit_code)
