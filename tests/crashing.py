"""A model that crashes on cue, for the tests of restarts and failed jobs (test hooks live in tests, not
in the package): the seed's MLP language model whose last rank exits with code 1 right before the
optimizer step `crash_at_step`, once per `marker` file. Same parameters, same initialisation and the
same state-dict keys as MLPLanguageModel, so a job that survives the crash ends on the same weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from disttrain.models import MLPLanguageModel


class CrashOnce(MLPLanguageModel):
    def __init__(self, crash_at_step: int, marker: str, accumulate: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.crash_at_step, self.marker, self.accumulate = crash_at_step, Path(marker), accumulate
        self.train_forwards = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.train_forwards += 1
            last_rank = int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1
            step = (self.train_forwards - 1) // self.accumulate + 1
            if last_rank and step == self.crash_at_step and not self.marker.exists():
                self.marker.touch()
                print(f"tests.crashing: rank {os.environ.get('RANK', '0')} crashing", file=sys.stderr)
                sys.stderr.flush()
                os._exit(1)
        return super().forward(idx)
