"""torch.profiler over a window of steps, as a callback (public events only): one trace per rank.

    callbacks:
      profiler:
        _target_: disttrain.profiler.Profiler
        wait: 1           # steps skipped after the fit starts (after a resume: after its step)
        warmup: 1         # steps profiled and thrown away (the profiler's own start-up)
        active: 3         # steps recorded
        repeat: 1         # windows (0: until the run ends)
        memory: false     # on CUDA: also a memory snapshot (torch.cuda.memory._record_memory_history)

Each window writes `RUN_DIR/profile/rank00000.step00000005.trace.json` on every rank (a chrome trace:
chrome://tracing or https://ui.perfetto.dev; step = the window's last step). With `memory` on CUDA,
each window also writes `profile/rank00000.step00000005.memory.pickle`, and so does an out-of-memory
error, `profile/rank00000.oom.memory.pickle` (https://pytorch.org/memory_viz reads both; disttrain
never reads them back). `memory_at_steps: [100, 200]` writes one on demand at those steps.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from disttrain.callbacks import Callback, RunView

log = logging.getLogger("disttrain")


class Profiler(Callback):
    """torch.profiler.profile with a wait/warmup/active schedule, stepped at every optimizer step."""

    def __init__(
        self,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        repeat: int = 1,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
        memory: bool = False,
        memory_at_steps: list[int] | tuple[int, ...] = (),
        memory_max_entries: int = 100_000,
        out: str = "profile",
    ) -> None:
        if wait < 0 or warmup < 0 or active < 1 or repeat < 0:
            raise ValueError(
                f"Profiler wait={wait}, warmup={warmup}, active={active}, repeat={repeat}: "
                "must be >= 0, >= 0, >= 1 and >= 0"
            )
        self.schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat)
        self.record_shapes, self.profile_memory, self.with_stack = record_shapes, profile_memory, with_stack
        self.memory, self.memory_at_steps = bool(memory), {int(s) for s in memory_at_steps}
        self.memory_max_entries, self.out = int(memory_max_entries), out
        self.traces: list[Path] = []
        self._profile: torch.profiler.profile | None = None
        self._run: RunView | None = None
        self._cuda_memory = False

    def _path(self, run: RunView, what: str) -> Path:
        directory = run.run_dir / self.out
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"rank{run.rank:05d}.{what}"

    def on_fit_start(self, run: RunView) -> None:
        self._run = run
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(
            activities=activities,
            schedule=self.schedule,
            on_trace_ready=self._trace_ready,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        self._profile.start()
        if (self.memory or self.memory_at_steps) and torch.cuda.is_available():
            self._start_memory_history(run)

    def on_step_end(self, run: RunView) -> None:
        if self._profile is not None:
            with warnings.catch_warnings():  # each window is its own trace: that is what it warns of
                warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
                self._profile.step()
        if self._cuda_memory and run.step in self.memory_at_steps:
            self.dump_memory(f"step{run.step:08d}.memory.pickle")

    def on_fit_end(self, run: RunView, summary: dict[str, Any]) -> None:
        if self._profile is not None:
            self._profile.stop()  # a window still open is written as it is
            self._profile = None
        if self._cuda_memory:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._cuda_memory = False

    def _trace_ready(self, profile: torch.profiler.profile) -> None:
        assert self._run is not None
        path = self._path(self._run, f"step{self._run.step:08d}.trace.json")
        profile.export_chrome_trace(str(path))
        self.traces.append(path)
        if self._cuda_memory and self.memory:
            self.dump_memory(f"step{self._run.step:08d}.memory.pickle")

    # -- CUDA memory (torch.cuda.memory: what https://pytorch.org/memory_viz shows) -------------------------
    def _start_memory_history(self, run: RunView) -> None:
        torch.cuda.memory._record_memory_history(max_entries=self.memory_max_entries)
        self._cuda_memory = True

        def on_oom(device: int, alloc: int, device_alloc: int, device_free: int) -> None:
            # Called inside the failing allocation, before the OutOfMemoryError is raised: what held the
            # memory is still there to see.
            self.dump_memory("oom.memory.pickle")

        torch._C._cuda_attach_out_of_memory_observer(on_oom)  # type: ignore[attr-defined]

    def dump_memory(self, name: str) -> Path | None:
        """Write this rank's CUDA memory snapshot now (on demand) into the profile directory."""
        if self._run is None or not self._cuda_memory:
            return None
        path = self._path(self._run, name)
        torch.cuda.memory._dump_snapshot(str(path))
        log.info("rank %d: CUDA memory snapshot written to %s", self._run.rank, path)
        return path
