"""scripts/gpu_check.sh --cpu: every GPU check runs on CPU/gloo at tiny sizes, or says it needs CUDA;
none fails, and the table is printed (the CUDA path needs a GPU machine: README, "GPU check")."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, env

pytestmark = pytest.mark.slow  # every test here starts processes

#: Check (as the table names it, its start) -> what it must say in CPU mode.
EXPECTED = {
    "process group, 1 process": "ok",
    "process group, 2 processes": "ok",
    "bf16 training": "ok",
    "fp16 training": "ok",
    "FSDP bf16 (MixedPrecisionPolicy), 2 processes": "ok",
    "FSDP fp16 (+ ShardedGradScaler), 2 processes": "ok",
    # Left out here (--skip): tests/test_fsdp.py::test_compile_trains_and_says_when_it_captures_nothing
    # trains compiled against eager through the CLI (losses within 1e-4, this check's CPU bound is 2e-3),
    # and tests/test_bench_fsdp.py times trainer.compile=true; the row's own code runs on a GPU machine.
    "torch.compile": "skipped",
    "profiler trace + CUDA memory snapshots": "ok",
    # disttrain's StrategyConfig has no such option: said, not invented.
    "SyncBatchNorm option": "not available",
    "peak memory + Trainer MFU": "needs CUDA",
    "scripts/bench.py --device cuda": "needs CUDA",
    "scripts/bench_fsdp.py --device cuda": "needs CUDA",
    "FSDP x4 state + meta build, activation checkpointing": "ok",
}


def test_gpu_check_cpu_mode_prints_the_table_and_nothing_fails(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        ["scripts/gpu_check.sh", "--cpu", "--skip", "torch.compile", "--json", str(out)],
        cwd=ROOT,
        env=env(PYTHON=sys.executable),  # the script's interpreter: this one
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(EXPECTED), [r["check"] for r in rows]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("check ") and "| result" in line)
    table = lines[header + 2 : header + 2 + len(rows)]
    for row, line in zip(rows, table, strict=True):
        start = next(name for name in EXPECTED if row["check"].startswith(name))
        assert row["result"] == EXPECTED[start], row
        assert row["result"] in ("ok", "needs CUDA", "not available", "skipped"), row  # none failing
        cells = [cell.strip() for cell in line.split(" | ")]
        assert cells[:2] == [row["check"], row["result"]], line
        if row["result"] == "ok":
            assert row["figure"] and row["figure"] != "-", row
    assert "FAILED" not in proc.stdout
    # The CUDA rows' code, run on CPU at toy sizes (2 processes): the figures parse, and they say what
    # sharding guarantees whatever the machine's load: less state per rank, a smaller meta build.
    scale = next(r for r in rows if r["check"].startswith("FSDP x4 state"))["figure"]
    match = re.fullmatch(
        r"state FSDP/DDP x2 ([\d.]+) \(x4 target <= 0\.30\); build meta/full x2 ([\d.]+) \(x4 target <= "
        r"0\.40\); selective: step memory x([\d.]+), step time x[\d.]+; full: step memory x([\d.]+), "
        r"step time x[\d.]+",
        scale,
    )
    assert match, scale
    state, build, selective, full = map(float, match.groups())
    assert state <= 0.55 and build < 0.9, scale
    # Recomputing every block keeps less than recomputing every other one, which keeps less than none
    # (--quick's checkpointing job is sized so that its activations, not malloc's noise, are the figure).
    assert 0 < full < selective < 1, scale
    assert f"{len(rows)} of {len(rows)} checks not failing" in proc.stdout


def test_a_skip_that_names_no_check_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--cpu", "--skip", "torch.compile,nccl"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert re.fullmatch(r"gpu_check: error: --skip='nccl': starts no check's name \(process group, .*\)\n",
                        proc.stderr)  # fmt: skip
