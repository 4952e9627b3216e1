"""The launcher's side of a torchrun job (launcher=torchrun, multinode): torchrun and its workers are the
job; the `disttrain` process stays their parent, the one a user or a scheduler signals, until they end.

- torchrun runs in a process group of its own, so a signal meant for `disttrain` (Ctrl-C on its
  terminal, `kill PID`, `kill -- -PGID`) reaches the job once, through this process. (torchrun starts
  each worker in a session of its own, so the workers never get the terminal's signals; a torchrun
  signalled itself forwards the signal to its workers, then raises and prints a traceback, and a second
  signal during that cuts its wait for the workers short.)
- A stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2) goes to each worker as soon as its stop handlers
  are in place (SigCgt in /proc/PID/status: a worker still importing would die of it, and torchrun
  would count a crash, or restart it), also to workers a torchrun restart starts later. The workers
  agree on a step, snapshot and exit 0 (worker.finish), torchrun exits 0, and this process exits
  128 + the signal, as the workers' summary.json says. A torchrun with no worker yet gets SIGTERM.
- A second SIGINT means "stop now": torchrun and every worker get SIGKILL, and the newest snapshot on
  disk, whole (writes are atomic), is the one to resume from; exit 130.
- torchrun dies with this process (PR_SET_PDEATHSIG), and each worker with its torchrun
  (worker.die_with_launcher): a `kill -9` of `disttrain` leaves no worker training on, in a run dir
  whose lock went with this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from disttrain.worker import (
    DIVERGED_EXIT,
    LAUNCHER_PID_ENV,
    STOP_SIGNALS,
    diverged,
    stopped_by,
    stopped_now_line,
)

_PR_SET_PDEATHSIG = 1


class _Stops:
    """What the signals asked for, set by the handler, acted on by the loop in supervise()."""

    def __init__(self) -> None:
        self.signum = 0
        self.now = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum:
            self.now = True
        self.signum = self.signum or signum


def supervise(cmd: list[str], env: dict[str, str], run_dir: Path) -> int:
    """Run torchrun's `cmd` as the job and return the job's exit code (see the module's docstring)."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def in_child() -> None:  # between fork and exec: async-signal-safe calls only
        os.setpgid(0, 0)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    stops = _Stops()
    previous = {sig: signal.signal(sig, stops.handle) for sig in (*STOP_SIGNALS, signal.SIGINT)}
    started = time.time()
    try:
        proc = subprocess.Popen(cmd, env={**env, LAUNCHER_PID_ENV: str(parent)}, preexec_fn=in_child)
        told: set[int] = set()  # pids the stop signal was sent to (torchrun's among them, if it was)
        while True:
            try:
                code = proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if stops.now:
                _kill_job(proc)
                print(f"disttrain: {stopped_now_line(run_dir)}", file=sys.stderr, flush=True)
                return 130
            if stops.signum:
                _pass_on(stops.signum, proc.pid, told)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
    summary = _summary_since(run_dir, started) if code == 0 else None
    if summary is not None and (signum := stopped_by(summary)) is not None:
        return 128 + signum
    if summary is not None and diverged(summary):
        return DIVERGED_EXIT
    if stops.signum and proc.pid in told:
        name = signal.Signals(stops.signum).name
        print(
            f"disttrain: stopped by signal {name} before the workers started; run the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        return 128 + stops.signum
    return code


def _pass_on(signum: int, torchrun: int, told: set[int]) -> None:
    workers = _children(torchrun)
    if not workers and not told:  # still starting or in rendezvous: torchrun's own handler stops it
        with contextlib.suppress(ProcessLookupError):
            os.kill(torchrun, signal.SIGTERM)
        told.add(torchrun)
    for pid in workers:
        if pid not in told and _catches(pid, STOP_SIGNALS):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
            told.add(pid)


def _kill_job(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL torchrun and every worker (each leads a process group of its own: its DataLoader workers
    go too), and wait until none is left running."""
    workers = _children(proc.pid)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.02)


def _stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # a zombie holds no file, no lock


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        fields = _stat(entry) if entry.isdigit() else None
        if fields is not None and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def _catches(pid: int, signals: tuple[int, ...]) -> bool:
    """Whether process `pid` has handlers for all of `signals` (they are installed together)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    line = next((ln for ln in status.splitlines() if ln.startswith("SigCgt:")), "SigCgt: 0")
    caught = int(line.split()[1], 16)
    return all(caught >> (sig - 1) & 1 for sig in signals)


def _summary_since(run_dir: Path, started: float) -> dict[str, Any] | None:
    """The summary.json this job's rank 0 wrote, or None (none, or an earlier run's)."""
    path = run_dir / "summary.json"
    try:
        if path.stat().st_mtime < started:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
