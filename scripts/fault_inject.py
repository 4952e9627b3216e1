"""Fault injection: SIGKILL a training job at random moments, restart it with the same command each time,
and count what happened.

    python scripts/fault_inject.py RUN_DIR [--kills 20] [--seed 0] [--slow-write 0.05] -- OVERRIDE ...

Each life of the job is `python -m disttrain OVERRIDE ... run_dir=RUN_DIR`, killed (the whole process
group, SIGKILL) after a delay drawn from a seeded RNG: mostly a moment after the life has trained its
first step, sometimes during start-up (imports, verification, loading). The killed lives run with the
test hook tests/hooks/sitecustomize.py on their PYTHONPATH: every snapshot write lasts `--slow-write`
seconds longer, so kills land inside writes often. After `--kills` kills the job runs to the end. Prints
one JSON object of counts:

    kills                 SIGKILLs delivered to a live job
    kills_inside_writes   kills that left a snapshot write unfinished (a `.step_*.partial` directory)
    unfinished_discarded  unfinished writes the next life reported and discarded
    corruptions_detected  committed snapshots a later life found corrupt (must be 0: writes are atomic)
    snapshots_verified    snapshots on disk at the end, every one verified
    slow_writes           snapshot writes the hook slowed (0 would mean the kills never met a slow one)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from disttrain.snapshot import PARTIAL, list_snapshots

ROOT = Path(__file__).resolve().parent.parent
#: The slow-write hook's directory and its two variables (tests/hooks/sitecustomize.py).
HOOKS = ROOT / "tests" / "hooks"
SLOW_WRITE_ENV, SLOW_WRITE_LOG_ENV = "DISTTRAIN_TEST_SLOW_WRITE", "DISTTRAIN_TEST_SLOW_WRITE_LOG"


def _command(overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "disttrain", *overrides, f"run_dir={run_dir}"]


def _env(slow_write: float, log: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if slow_write:
        path = os.pathsep.join(p for p in (str(HOOKS), str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env.update({"PYTHONPATH": path, SLOW_WRITE_ENV: str(slow_write), SLOW_WRITE_LOG_ENV: str(log)})
    return env


def _trained_steps(run_dir: Path) -> int:
    """Steps in metrics.jsonl (a torn last line from a kill does not count)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()[:-1]
    return sum(1 for line in lines if '"loss"' in line)


def _wait_for_progress(proc: subprocess.Popen, run_dir: Path, start_steps: int, timeout: float) -> bool:
    """Wait until this life has trained a step of its own (True), or has exited (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _trained_steps(run_dir) > start_steps:
            return True
        time.sleep(0.01)
    raise TimeoutError(f"no training step within {timeout} s")


def _unfinished_writes(run_dir: Path) -> set[tuple[str, int]]:
    """What unfinished snapshot writes left (`.partial` files and directories), by name and inode (a
    later life may reuse a name)."""
    found = set()
    for path in (run_dir / "snapshots").glob(f".step_*{PARTIAL}"):
        try:
            found.add((path.name, path.stat().st_ino))
        except FileNotFoundError:  # discarded while we looked
            continue
    return found


def _count_log(output: str, counts: dict[str, int]) -> None:
    counts["unfinished_discarded"] += output.count("a snapshot write that never finished")
    counts["corruptions_detected"] += output.count("is unusable and was skipped")


def inject(
    overrides: list[str],
    run_dir: Path,
    kills: int = 20,
    seed: int = 0,
    slow_write: float = 0.05,
    startup_kill_share: float = 0.25,
    max_delay: float = 0.4,
    timeout: float = 120,
) -> dict[str, Any]:
    """Kill the job `kills` times at random moments, then let it finish; return the counts."""
    rng = random.Random(seed)
    counts = dict.fromkeys(
        ("kills", "kills_inside_writes", "unfinished_discarded", "corruptions_detected", "lives"), 0
    )
    command = _command(overrides, run_dir)
    log = Path(tempfile.mkdtemp(prefix="disttrain-fault-inject-")) / "slow_writes"
    while True:
        counts["lives"] += 1
        unfinished_before = _unfinished_writes(run_dir)
        # The life that runs to the end needs no slow writes: the kills are over.
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_env(slow_write if counts["kills"] < kills else 0, log),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        if counts["kills"] < kills:
            if rng.random() < startup_kill_share:
                time.sleep(rng.uniform(0.2, 1.5))  # during imports, verification or loading
                alive = proc.poll() is None
            else:
                alive = _wait_for_progress(proc, run_dir, _trained_steps(run_dir), timeout)
                time.sleep(rng.uniform(0, max_delay))
                alive = alive and proc.poll() is None
            if alive:
                os.killpg(proc.pid, signal.SIGKILL)
                counts["kills"] += 1
        output, _ = proc.communicate(timeout=timeout)
        _count_log(output, counts)
        if proc.returncode == -signal.SIGKILL:
            counts["kills_inside_writes"] += bool(_unfinished_writes(run_dir) - unfinished_before)
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"life {counts['lives']} failed (exit {proc.returncode}):\n{output[-3000:]}")
        break
    snapshots = list_snapshots(run_dir / "snapshots")
    for snap in snapshots:
        snap.verify()  # raises SnapshotError, naming the file, if any snapshot on disk is bad
    counts["snapshots_verified"] = len(snapshots)
    counts["unfinished_left"] = len(_unfinished_writes(run_dir))
    counts["params_sha256"] = json.loads((run_dir / "summary.json").read_text())["params_sha256"]
    counts["slow_writes"] = len(log.read_text().splitlines()) if log.exists() else 0
    shutil.rmtree(log.parent, ignore_errors=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow-write", type=float, default=0.05)
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser.parse_args(argv[:split]), argv[split + 1 :]
    print(json.dumps(inject(overrides, args.run_dir, args.kills, args.seed, args.slow_write)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
