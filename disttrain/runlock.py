"""One job per run dir: `RUN_DIR/.lock`, held for the whole run by the process that owns the run.

Two jobs on one run dir delete each other's unfinished snapshot writes (each start discards the
`.partial` files it finds) and interleave metrics.jsonl, until no snapshot survives. So the second job
refuses, before it writes anything, in one line naming the first (exit 2):

    disttrain: error: run_dir='runs/x': in use by another job (pid 4242 on node7, started
    2026-12-01 09:12:03); wait for it to end, or choose another run_dir

Who holds it:
- `disttrain launcher=local|torchrun|multinode`: the `disttrain` process itself (node 0's for
  multinode), taken before it writes any run file (config.yaml first). The workers it starts are told
  by `HELD_ENV` (the run dir's absolute path) that their launcher holds it, and do not take it.
- A job whose ranks someone else started (`torchrun -m disttrain`, `srun`, the sbatch script): rank 0,
  before it writes any run file.
- The Python API: `Trainer.fit()` on rank 0, unless this process (or its launcher) already holds it;
  released when fit() returns.

It is an flock(2) on an open file, so the kernel releases it when its holder exits, however it exits
(SIGKILL included): a lock is never stale, and a new attempt after a kill, a requeued SLURM job and
torchrun's restarted workers need no clean-up. Processes forked by the holder (DataLoader workers)
share the open file and so hold it until they exit too. The file's content only says who holds it
(pid, host, SLURM job, start time), for the message; the decision never reads it. flock works on local
filesystems and on NFS (Linux maps it to byte-range locks the server sees); where the filesystem has
no locks at all (some Lustre mounts without `-o flock`) the run goes on after a one-line warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from disttrain.config import ConfigError
from disttrain.snapshot import RunFileError, os_reason

log = logging.getLogger("disttrain")

LOCK_FILE = ".lock"
#: Set by a launcher that holds the lock for the workers it starts: the run dir's absolute path.
HELD_ENV = "DISTTRAIN_RUN_DIR_LOCKED"


class _Held:
    def __init__(self, fd: int | None) -> None:
        self.fd = fd  # None: the filesystem has no locks; nothing is held
        self.users = 0


#: This process's locks by run dir: a process that holds one (the launcher) and takes it again (its
#: Trainer) must not be refused by itself, as flock would: two open() of one file lock independently.
_HELD: dict[Path, _Held] = {}


def key_of(run_dir: str | Path) -> Path:
    return Path(run_dir).absolute().resolve()


@contextlib.contextmanager
def hold(run_dir: str | Path) -> Iterator[None]:
    """`with hold(cfg.run_dir):` the run dir is this job's for the block (see acquire)."""
    release = acquire(run_dir)
    try:
        yield
    finally:
        release()


def acquire(run_dir: str | Path) -> Callable[[], None]:
    """Take the run dir's lock (making the run dir if needed) and return the function that lets it go.

    Raises ConfigError (one line naming the holder) if another job holds it, RunFileError if the run
    dir or the lock file cannot be made. Re-entrant within a process; a no-op when the launcher that
    started this process holds it (HELD_ENV)."""
    key = key_of(run_dir)
    if os.environ.get(HELD_ENV) == str(key):
        return lambda: None
    held = _HELD.get(key)
    if held is None:
        held = _HELD[key] = _take(key, str(run_dir))
    held.users += 1

    def release() -> None:
        held.users -= 1
        if held.users == 0:
            del _HELD[key]
            if held.fd is not None:
                os.close(held.fd)  # the lock goes with the last descriptor; the file stays

    return release


def check_free(run_dir: str | Path) -> None:
    """Raise acquire's refusal if another job holds the run dir, taking nothing: the pre-flight look, so
    that a job on a run dir in use says so rather than how its config differs from the snapshots there.
    (The lock itself is taken by acquire, before the first run file is written.)"""
    key = key_of(run_dir)
    if key in _HELD or os.environ.get(HELD_ENV) == str(key):
        return
    try:
        fd = os.open(key / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file: no job ever held this run dir
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(_refusal(str(run_dir), _holder(fd))) from None
    except OSError:
        return  # no locks on this filesystem: acquire warns
    finally:
        os.close(fd)


def _refusal(name: str, holder: str) -> str:
    what = f"in use by another job ({holder})"
    return f"run_dir={name!r}: {what}; wait for it to end, or choose another run_dir"


def _take(key: Path, name: str) -> _Held:
    path = key / LOCK_FILE
    try:
        key.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: a job that is refused must not touch the holder's file.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunFileError(f"{path}: cannot be created ({os_reason(e)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ConfigError(_refusal(name, holder)) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise RunFileError(f"{path}: cannot be locked ({os_reason(e)})") from None
        os.close(fd)
        log.warning("cannot lock %s (%s): nothing stops a second job on this run dir", path, os_reason(e))
        return _Held(None)
    _write_holder(fd)
    return _Held(fd)


def _write_holder(fd: int) -> None:
    """Who holds the lock, for the message of a job refused. Best effort: written over the previous
    holder's bytes before the file is cut to length, so that a full disk still leaves the lock (and
    the next write, config.yaml, reports the full disk)."""
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    data = (json.dumps(info) + "\n").encode()
    with contextlib.suppress(OSError):
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))


def _holder(fd: int) -> str:
    """The holder as its file describes it. It writes that right after taking the lock: a job refused
    in between waits a moment for it."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            where = f"pid {info['pid']} on {info['host']}, started {info['started']}"
            return f"SLURM job {info['slurm_job']}, {where}" if info.get("slurm_job") else where
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "its lock file does not say which"
