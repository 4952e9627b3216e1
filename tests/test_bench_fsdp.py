"""scripts/bench_fsdp.py runs and prints every row (memory, step time, snapshot, compile) under real
torchrun; FSDP holds less per rank than DDP. Speed is never asserted: the machine is shared and the
figures are the script's output, not a test's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support import run_script

pytestmark = pytest.mark.slow  # every test here starts processes


def test_bench_fsdp_quick_prints_every_row_and_fsdp_holds_less_per_rank(tmp_path: Path) -> None:
    out = tmp_path / "bench_fsdp.json"
    # (The scale and checkpointing tables: tests/test_gpu_check.py runs them.)
    proc = run_script(
        "bench_fsdp.py", "--quick", "--only", "memory,step,snapshot,compile", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    rows, printed = report["rows"], proc.stdout
    labels = [
        "ddp x2",
        "fsdp x2",
        "FSDP / DDP per-rank total",
        "FSDP / DDP step time",
        "ddp x2 (rank 0, full state)",
        "fsdp x2 (sharded, DCP)",
        "trainer.compile=false",
        "trainer.compile=true",
        "compiled / eager step time",
    ]
    for label in labels:
        assert any(r["label"] == label for r in rows), (label, [r["label"] for r in rows])
        assert f"\n{label} " in printed, label
    for table in ("memory", "step", "snapshot", "compile"):
        assert f"\n## {table}: " in printed, table
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isfinite(value) and value >= 0, (row["label"], key, value)
    for row in rows:
        if "step_ms" in row or "snapshot_ms" in row or "ratio" in row:
            assert any(row.get(k, 0) > 0 for k in ("step_ms", "snapshot_ms", "ratio")), row

    # Structural, not timed: FSDP shards parameters, gradients and optimizer state over the 2 ranks.
    ddp, fsdp = (
        next(r for r in rows if r["table"] == "memory" and r["label"] == f"{s} x2") for s in ("ddp", "fsdp")
    )
    for key in ("params", "grads", "optimizer", "total"):
        assert 0 < fsdp[key] < ddp[key], (key, fsdp[key], ddp[key])
    for key in ("params", "grads"):  # the shards add up to the whole, which DDP holds on every rank
        assert sum(fsdp[f"{key}_per_rank"]) == ddp[key] == ddp[f"{key}_per_rank"][1], key
    ratio = next(r for r in rows if r["label"] == "FSDP / DDP per-rank total")
    assert ratio["ratio"] < 0.6, ratio
    assert report["meta"]["command"].startswith("python scripts/bench_fsdp.py --quick")
    assert len(report["meta"]["load_average"]) == 2
