"""The ranks' agreement to stop at the same step, whichever rank was asked.

A signal reaches the ranks at different steps, or one rank only (SLURM signals a job step, torchrun its
process group), and a callback may ask on one rank only; yet every rank must stop at the same step, or
one would snapshot alone and wait forever in its next collective. So the ranks agree with an all-reduce
(MAX) of [signal, steps until the next agreement, a callback's stop], started at a step boundary and
read one step later while it ran in the background. Each rank proposes as many steps as take
STOP_CHECK_SECONDS: the all-reduce runs about ten times a second whatever the step time (one every step
would cost a small DDP step a few percent on gloo: docs/benchmarks.md), every rank reads the same result
at the same step, and they stop together at most STOP_CHECK_SECONDS and two steps after the request.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from disttrain.dist import DistEnv

#: Seconds of training between two agreements of the ranks.
STOP_CHECK_SECONDS = 0.1


class StopAgreement:
    """Stop requests (a signal, a callback's) and the ranks' agreement on them. A callback is known by
    its index among the run's callbacks (0-based); 0 in the flags means "none"."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.signal = 0
        self.callback = 0  # 1 + the index of the callback that asked the run to stop
        self.agreed = 0  # the same, asked by every rank at once (RunView.request_stop(all_ranks=True))
        # The agreement in flight and its tensor, the step at which the next one starts, and
        # (step, time) when the last one started.
        self._flag = torch.zeros(3)
        self._work: Any = None
        self._next_step = 0
        self._started_at: tuple[int, float] | None = None

    def request_signal(self, signum: int) -> None:
        """Signal-handler safe: only sets a flag. The first signal names the stop; later ones change
        nothing."""
        self.signal = self.signal or signum

    def request_callback(self, index: int, all_ranks: bool) -> bool:
        """A callback's stop; with `all_ranks`, every rank asks at this same event, so the run stops at
        this step without waiting for the agreement. True if it is the run's first stop request."""
        if all_ranks and not self.agreed:
            self.agreed = 1 + index
        first = not self.callback
        self.callback = self.callback or 1 + index
        return first

    def asked(self, step: int, before_agreement: Callable[[], None]) -> bool:
        """Whether the run stops at this step boundary, the same answer on every rank. `before_agreement`
        runs where the ranks are about to meet (the run logs the losses that wait for the ranks there)."""
        if self.agreed:
            self.callback = self.agreed
            return True
        if self.env.world_size == 1:
            return bool(self.signal or self.callback)
        if self._work is not None and self._started_at is not None:  # one started, with its step
            self._work.wait()
            signum, interval, callback = (int(v) for v in self._flag.tolist())
            self._work = None
            if signum or callback:
                self.signal, self.callback = signum, callback
                return True
            self._next_step = self._started_at[0] + interval
        if step >= self._next_step:
            before_agreement()
            now, proposal = time.perf_counter(), 1
            if self._started_at is not None:
                last_step, last_time = self._started_at
                proposal = max(1, int(STOP_CHECK_SECONDS * (step - last_step) / (now - last_time)))
            self._started_at = (step, now)
            self._flag = torch.tensor([self.signal, proposal, self.callback], device=self.env.device)
            self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        return False

    def reason(self, callback_name: Callable[[int], str]) -> str:
        """What stopped the run, once asked() said so."""
        if self.signal:
            return f"stopped by signal {signal.Signals(self.signal).name}"
        return f"stopped by callback {callback_name(self.callback - 1)}"

    def finish(self, clean: bool) -> None:
        """The agreement in flight is done before the process group goes: every rank has one, so waiting
        for it after a clean end cannot hang (after an error, another rank may never join it)."""
        if clean and self._work is not None:
            self._work.wait()
        self._work = None
