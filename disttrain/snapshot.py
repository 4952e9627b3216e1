"""Snapshots: everything durable lives here. A snapshot is data a user cannot afford to lose.

Layout of one snapshot, `RUN_DIR/snapshots/step_00000120/`:
    shared.pt        model (unwrapped), optimizer, scheduler, scaler, progress: written by rank 0
    rank00000.pt     that rank's RNG states and loader position (one file per rank)
    manifest.json    sha256 of every file, step, world size, the config, and its own sha256: written last

Rules:
- A snapshot is written under `.partial` names: rank 0 writes the shared state to
  `snapshots/.step_00000120.shared.partial`, then moves it into a staging directory,
  `snapshots/.step_00000120.partial/`, where every file is fsynced, the manifest is written last, and the
  directory is fsynced and renamed to its final name, and `snapshots/` is fsynced. So a directory named
  `step_*` is always complete: a kill or a full disk leaves at most `.partial` files and directories,
  which the next start discards (they never were a snapshot).
- Loading verifies every checksum, the manifest's own included, and loads every file (shared state and
  each rank's) the way resume will; the newest snapshot that passes both wins, and each one skipped is
  reported in one line. Every rank loads the one rank 0 chose.
- `snapshots/` that is there but is no directory (a dangling symlink, a file) stops the run in one line:
  read as "no snapshot", it would restart the run from step 0 and cut metrics.jsonl back to nothing.
- Loading never unpickles code (`torch.load(weights_only=True)`).
- Retention keeps the `keep_last` newest snapshots that verify, and those a callback protects (the best
  ones by a metric: disttrain.best_snapshots), and deletes only older ones and ones that failed
  verification: the newest good snapshot is never deleted, whatever happens to newer writes.
- Cost: training waits only while the state is serialised (as long as a bare torch.save). Rank 0 then
  hashes, fsyncs and commits on a background thread; the next save, `wait()` (the trainer's last call)
  and `find_latest()` wait for it, and a commit that failed is raised there, in one line, on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist

from disttrain.config import TrainConfig, to_yaml
from disttrain.dist import DistEnv

log = logging.getLogger("disttrain")

MANIFEST = "manifest.json"
SHARED = "shared.pt"
DCP_DIR = "dcp"  # an FSDP job's shards (disttrain.sharded)
FORMAT = 2
PARTIAL = ".partial"  # suffix of what a snapshot write leaves until its commit (or a kill leaves)
REPLACED = ".replaced"  # suffix of a snapshot moved aside for a new one of the same step


class SnapshotError(RuntimeError):
    """A snapshot could not be written or none could be loaded; the message is one line."""


class RunFileError(SnapshotError):
    """Another file of the run dir (config, metrics.jsonl, summary, the lock) could not be written or read.
    As durable as a snapshot failure: one line naming the file and the reason, exit code 1."""


def os_reason(e: OSError) -> str:
    """`[Errno 28] No space left on device`: the reason without the file name (which can be a temporary
    name the user never sees)."""
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else str(e)


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[BinaryIO], Any], durable: bool = True) -> str:
    """Write `path` through `write(fileobj)`; with `durable`, fsync it and return the sha256 of its bytes
    (else ""; the caller hashes and fsyncs the file later).

    Raises the OSError (ENOSPC, EIO...) with its errno even when it happened inside torch.save, which
    reports a failed write as a RuntimeError raised while handling that OSError."""
    with open(path, "wb") as f:
        try:
            write(f)
            f.flush()
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        if durable:
            os.fsync(f.fileno())
    return sha256_file(path) if durable else ""


def save_fast(obj: Any, path: Path) -> None:
    """torch.save to a path name: torch's own file writer, as fast as a bare torch.save, and faster on a
    small state than writing through a Python file object. It reports a failed write
    without its reason, so a failure is written once more through write_file, which raises the OSError
    with its errno (or succeeds, and the file is whole)."""
    try:
        torch.save(obj, path)
    except RuntimeError:
        write_file(path, lambda f: torch.save(obj, f), durable=False)


def atomic_write(path: Path, write: Callable[[Any], Any]) -> str:
    """Write a file through `write(fileobj)` so that `path` either holds all of it or is untouched:
    a temporary name in the same directory (made if missing), fsync, rename, fsync the directory.
    Returns its sha256. A full disk or any other I/O error is a RunFileError naming `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sha = write_file(tmp, write)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RunFileError(f"{path}: not written ({os_reason(e)})") from None
        raise
    return sha


def freeze_config(cfg: TrainConfig, path: Path) -> Path:
    """Write the resolved config that workers read, and that records a run (atomically: a worker never
    reads half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_yaml(cfg)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def sha256_file(path: Path, fsync: bool = False) -> str:
    """The sha256 of a file's bytes; with `fsync`, also make them durable (fsync works on a read-only
    descriptor: it flushes the file, not the descriptor)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return sha.hexdigest()


def safe_load(path: Path, expected_sha: str | None = None) -> Any:
    """Read a snapshot file, check its sha256, and unpickle tensors and plain data only."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SnapshotError(f"{path}: unreadable ({e.strerror})") from None
    if expected_sha is not None and hashlib.sha256(data).hexdigest() != expected_sha:
        raise SnapshotError(f"{path}: checksum mismatch (the file is corrupted or truncated)")
    if not data.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
        raise SnapshotError(f"{path}: unreadable (not a file torch.save wrote)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SnapshotError(
            f"{path}: refused to load: it holds objects other than tensors and plain data, "
            f"and disttrain never unpickles code (weights_only=True): {_torch_detail(e)}"
        ) from None
    except Exception as e:  # a damaged archive
        raise SnapshotError(f"{path}: unreadable ({type(e).__name__}: {_torch_detail(e)})") from None


def _torch_detail(e: Exception) -> str:
    """The line of torch's many-line load error that says what is wrong (not its generic advice, which
    includes re-running with weights_only=False)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    generic = ("Weights only load failed", "Check the documentation", "Please file an issue")
    return next((line for line in lines if not line.startswith(generic)), lines[0] if lines else "")


def _manifest_sha(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of snapshot directory `path`, checked against its own sha256; SnapshotError if not."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except OSError as e:
        raise SnapshotError(f"{file}: unreadable ({e.strerror})") from None
    except ValueError:
        raise SnapshotError(f"{file}: not valid JSON (the file is corrupted or truncated)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{file}: not a disttrain manifest of format {FORMAT}")
    if manifest.get("manifest_sha256") != _manifest_sha(manifest):
        raise SnapshotError(f"{file}: checksum mismatch (the file is corrupted)")
    if manifest.get("step") != _step_of(path):
        raise SnapshotError(f"{file}: names step {manifest.get('step')}, not the directory's step")
    return manifest


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return None


class Snapshot:
    """One committed snapshot directory; its manifest is read (and checked) on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        step = _step_of(path)
        if step is None:  # list_snapshots keeps numbered ones: only a caller's own path can get here
            raise ValueError(f"{path}: not a snapshot directory (step_NNNNNNNN)")
        self.step = step
        self._manifest: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Snapshot({str(self.path)!r})"

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = read_manifest(self.path)
        return self._manifest

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])

    @property
    def sharded(self) -> bool:
        """The model and optimizer state are shards in `dcp/` (an FSDP job's), not in shared.pt."""
        return f"{DCP_DIR}/.metadata" in self.manifest["files"]

    def verify(self) -> None:
        """Raise SnapshotError unless the manifest and every file it names match their sha256."""
        for name, sha in self.manifest["files"].items():
            f = self.path / name
            if not f.is_file():
                raise SnapshotError(f"{f}: missing")
            if sha256_file(f) != sha:
                raise SnapshotError(f"{f}: checksum mismatch (the file is corrupted or truncated)")

    def load_shared(self) -> dict[str, Any]:
        return safe_load(self.path / SHARED, self.manifest["files"][SHARED])

    def load_rank(self, rank: int) -> dict[str, Any]:
        name = rank_file(rank)
        if name not in self.manifest["files"]:
            raise SnapshotError(f"{self.path / name}: not in the manifest (it names {self.world_size} ranks)")
        return safe_load(self.path / name, self.manifest["files"][name])

    def load_all(self) -> None:
        """Load every file the way resume will (shared state and every rank's), and let go of them:
        a file that verifies but refuses to load makes the snapshot unusable before any rank relies
        on it (rank files are small: RNG states and a loader position)."""
        self.load_shared()
        for rank in range(self.world_size):
            self.load_rank(rank)
        if self.sharded:  # DCP's .metadata is a pickle: read it the safe way now (disttrain.sharded)
            from disttrain.sharded import SafeReader

            try:
                SafeReader(str(self.path / DCP_DIR)).read_metadata()
            except (pickle.UnpicklingError, OSError, EOFError) as e:
                raise SnapshotError(f"{self.path / DCP_DIR / '.metadata'}: refused to load: {e}") from None


def list_snapshots(directory: Path) -> list[Snapshot]:
    """Every `step_N` directory, newest first; neither manifests nor checksums verified yet.

    No directory means no snapshot yet. Something else in its place (a dangling symlink, a file) is a
    SnapshotError: read as "no snapshot", it would restart the run from step 0 and cut metrics.jsonl
    back to nothing, while the snapshots may only be on a filesystem that is not mounted."""
    if not directory.is_dir():
        if directory.is_symlink() and not directory.exists():
            raise SnapshotError(
                f"{directory}: a symlink to {os.readlink(directory)}, which does not exist: the run's "
                "snapshots are out of reach; restore the target, or remove the link to start afresh"
            )
        if directory.exists():
            raise SnapshotError(f"{directory}: not a directory; move it away to start afresh")
        return []
    found = []
    for path in directory.glob("step_*"):
        if path.is_dir() and _step_of(path) is not None:
            found.append(Snapshot(path))
    return sorted(found, key=lambda s: s.step, reverse=True)


def newest_snapshot(run_dir: Path) -> str | None:
    """The name of the newest committed snapshot of a run (committed means complete), or None."""
    try:
        found = list_snapshots(Path(run_dir) / "snapshots")
    except SnapshotError:
        return None
    return found[0].path.name if found else None


def latest_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable manifest, read without torch (for the config check before a job starts)."""
    for snap in list_snapshots(Path(run_dir) / "snapshots"):
        try:
            return snap.manifest
        except SnapshotError:
            continue
    return None


#: Rank 0's commit thread per snapshots directory, so that a new store never discards a staging
#: directory that an earlier store of the same process is still committing.
_COMMITTING: dict[Path, Future] = {}


def _remove(path: Path) -> None:
    """Remove a file or a directory tree, if it is there."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _discard(path: Path | None) -> None:
    """_remove on the way out of a failed write: a directory that refused the write (read-only, gone)
    may refuse the removal too, and that second error must not hide the first, the one reported."""
    if path is not None:
        with contextlib.suppress(OSError):
            _remove(path)


class SnapshotStore:
    """Writes, verifies, finds and prunes the snapshots of one run, collectively across ranks."""

    def __init__(self, run_dir: Path, env: DistEnv, keep_last: int) -> None:
        self.dir = Path(run_dir) / "snapshots"
        self._key = self.dir.resolve()  # in _COMMITTING
        self.env = env
        self.keep_last = keep_last
        # Steps known to verify: checked at start-up, or written and committed by this job.
        self._good: set[int] = set()
        # Steps whose snapshot failed verification at start-up: retention may delete them.
        self._bad: set[int] = set()
        # Steps retention keeps besides the keep_last newest (a callback's best ones): replaced whole,
        # so rank 0's commit thread reads one set or the next.
        self.protected: frozenset[int] = frozenset()
        self._pool: ThreadPoolExecutor | None = None
        self._committing: Future | None = None
        self._commit_failure: tuple[str, str] | None = None
        self._dir_made = False

    # -- loading --------------------------------------------------------------------------------------
    def find_latest(self) -> Snapshot | None:
        """The newest snapshot that verifies, chosen by rank 0 and agreed by all ranks.

        Raises SnapshotError when snapshots exist but none verifies: starting afresh would quietly throw
        away a user's run, so the user decides (move the directory away to start over)."""
        self.wait()
        choice: list[Any] = [None]
        if self.env.is_main:
            # Another store of this process (an earlier Trainer.fit) may still be committing here.
            if (other := _COMMITTING.get(self._key)) is not None:
                other.result()
            self._discard_unfinished()
            try:
                choice[0] = self._choose()
            except SnapshotError as e:  # every rank must hear it, not wait for a choice that never comes
                choice[0] = str(e)
        choice[0] = self._broadcast(choice[0])
        if isinstance(choice[0], str):
            raise SnapshotError(choice[0])
        if choice[0] is None:
            return None
        self._good.add(choice[0])
        return Snapshot(self.dir / step_dir_name(choice[0]))

    def _discard_unfinished(self) -> None:
        """Remove what a killed writer left: staging directories never committed, and put back a snapshot
        moved aside for a new one of the same step if the new one never arrived."""
        for path in sorted(self.dir.glob(f".step_*{REPLACED}")):
            final = self.dir / path.name[1 : -len(REPLACED)]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, final)
        for path in sorted(self.dir.glob(f".step_*{PARTIAL}")):
            log.info("discarding %s: a snapshot write that never finished (the process stopped)", path.name)
            _remove(path)

    def _choose(self) -> int | str | None:
        candidates = list_snapshots(self.dir)
        errors = []
        for snap in candidates:
            try:
                snap.verify()
                snap.load_all()  # refuses pickled code and unreadable files before any rank relies on them
            except SnapshotError as e:
                log.warning("snapshot %s is unusable and was skipped: %s", snap.path.name, e)
                errors.append(str(e))
                self._bad.add(snap.step)
                continue
            self._good.update(s.step for s in candidates if s.step < snap.step and self._verifies(s))
            return snap.step
        if candidates:
            return f"no snapshot in {self.dir} verifies ({len(candidates)} tried; newest: {errors[0]})"
        return None

    @staticmethod
    def _verifies(snap: Snapshot) -> bool:
        try:
            snap.verify()
        except SnapshotError:
            return False
        return True

    # -- saving ---------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        shared: dict[str, Any],
        own: dict[str, Any],
        meta: dict[str, Any],
        write_sharded: Callable[[Path], None] | None = None,
    ) -> Path:
        """Collectively write snapshot `step`: rank 0's `shared` state and every rank's `own` state, and
        with `write_sharded(dir)` every rank's shards (DCP's files, written by every rank into one
        directory on the training thread; the commit moves it into the snapshot as `dcp/` and hashes
        every file in it like the others).

        The training loop pays only for serialisation: rank 0 writes `shared` to a `.partial` file and
        every other rank sends its small `own` state to rank 0, whose commit thread then writes the rank
        files, hashes and fsyncs everything and commits the snapshot while training goes on (issue 7's
        cost limit: at most 1.2x a bare torch.save; hashing and fsync alone cost more than torch.save,
        and no rank but rank 0 touches a disk). So `own` is written after save returns: it must be an
        object the caller no longer changes (the Trainer builds it afresh for each snapshot). The next
        save, `wait()` and `find_latest()` wait for that commit and raise its error. On a failure its
        `.partial` files are removed, every older snapshot stays as it was, and every rank raises
        SnapshotError in one line."""
        final = self.dir / step_dir_name(step)
        staging = self.dir / f".{final.name}{PARTIAL}"
        shared_file = self.dir / f".{final.name}.shared{PARTIAL}"
        owns = self._gather_to_main(own)
        message = None
        failure = self._finish_commit() if self.env.is_main else None
        sharded_dir: Path | None = None
        if write_sharded is not None:
            sharded_dir = self.dir / f".{final.name}.{DCP_DIR}{PARTIAL}"
            failure = self._write_shards(write_sharded, sharded_dir, final.name, failure)
        if self.env.is_main:
            # (snapshot name, why) of the previous snapshot's commit, else of this write.
            if failure is None:
                try:
                    if not self._dir_made:  # a Python API run may have no run dir yet
                        self.dir.mkdir(parents=True, exist_ok=True)
                        self._dir_made = True
                    save_fast(shared, shared_file)
                except OSError as e:
                    _discard(shared_file)
                    failure = (final.name, f"rank 0: {e}")
            if failure is None:
                manifest = {
                    "format": FORMAT,
                    "step": step,
                    "world_size": self.env.world_size,
                    "time": time.time(),
                    **meta,
                }
                # One long-lived thread (it ends when the store is garbage collected): starting a thread
                # per snapshot waits until it is scheduled (milliseconds on a busy machine).
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="disttrain-commit")
                self._committing = self._pool.submit(
                    self._commit_in_background, shared_file, staging, final, manifest, owns, sharded_dir
                )
                _COMMITTING[self._key] = self._committing
            else:
                message = self._not_written(*failure)
        if (message := self._broadcast(message)) is not None:
            raise SnapshotError(message)
        return final

    def _write_shards(
        self, write: Callable[[Path], None], directory: Path, name: str, failure: tuple[str, str] | None
    ) -> tuple[str, str] | None:
        """Every rank writes its shards into `directory`, once rank 0 has said it may (its previous
        commit may have failed; a rank writing alone would wait forever for the others); the failure,
        the same on every rank, else None."""
        if self.env.is_main and failure is None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                _remove(directory)  # what a killed earlier attempt at this step left
            except OSError as e:
                failure = (name, f"rank 0: {e}")
        failure = self._broadcast(failure)
        if failure is not None:
            return failure
        try:
            write(directory)
        except BaseException as e:  # DCP's CheckpointException (a BaseException) carries every rank's error
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            from disttrain.sharded import first_failure

            failure = (name, first_failure(e))
        return self._broadcast(failure)

    def wait(self) -> None:
        """Wait until the last snapshot is committed; SnapshotError on every rank if that failed.
        Collective: every rank calls it (the trainer, once training ends)."""
        failure = self._finish_commit() if self.env.is_main else None
        error = self._broadcast(self._not_written(*failure) if failure else None)
        if error is not None:
            raise SnapshotError(error)

    def _finish_commit(self) -> tuple[str, str] | None:
        """Rank 0: wait for the commit thread; (snapshot name, why) if its commit failed."""
        if self._committing is None:
            return None
        self._committing.result()  # an OSError waits in _commit_failure; anything else is a bug: raised
        self._committing = None
        failure, self._commit_failure = self._commit_failure, None
        return failure

    def _not_written(self, name: str, why: str) -> str:
        return f"snapshot {name} not written ({why}); {self.newest_good()}"

    def newest_good(self) -> str:
        """Rank 0: what a failure leaves to resume from, e.g. `newest good snapshot: step_00000100`."""
        good = max(self._good, default=None)
        return f"newest good snapshot: {step_dir_name(good)}" if good is not None else "no earlier snapshot"

    def settle(self) -> None:
        """Rank 0: let a commit in flight finish, without raising (not collective). For a run ending on
        an error: what it leaves on disk is then final before the run dir is let go (runlock)."""
        if self._committing is not None:
            with contextlib.suppress(Exception):
                self._committing.result()

    def _commit_in_background(
        self,
        shared_file: Path,
        staging: Path,
        final: Path,
        manifest: dict[str, Any],
        owns: list[dict[str, Any]],
        sharded_dir: Path | None = None,
    ) -> None:
        """Rank 0's thread: checksum and fsync shared.pt (and the shards), write every rank's file,
        commit, prune. It never logs (a DataLoader may fork while it runs); an OSError waits in
        `_commit_failure` for the next save or wait()."""
        try:
            # The directory is made here, not on the training thread: it costs as much as a small save.
            _remove(staging)  # an earlier attempt at this step, abandoned
            staging.mkdir()
            os.rename(shared_file, staging / SHARED)
            files = manifest["files"] = {SHARED: sha256_file(staging / SHARED, fsync=True)}
            if sharded_dir is not None:
                os.rename(sharded_dir, staging / DCP_DIR)
                for path in sorted((staging / DCP_DIR).iterdir()):
                    files[f"{DCP_DIR}/{path.name}"] = sha256_file(path, fsync=True)
                fsync_dir(staging / DCP_DIR)
            for rank, own in enumerate(owns):
                files[rank_file(rank)] = write_file(
                    staging / rank_file(rank), functools.partial(torch.save, own)
                )
            self._commit(staging, final, manifest)
        except OSError as e:
            for leftover in (staging, shared_file, sharded_dir):
                _discard(leftover)
            self._commit_failure = (final.name, f"rank 0: {e}")
            return
        self._good.add(manifest["step"])
        self._bad.discard(manifest["step"])
        self._prune()

    def _commit(self, staging: Path, final: Path, manifest: dict[str, Any]) -> None:
        """The commit point: the manifest, then one rename of the whole directory to its final name."""
        manifest["manifest_sha256"] = _manifest_sha(manifest)
        write_file(staging / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        fsync_dir(staging)
        if final.exists():
            # A snapshot of this step from an earlier life (one that failed verification, else training
            # would have resumed after it): moved aside, not deleted, until the new one is in place.
            aside = final.with_name(f".{final.name}{REPLACED}")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
            os.rename(staging, final)
            fsync_dir(self.dir)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(staging, final)
        fsync_dir(self.dir)

    def protect(self, steps: Any) -> None:
        """Keep the snapshots of `steps` too (replacing the set given before), whatever keep_last says."""
        self.protected = frozenset(int(s) for s in steps)

    def _prune(self) -> None:
        """Delete snapshots older than the keep_last-th newest good one unless protected, and ones known
        not to verify."""
        kept = sorted(self._good, reverse=True)[: self.keep_last]
        protected = self.protected
        for snap in list_snapshots(self.dir):
            if snap.step in kept:
                continue
            if snap.step in self._bad or (snap.step < kept[-1] and snap.step not in protected):
                shutil.rmtree(snap.path, ignore_errors=True)
                self._good.discard(snap.step)
                self._bad.discard(snap.step)

    def _gather_to_main(self, item: Any) -> list[Any]:
        """Every rank's `item`, in rank order, on rank 0 (an empty list elsewhere)."""
        if not dist.is_initialized() or self.env.world_size == 1:
            return [item]
        out: list[Any] | None = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(item, out, dst=0)
        return out or []

    def _broadcast(self, obj: Any) -> Any:
        if not dist.is_initialized() or self.env.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
