"""disttrain.profiler.Profiler: one chrome trace per rank and window that parses, with the window's steps.
(Per rank on 2 processes: tests/test_fsdp.py's kill-and-resume test profiles its reference run.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from disttrain.config import TrainConfig, TrainerConfig
from disttrain.data import RandomRegression
from disttrain.profiler import Profiler
from disttrain.trainer import Trainer, seed_everything


def test_each_window_writes_a_trace_that_parses(tmp_path) -> None:
    seed_everything(0)
    model = nn.Linear(20, 1)
    cfg = TrainConfig(run_dir=str(tmp_path), trainer=TrainerConfig(batch_size=8, max_steps=9, val_fraction=0))
    profiler = Profiler(wait=1, warmup=1, active=2, repeat=2)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), RandomRegression(size=96), cfg,
            callbacks={"profiler": profiler}).fit()  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "profile").iterdir())
    # Steps 1-4 and 5-8: waited, warmed up, recorded twice; each file names the window's last step.
    assert names == ["rank00000.step00000004.trace.json", "rank00000.step00000008.trace.json"]
    for name in names:
        trace = json.loads((tmp_path / "profile" / name).read_text())
        steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
        assert len(steps) == 2, steps


def test_bad_arguments_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"^Profiler wait=1, warmup=1, active=0, repeat=1: must be"):
        Profiler(active=0)
