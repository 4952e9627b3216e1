"""Helpers the tests share: run the real CLI, real torchrun, and read what a run leaves behind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest

from tests.hooks.sitecustomize import LOG_ENV as SLOW_WRITE_LOG_ENV
from tests.hooks.sitecustomize import SECONDS_ENV as SLOW_WRITE_ENV

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "tests" / "hooks"


def require(reason: str | None) -> None:
    """Do nothing if reason is None; else fail under CI=true, or skip with a hint elsewhere.

    Project rule: a test that needs a service (SLURM, network namespaces, a mount) FAILS when CI=true
    and the service is missing (CI must provide it), and may only skip outside CI."""
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: CI must provide this service)", pytrace=False)
    pytest.skip(f"{reason} (skipped outside CI; CI=true makes this a failure)")


#: A small job: 3,996 samples of the generated corpus, ~225 steps an epoch at batch 16. One intra-op
#: thread everywhere, so runs launched differently compute bit for bit the same floats.
SMALL = [
    "data.num_tokens=4000",
    "data.vocab_size=50",
    "trainer.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.num_threads=1",
]


#: The job every launch test runs (226 steps at world size 2), snapshots every 50 steps; the `reference`
#: fixture (conftest.py) is its parameters on one node with 2 torchrun processes.
JOB = [*SMALL, "snapshot.every_steps=50"]


def done_lines(output: str) -> dict[int, str]:
    """rank -> params_sha256 from the workers' `rank R done: ... params_sha256 X` lines (one per node)."""
    return {int(r): sha for r, sha in re.findall(r"rank (\d+) done: \d+ steps, params_sha256 (\w+)", output)}


def crash_once_at(step: int, marker: Path) -> list[str]:
    """Overrides that make the job's last rank exit 1 right before optimizer step `step`, once (the model
    `tests.crashing.CrashOnce`: the built-in MLP's weights, so a surviving job ends on the same hash)."""
    return [
        "model._target_=tests.crashing.CrashOnce",
        f"+model.crash_at_step={step}",
        f"+model.marker={marker}",
    ]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # This checkout's code whatever the cwd: a job started from tmp_path (a sweep, a SLURM job) would
    # otherwise import the disttrain pip installed, which may be another checkout's (an editable install).
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    e.pop("WORLD_SIZE", None)
    e.pop("RANK", None)
    e.update(extra)
    return e


def slow_writes(seconds: float, log: Path) -> dict[str, str]:
    """The environment (for `start` or `disttrain`) in which every snapshot write of the job, in every
    process, sleeps `seconds` before its commit and notes it in `log` (tests/hooks/sitecustomize.py):
    time for a signal to land inside a write. `slowed(log)` says whether one did."""
    path = os.pathsep.join(p for p in (str(HOOKS), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, SLOW_WRITE_ENV: str(seconds), SLOW_WRITE_LOG_ENV: str(log)}


def slowed(log: Path) -> int:
    """Snapshot writes the hook slowed (`slow_writes`): a test of a slow write asserts there was one."""
    return len(log.read_text().splitlines()) if log.exists() else 0


def disttrain(
    *args: str, cwd: Path | None = None, timeout: float = 300, **extra: str
) -> subprocess.CompletedProcess:
    """`python -m disttrain ARGS`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "disttrain", *args],
        cwd=cwd or ROOT,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python scripts/SCRIPT ARGS` from the checkout, as the README runs it."""
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(*args: str, cwd: Path | None = None, **extra: str) -> subprocess.Popen:
    """Start `python -m disttrain ARGS` in its own process group (so a kill reaches torchrun's workers)."""
    return subprocess.Popen(
        [sys.executable, "-m", "disttrain", *args],
        cwd=cwd or ROOT,
        env=env(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_at_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> int:
    """SIGKILL the whole process group once metrics.jsonl shows `step`; return the last step it showed.

    metrics.jsonl is written about once a second, so the run may have gone further than the returned
    step by the time it dies: the return value is a lower bound on how far the killed attempt got.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached = last_step(run_dir)
        if reached >= step:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return reached
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended before step {step}:\n{proc.stdout.read() if proc.stdout else ''}"
            )
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"run did not reach step {step} in {timeout} s")


def job_processes(run_dir: Path) -> list[int]:
    """Running processes of the job on `run_dir` (every one names it on its command line: `disttrain`,
    torchrun and the workers), this test's own excluded."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and str(run_dir) in cmdline:
            found.append(int(proc.name))
    return found


def gone(run_dir: Path, timeout: float = 10) -> list[int]:
    """Wait until no process of the job on `run_dir` runs; return those still running at the timeout."""
    deadline = time.monotonic() + timeout
    while (left := job_processes(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> int:
    """Wait until metrics.jsonl shows `step`; return the last step it shows."""
    deadline = time.monotonic() + timeout
    while (reached := last_step(run_dir)) < step:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"run ended before step {step}:\n{out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"run did not reach step {step} in {timeout} s")
        time.sleep(0.02)
    return reached


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()[:-1] if '"loss"' in line]
    return steps[-1] if steps else 0


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every optimizer step in metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def tree_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`: proof that nothing was touched."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def torchrun(
    script: Path, *args: str, nproc: int = 2, timeout: float = 300, **extra: str
) -> subprocess.CompletedProcess:
    """A real `torchrun --standalone` job over gloo."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(script),
            *args,
        ],
        cwd=ROOT,
        env=env(PYTHONPATH=str(ROOT), **extra),  # the script imports tests' own models
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def python_api_fit(run_dir: Path) -> None:
    """The Python API on the small job: what a user's own script (or each rank of it under torchrun) runs."""
    import torch

    from disttrain import TrainConfig, Trainer
    from disttrain.data import TokenCorpus
    from disttrain.models import MLPLanguageModel

    cfg = TrainConfig(run_dir=str(run_dir))
    cfg.trainer.batch_size, cfg.trainer.num_threads = 16, 1
    model = MLPLanguageModel(vocab_size=50)
    data = TokenCorpus(vocab_size=50, num_tokens=4000)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, cfg).fit()


def numeric_fields(cls: type | None = None, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every int and float field of the schema (TrainConfig by default), as (dotted key, field)."""
    from disttrain.config import TrainConfig

    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += numeric_fields(hints[f.name], f"{prefix}{f.name}.")
        elif hints[f.name] in (int, float):
            out.append((f"{prefix}{f.name}", f))
    return out


#: The schema's numbers (test_config checks their ranges; test_reliability tries values past them).
NUMBERS = numeric_fields()


def step_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    """metrics.jsonl's training lines: their steps and losses, in the file's order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r]
