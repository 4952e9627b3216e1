"""Snapshots: everything durable lives here. A snapshot is data a user cannot afford to lose.

Layout of one snapshot, `RUN_DIR/snapshots/step_00000120/`:
    shared.pt        model (unwrapped), optimizer, scheduler, scaler, progress: written by rank 0
    rank00000.pt     that rank's RNG states and loader position (one file per rank)
    manifest.json    sha256 of every file, step, world size and the config: written last

Rules:
- Each file is written to a temporary name in the same directory, fsynced, renamed, and the directory
  fsynced; the manifest is the commit point, written only after every rank's files are on disk. A
  directory without a manifest, or whose files do not match it, is not a snapshot.
- Loading verifies every checksum; the newest snapshot that verifies wins, and each one skipped is
  reported in one line. Every rank loads the one rank 0 chose.
- Loading never unpickles code (`torch.load(weights_only=True)`).
- Retention deletes only snapshots older than the `keep_last`-th newest good one: the newest good
  snapshot is never deleted, whatever happens to newer writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist

from disttrain.dist import DistEnv

log = logging.getLogger("disttrain")

MANIFEST = "manifest.json"
SHARED = "shared.pt"
FORMAT = 1


class SnapshotError(RuntimeError):
    """A snapshot could not be written or none could be loaded; the message is one line."""


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


class _HashingWriter:
    """Hashes the bytes torch.save writes as they pass, so a snapshot is never serialised twice."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: Path, write: Any) -> str:
    """Write a file through `write(fileobj)` so that `path` either holds all of it or is untouched.
    Returns the sha256 of the bytes written."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            hashing = _HashingWriter(f)
            write(hashing)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return hashing.sha.hexdigest()


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def safe_load(path: Path, expected_sha: str | None = None) -> Any:
    """Read a snapshot file, check its sha256, and unpickle tensors and plain data only."""
    data = path.read_bytes()
    if expected_sha is not None and hashlib.sha256(data).hexdigest() != expected_sha:
        raise SnapshotError(f"{path}: checksum mismatch (file is corrupted or truncated)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SnapshotError(
            f"{path}: refused to load: it holds objects other than tensors and plain data, "
            f"and disttrain never unpickles code (weights_only=True): {first}"
        ) from None
    except Exception as e:  # a truncated zip, a foreign file
        raise SnapshotError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Snapshot:
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])

    def verify(self) -> None:
        """Raise SnapshotError unless every file the manifest names is present and matches its sha256."""
        for name, sha in self.manifest["files"].items():
            f = self.path / name
            if not f.is_file():
                raise SnapshotError(f"{f}: missing")
            if sha256_file(f) != sha:
                raise SnapshotError(f"{f}: checksum mismatch (file is corrupted or truncated)")

    def load_shared(self) -> dict[str, Any]:
        return safe_load(self.path / SHARED, self.manifest["files"][SHARED])

    def load_rank(self, rank: int) -> dict[str, Any]:
        name = rank_file(rank)
        return safe_load(self.path / name, self.manifest["files"][name])


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def list_snapshots(directory: Path) -> list[Snapshot]:
    """Committed snapshots (those with a readable manifest), newest first; checksums not yet verified."""
    found = []
    if directory.is_dir():
        for path in directory.glob("step_*"):
            manifest = read_manifest(path)
            if manifest is not None and path.is_dir():
                found.append(Snapshot(path, manifest))
    return sorted(found, key=lambda s: s.step, reverse=True)


def latest_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The newest committed snapshot's manifest, read without torch (for checks before a job starts)."""
    snapshots = list_snapshots(Path(run_dir) / "snapshots")
    return snapshots[0].manifest if snapshots else None


class SnapshotStore:
    """Writes, verifies, finds and prunes the snapshots of one run, collectively across ranks."""

    def __init__(self, run_dir: Path, env: DistEnv, keep_last: int) -> None:
        self.dir = Path(run_dir) / "snapshots"
        self.env = env
        self.keep_last = keep_last
        # Steps known to verify: checked at start-up or written (and hashed while written) by this job.
        self._good: set[int] = set()

    # -- loading --------------------------------------------------------------------------------------
    def find_latest(self) -> Snapshot | None:
        """The newest snapshot that verifies, chosen by rank 0 and agreed by all ranks.

        Raises SnapshotError when snapshots exist but none verifies: starting afresh would quietly throw
        away a user's run, so the user decides (move the directory away to start over)."""
        choice: list[Any] = [None]
        if self.env.is_main:
            choice[0] = self._choose()
        if dist.is_initialized() and self.env.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], str):
            raise SnapshotError(choice[0])
        if choice[0] is None:
            return None
        snap = Snapshot(
            self.dir / step_dir_name(choice[0]), read_manifest(self.dir / step_dir_name(choice[0]))
        )
        self._good.add(snap.step)
        return snap

    def _choose(self) -> int | str | None:
        candidates = list_snapshots(self.dir)
        errors = []
        for snap in candidates:
            try:
                snap.verify()
                snap.load_shared()  # refuses pickled code and unreadable files before any rank relies on it
            except SnapshotError as e:
                log.warning("skipping snapshot %s: %s", snap.path.name, e)
                errors.append(str(e))
                continue
            self._good.update(s.step for s in candidates if s.step <= snap.step and self._verifies(s))
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
    def save(self, step: int, shared: dict[str, Any], own: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collectively write snapshot `step`: rank 0 writes `shared`, every rank its `own` state.

        On any rank's failure the partial directory is removed, every older snapshot stays as it was,
        and every rank raises SnapshotError with the first failure in one line."""
        path = self.dir / step_dir_name(step)
        error = None
        if self.env.is_main:
            try:
                path.mkdir(parents=True, exist_ok=True)  # parents: a Python API run may have no run dir yet
                # A directory left by an earlier attempt at this step stops being a snapshot first.
                if (path / MANIFEST).exists():
                    (path / MANIFEST).unlink()
                    fsync_dir(path)
                fsync_dir(self.dir)
            except OSError as e:
                error = f"rank 0: {e}"
        self._barrier()
        files: dict[str, str] = {}
        if error is None:
            try:
                if self.env.is_main:
                    files[SHARED] = atomic_write(path / SHARED, lambda f: torch.save(shared, f))
                files[rank_file(self.env.rank)] = atomic_write(
                    path / rank_file(self.env.rank), lambda f: torch.save(own, f)
                )
            except OSError as e:
                error = f"rank {self.env.rank}: {e}"
        results = self._gather((files, error))
        errors = [err for _, err in results if err]
        if self.env.is_main and not errors:
            manifest = {
                "format": FORMAT,
                "step": step,
                "world_size": self.env.world_size,
                "time": time.time(),
                "files": {k: v for f, _ in results for k, v in f.items()},
                **meta,
            }
            try:
                atomic_write(path / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            except OSError as e:
                errors.append(f"rank 0: {e}")
        errors = self._broadcast(errors)
        if errors:
            if self.env.is_main:
                shutil.rmtree(path, ignore_errors=True)
            good = max(self._good, default=None)
            kept = (
                f"newest good snapshot: {step_dir_name(good)}" if good is not None else "no earlier snapshot"
            )
            raise SnapshotError(f"snapshot {path.name} not written ({errors[0]}); {kept}")
        self._good.add(step)
        if self.env.is_main:
            self._prune()
        return path

    def _prune(self) -> None:
        good = sorted(self._good, reverse=True)
        if len(good) <= self.keep_last:
            return
        oldest_kept = good[self.keep_last - 1]
        for path in self.dir.glob("step_*"):
            try:
                step = int(path.name.split("_", 1)[1])
            except ValueError:
                continue
            if step < oldest_kept:
                shutil.rmtree(path, ignore_errors=True)
                self._good.discard(step)

    def _barrier(self) -> None:
        if dist.is_initialized() and self.env.world_size > 1:
            dist.barrier()

    def _gather(self, item: Any) -> list[Any]:
        if not dist.is_initialized() or self.env.world_size == 1:
            return [item]
        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, item)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if not dist.is_initialized() or self.env.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
