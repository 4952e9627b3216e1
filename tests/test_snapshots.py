"""Snapshots that cannot be lost (issue 7): atomic writes, checksums, retention, safe loading, SIGKILLs at
random moments, a full disk, and a resume into a different model."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import disttrain.snapshot as snapshot
from disttrain import TrainConfig, Trainer
from disttrain.data import TokenCorpus
from disttrain.dist import DistEnv
from disttrain.models import MLPLanguageModel
from disttrain.snapshot import (
    RunFileError,
    Snapshot,
    SnapshotError,
    SnapshotStore,
    atomic_write,
    list_snapshots,
)
from scripts.fault_inject import inject
from tests.support import SMALL, disttrain, losses, require, summary, tree_hashes

ONE_PROCESS = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
#: One epoch (225 steps), a snapshot every 50 steps and at the end, the 3 newest kept: 150, 200, 225.
JOB = [*SMALL, "trainer.max_epochs=1", "snapshot.every_steps=50", "snapshot.keep_last=3"]


def steps(run_dir: Path) -> list[int]:
    return [s.step for s in list_snapshots(run_dir / "snapshots")]


def save(store: SnapshotStore, step: int) -> None:
    store.save(step, {"w": torch.full((1000,), float(step))}, {"rng": torch.tensor([step])}, {"config": {}})
    store.wait()


def resign(directory: Path) -> None:
    """Make the manifest vouch for whatever the files now hold: what a stranger handing over a file does."""
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = snapshot.sha256_file(directory / name)
    manifest["manifest_sha256"] = snapshot._manifest_sha(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


class RunsCode:
    """A pickle that runs a shell command when unpickled (harmless here: it creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ==== atomic writes ===================================================================================


def test_a_failed_atomic_write_leaves_the_old_file_whole_and_no_debris(tmp_path) -> None:
    path = tmp_path / "file"
    atomic_write(path, lambda f: f.write(b"old"))

    def half_then_fail(f) -> None:
        f.write(b"new, half of it")
        assert path.read_bytes() == b"old"  # a reader during the write sees the old file
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(RunFileError) as failed:
        atomic_write(path, half_then_fail)
    assert str(failed.value) == f"{path}: not written ([Errno 5] Input/output error)"
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_snapshot_being_written_is_not_a_snapshot_until_committed(tmp_path, monkeypatch) -> None:
    store = SnapshotStore(tmp_path, ONE_PROCESS, keep_last=2)
    save(store, 1)
    seen: list = []
    write_file = snapshot.write_file

    def watched(path, *args, **kwargs):
        if path.name == snapshot.MANIFEST:  # step 2's data files are complete, and its commit is next
            seen.append((steps(tmp_path), sorted(p.name for p in store.dir.iterdir())))
        return write_file(path, *args, **kwargs)

    monkeypatch.setattr(snapshot, "write_file", watched)
    save(store, 2)
    assert seen == [([1], [".step_00000002.partial", "step_00000001"])]
    assert steps(tmp_path) == [2, 1]


# ==== checksums and safe loading: every kind of bad snapshot ==========================================


def _pickled_callable(d: Path, name: str = "shared.pt") -> None:
    torch.save({"w": RunsCode(d.parent.parent / "MARKER")}, d / name)
    resign(d)


def _foreign_bytes(d: Path, name: str = "shared.pt") -> None:
    (d / name).write_bytes(bytes(range(256)) * 20)
    resign(d)


def _damaged_archive(d: Path, name: str = "shared.pt") -> None:
    truncate(d / name)  # a torch zip archive cut short, vouched for by the manifest
    resign(d)


def _manifest_of_more_ranks(d: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["world_size"] = 2
    (d / "manifest.json").write_text(json.dumps(manifest))
    resign(d)


def _manifest_of_another_step(d: Path) -> None:
    shutil.copy(d.parent / "step_00000002" / "manifest.json", d / "manifest.json")


def _manifest_checksum_edited(d: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"]["shared.pt"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(manifest))


BAD_SNAPSHOTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "shared-bit-flipped": (lambda d: flip_a_bit(d / "shared.pt"), "shared.pt: checksum mismatch"),
    "shared-truncated": (lambda d: truncate(d / "shared.pt"), "shared.pt: checksum mismatch"),
    "shared-empty": (lambda d: (d / "shared.pt").write_bytes(b""), "shared.pt: checksum mismatch"),
    "rank-file-bit-flipped": (lambda d: flip_a_bit(d / "rank00000.pt"), "rank00000.pt: checksum mismatch"),
    "rank-file-missing": (lambda d: (d / "rank00000.pt").unlink(), "rank00000.pt: missing"),
    "manifest-missing": (lambda d: (d / "manifest.json").unlink(), "manifest.json: unreadable"),
    "manifest-truncated": (lambda d: truncate(d / "manifest.json"), "manifest.json: not valid JSON"),
    "manifest-edited": (_manifest_checksum_edited, "manifest.json: checksum mismatch"),
    "manifest-of-another-step": (_manifest_of_another_step, "manifest.json: names step 2"),
    "foreign-bytes-matching-checksum": (
        _foreign_bytes,
        "shared.pt: unreadable (not a file torch.save wrote)",
    ),
    "damaged-archive-matching-checksum": (_damaged_archive, "shared.pt: unreadable (RuntimeError: "),
    "pickled-callable-matching-checksum": (
        _pickled_callable,
        "shared.pt: refused to load: it holds objects other than tensors and plain data, and disttrain never "
        "unpickles code (weights_only=True): Trying to load unsupported GLOBAL posix.system",
    ),
    # A rank file that verifies but refuses to load falls back like a shared.pt does (issue 11).
    "rank-file-foreign-bytes-matching-checksum": (
        lambda d: _foreign_bytes(d, "rank00000.pt"),
        "rank00000.pt: unreadable (not a file torch.save wrote)",
    ),
    "rank-file-damaged-archive-matching-checksum": (
        lambda d: _damaged_archive(d, "rank00000.pt"),
        "rank00000.pt: unreadable (RuntimeError: ",
    ),
    "rank-file-pickled-callable-matching-checksum": (
        lambda d: _pickled_callable(d, "rank00000.pt"),
        "rank00000.pt: refused to load: it holds objects other than tensors and plain data, and disttrain "
        "never unpickles code (weights_only=True): Trying to load unsupported GLOBAL posix.system",
    ),
    "manifest-of-more-ranks-than-files": (
        _manifest_of_more_ranks,
        "rank00001.pt: not in the manifest (it names 2 ranks)",
    ),
}


@pytest.mark.parametrize("damage", BAD_SNAPSHOTS, ids=list(BAD_SNAPSHOTS))
def test_a_bad_newest_snapshot_is_reported_in_one_line_and_the_older_one_is_used(
    tmp_path, caplog, damage
) -> None:
    run_dir = tmp_path / "run"
    store = SnapshotStore(run_dir, ONE_PROCESS, keep_last=3)
    for step in (1, 2, 3):
        save(store, step)
    spoil, expected = BAD_SNAPSHOTS[damage]
    spoil(run_dir / "snapshots" / "step_00000003")

    with caplog.at_level(logging.WARNING, logger="disttrain"):
        chosen = SnapshotStore(run_dir, ONE_PROCESS, keep_last=3).find_latest()
    assert chosen is not None and chosen.step == 2
    assert chosen.load_shared()["w"][0] == 2.0
    [record] = caplog.records
    message = record.getMessage()
    assert message.startswith("snapshot step_00000003 is unusable and was skipped: ")
    assert expected in message and "\n" not in message
    assert not (tmp_path / "MARKER").exists()


@pytest.fixture(scope="module")
def five_steps(tmp_path_factory) -> Path:
    """SMALL's first 5 steps, their snapshot: what the tests of a damaged run dir copy, then damage."""
    run_dir = tmp_path_factory.mktemp("five-steps") / "run"
    assert disttrain(*SMALL, "trainer.max_steps=5", f"run_dir={run_dir}").returncode == 0
    return run_dir


@pytest.mark.slow
def test_a_snapshot_carrying_a_pickled_callable_is_refused_and_runs_nothing(tmp_path, five_steps) -> None:
    """Through the CLI, with a manifest whose checksums match: the file a stranger could hand a user."""
    run_dir, marker = tmp_path / "run", tmp_path / "MARKER"
    shutil.copytree(five_steps, run_dir)
    newest = run_dir / "snapshots" / "step_00000005"
    torch.save({"model": RunsCode(marker)}, newest / "shared.pt")
    resign(newest)

    again = disttrain(*SMALL, "trainer.max_steps=5", f"run_dir={run_dir}")
    assert again.returncode == 1
    assert again.stderr.splitlines()[-1] == (
        f"disttrain: error: no snapshot in {run_dir}/snapshots verifies (1 tried; newest: {newest}/"
        "shared.pt: refused to load: it holds objects other than tensors and plain data, and disttrain never "
        "unpickles code (weights_only=True): Trying to load unsupported GLOBAL posix.system whose module "
        "posix is blocked.)"
    )
    assert "Traceback" not in again.stderr
    assert not marker.exists()
    # The file is live: loaded the unsafe way, it runs its command. (Proves the test can fail.)
    torch.load(newest / "shared.pt", weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = disttrain(*JOB, f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


MISMATCH = "shared.pt: checksum mismatch (the file is corrupted or truncated)"
CLI_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "bit-flipped": (lambda d: flip_a_bit(d / "shared.pt"), MISMATCH),
    "truncated": (lambda d: truncate(d / "shared.pt"), MISMATCH),
    "rank-file-refuses-to-load": (
        lambda d: _foreign_bytes(d, "rank00000.pt"),
        "rank00000.pt: unreadable (not a file torch.save wrote)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", CLI_DAMAGE, ids=list(CLI_DAMAGE))
def test_cli_reports_a_bad_newest_snapshot_in_one_line_and_resumes_exactly_from_an_older_one(
    tmp_path, finished_run, damage
) -> None:
    assert steps(finished_run) == [225, 200, 150]  # keep_last=3
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "summary.json").unlink()
    spoil, reason = CLI_DAMAGE[damage]
    spoil(run_dir / "snapshots" / "step_00000225")

    again = disttrain(*JOB, f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line for line in again.stderr.splitlines() if "unusable" in line] == [
        f"disttrain: snapshot step_00000225 is unusable and was skipped: {run_dir}/snapshots/step_00000225/"
        + reason
    ]
    assert f"resumed from {run_dir}/snapshots/step_00000200 " in again.stderr
    assert summary(run_dir)["params_sha256"] == summary(finished_run)["params_sha256"]
    assert losses(run_dir) == losses(finished_run)
    assert steps(run_dir) == [225, 200, 150]
    for snap in list_snapshots(run_dir / "snapshots"):
        snap.verify()


# ==== retention =======================================================================================


def test_retention_keeps_the_newest_that_verify_and_never_the_newest_good_one(tmp_path, monkeypatch) -> None:
    store = SnapshotStore(tmp_path, ONE_PROCESS, keep_last=2)
    for step in (1, 2, 3, 4):
        save(store, step)
    assert steps(tmp_path) == [4, 3]

    def disk_full(obj, f) -> None:  # as torch.save reports a write that failed
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from None

    with monkeypatch.context() as m:  # the data write fails
        m.setattr(torch, "save", disk_full)
        with pytest.raises(SnapshotError) as failed:
            save(store, 5)
    assert str(failed.value) == (
        "snapshot step_00000005 not written (rank 0: [Errno 28] No space left on device); "
        "newest good snapshot: step_00000004"
    )
    with monkeypatch.context() as m:  # the commit fails on rank 0's commit thread: the next save says so
        m.setattr(snapshot, "fsync_dir", lambda path: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        store.save(6, {"w": torch.zeros(3)}, {}, {})  # returns at once: training goes on meanwhile
        with pytest.raises(SnapshotError) as failed:
            store.save(7, {"w": torch.zeros(3)}, {}, {})
    assert str(failed.value) == (
        "snapshot step_00000006 not written (rank 0: [Errno 5] I/O error); "
        "newest good snapshot: step_00000004"
    )
    assert steps(tmp_path) == [4, 3]
    assert sorted(p.name for p in store.dir.iterdir()) == ["step_00000003", "step_00000004"]

    flip_a_bit(store.dir / "step_00000004" / "shared.pt")
    store = SnapshotStore(tmp_path, ONE_PROCESS, keep_last=2)  # a restart
    assert store.find_latest().step == 3
    save(store, 5)
    assert steps(tmp_path) == [5, 3]  # the two newest that verify; step 4 did not
    save(store, 6)
    assert steps(tmp_path) == [6, 5]
    for snap in list_snapshots(store.dir):
        snap.verify()


# ==== SIGKILL at random moments =======================================================================


@pytest.mark.slow
def test_a_dozen_sigkills_at_random_moments_lose_nothing(tmp_path) -> None:
    """The job is killed 12 times (seeded moments, many inside snapshot writes), restarted with the same
    command each time, and ends as a run never interrupted; every snapshot on disk verifies."""
    job = [*SMALL, "trainer.max_epochs=1"]
    reference = disttrain(*job, f"run_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]

    counts = inject([*job, "snapshot.every_steps=2"], tmp_path / "killed", kills=12, seed=7, slow_write=0.05)
    print("fault injection:", json.dumps(counts))
    assert counts["kills"] == 12
    assert counts["params_sha256"] == summary(tmp_path / "reference")["params_sha256"]
    assert losses(tmp_path / "killed") == losses(tmp_path / "reference")
    assert counts["corruptions_detected"] == 0 and counts["unfinished_left"] == 0
    assert counts["snapshots_verified"] == 2  # keep_last=2, and inject() verified each
    # The kills did reach inside writes, and each life found and discarded what the last one left.
    assert counts["kills_inside_writes"] >= 1 and counts["unfinished_discarded"] >= 1
    assert counts["slow_writes"] >= 1  # the hook (tests/hooks) slowed the killed lives' writes


# ==== a full disk =====================================================================================


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted on a temporary directory (needs root), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    require(None if made.returncode == 0 else f"cannot mount a size-limited tmpfs: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_fails_the_job_in_one_line_and_the_previous_snapshot_stays_loadable(
    tmp_path, small_disk
) -> None:
    job = [*SMALL, "trainer.max_epochs=1", "snapshot.every_steps=50"]
    run_dir = small_disk / "run"
    first = disttrain(*job, "trainer.max_steps=100", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert steps(run_dir) == [100, 50]

    # Leave room for the metrics of 50 more steps but not for another snapshot (~75 kB).
    free = os.statvfs(small_disk)
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 60_000))
    full = disttrain(*job, "trainer.max_steps=200", f"run_dir={run_dir}")
    assert full.returncode == 1, full.stderr[-3000:]
    assert full.stderr.splitlines()[-1] == (
        "disttrain: error: snapshot step_00000150 not written (rank 0: [Errno 28] No space left on device); "
        "newest good snapshot: step_00000100"
    )
    assert "Traceback" not in full.stderr
    assert steps(run_dir) == [100, 50]
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["step_00000050", "step_00000100"]
    newest = Snapshot(run_dir / "snapshots" / "step_00000100")
    newest.verify()
    assert newest.load_shared()["counters"]["step"] == 100

    ballast.unlink()  # space is freed: the same command resumes from step 100 and ends exactly
    again = disttrain(*job, "trainer.max_steps=200", f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir}/snapshots/step_00000100 " in again.stderr
    reference = disttrain(*job, "trainer.max_steps=200", f"run_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert summary(run_dir)["params_sha256"] == summary(tmp_path / "reference")["params_sha256"]


def run_files(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of a run but its lock file, which records its newest holder (every start
    rewrites it): what a failed start must leave as it was."""
    return {name: sha for name, sha in tree_hashes(run_dir).items() if name != ".lock"}


def fill(disk: Path, leave: int = 0) -> Path:
    """Take all the free space of `disk` but `leave` bytes."""
    free = os.statvfs(disk)
    ballast = disk / "ballast"
    ballast.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - leave))
    return ballast


@pytest.mark.slow
def test_a_full_disk_outside_a_snapshot_write_is_one_line_and_cuts_nothing(tmp_path, small_disk) -> None:
    """Every run file, not only snapshots: the first config.yaml of a new run, the config.yaml of a resumed
    run, metrics.jsonl filling the disk mid-run. Then space is freed, and the same command ends exactly."""
    job = [*SMALL, "trainer.max_epochs=1"]
    ballast = fill(small_disk)
    fresh = disttrain(*job, f"run_dir={small_disk}/new")
    assert fresh.returncode == 1, fresh.stderr[-3000:]
    assert fresh.stderr == (
        f"disttrain: error: {small_disk}/new/.hydra/config.yaml: not written ([Errno 28] No space left on "
        "device)\n"
    )
    ballast.unlink()

    run_dir = small_disk / "run"
    first = disttrain(*job, "trainer.max_steps=20", "snapshot.every_steps=10", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    before, original = run_files(run_dir), (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in original] == list(range(1, 21))
    # No snapshot before step 200 in the resumed run: the disk fills with metrics.jsonl's lines first.
    command = [*job, "trainer.max_steps=200", f"run_dir={run_dir}"]
    ballast = fill(small_disk)
    resumed = disttrain(*command)
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert resumed.stderr == (
        f"disttrain: error: {run_dir}/.hydra/config.yaml: not written ([Errno 28] No space left on device)\n"
    )
    assert run_files(run_dir) == before
    ballast.unlink()

    # Room to rewrite every run file, and for about 15 kB of new metrics lines (3 pages): not 180 steps.
    ballast = fill(small_disk, leave=3 * 4096)
    full = disttrain(*command)
    assert full.returncode == 1, full.stderr[-3000:]
    assert full.stderr.splitlines()[-1] == (
        f"disttrain: error: {run_dir}/metrics.jsonl: not written ([Errno 28] No space left on device); "
        "newest good snapshot: step_00000020"
    )
    assert "Traceback" not in full.stderr and "Exception ignored" not in full.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines[:20] == original  # nothing cut: the resumed run's lines that fitted follow
    assert len(lines) > 20
    assert steps(run_dir) == [20, 10]
    for snap in list_snapshots(run_dir / "snapshots"):
        snap.verify()

    ballast.unlink()
    again = disttrain(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir}/snapshots/step_00000020 " in again.stderr
    reference = disttrain(*command[:-1], f"run_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert summary(run_dir)["params_sha256"] == summary(tmp_path / "reference")["params_sha256"]
    assert losses(run_dir) == losses(tmp_path / "reference")


@pytest.mark.slow
def test_a_run_dir_on_a_read_only_mount_is_refused_before_anything_starts(tmp_path, five_steps) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(five_steps, run_dir)
    before = tree_hashes(run_dir)
    made = subprocess.run(["mount", "--bind", "-o", "ro", str(run_dir), str(run_dir)], capture_output=True)
    require(None if made.returncode == 0 else f"cannot bind-mount read-only: {made.stderr.decode().strip()}")
    try:
        again = disttrain(*SMALL, "trainer.max_steps=10", f"run_dir={run_dir}")
    finally:
        subprocess.run(["umount", str(run_dir)], check=True)
    assert again.returncode == 2, again.stderr
    assert again.stderr == f"disttrain: error: run_dir='{run_dir}': not writable (Read-only file system)\n"
    assert tree_hashes(run_dir) == before


# ==== what else a run dir may hold: broken snapshots/, a damaged metrics.jsonl =========================


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dangling-symlink", "a-file"])
def test_snapshots_that_are_no_directory_are_refused_and_metrics_stay_whole(
    tmp_path, kind, five_steps
) -> None:
    """Read as "no snapshot", they would restart the run from step 0 and cut metrics.jsonl to nothing."""
    run_dir = tmp_path / "run"
    shutil.copytree(five_steps, run_dir)
    shutil.move(run_dir / "snapshots", tmp_path / "elsewhere")  # e.g. a filesystem not mounted
    if kind == "dangling-symlink":
        (run_dir / "snapshots").symlink_to(tmp_path / "unmounted" / "snapshots")
        reason = (
            f"a symlink to {tmp_path}/unmounted/snapshots, which does not exist: the run's snapshots are out "
            "of reach; restore the target, or remove the link to start afresh"
        )
    else:
        (run_dir / "snapshots").write_text("")
        reason = "not a directory; move it away to start afresh"
    before = tree_hashes(run_dir)
    again = disttrain(*SMALL, "trainer.max_steps=10", f"run_dir={run_dir}")
    assert again.returncode == 1, again.stderr
    assert again.stderr == f"disttrain: error: {run_dir}/snapshots: {reason}\n"
    assert tree_hashes(run_dir) == before


@pytest.mark.slow
def test_a_metrics_log_that_is_not_utf8_is_refused_on_resume_and_kept_as_it_is(tmp_path, five_steps) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(five_steps, run_dir)
    metrics = run_dir / "metrics.jsonl"
    data = metrics.read_bytes()
    at = data.index(b"\n") + 10  # inside the second line: damage no kill leaves
    metrics.write_bytes(data[:at] + b"\xff" + data[at + 1 :])
    before = tree_hashes(run_dir)
    again = disttrain(*SMALL, "trainer.max_steps=10", f"run_dir={run_dir}")
    assert again.returncode == 1, again.stderr
    assert again.stderr == (
        f"disttrain: error: {metrics}: not UTF-8 text (byte 0xff at offset {at}): resuming would cut it back "
        "around lines it cannot read; repair it or move it away, then run the same command\n"
    )
    assert tree_hashes(run_dir) == before  # refused before anything was rewritten, the lock included


# ==== resume mismatches (the CLI's config check is in test_cli; world size in test_resume) ============


def test_python_api_resume_with_another_optimizer_class_fails_in_one_line(tmp_path) -> None:
    """cfg.optim.name says sgd either way: only the snapshot knows which optimizer wrote it. AdamW would
    load SGD's state into its slots and fail at its first step with a KeyError."""
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.num_threads = 3, 16, 1
    data = TokenCorpus(vocab_size=50, num_tokens=2000)

    def fit(optimizer: type[torch.optim.Optimizer]) -> dict:
        model = MLPLanguageModel(vocab_size=50)
        return Trainer(model, optimizer(model.parameters(), lr=0.01), data, cfg).fit()

    assert fit(torch.optim.SGD)["steps"] == 3
    with pytest.raises(SnapshotError) as refused:
        fit(torch.optim.AdamW)
    assert str(refused.value) == (
        f"cannot resume from {tmp_path}/run/snapshots/step_00000003: the optimizer differs: the snapshot was "
        "written with torch.optim.sgd.SGD and this Trainer has torch.optim.adamw.AdamW; resume with "
        "torch.optim.sgd.SGD, or start a new run_dir"
    )


def test_python_api_resume_into_a_model_of_another_shape_fails_in_one_line(tmp_path) -> None:
    """cfg.model still says hidden=64, so only the weights themselves can tell: load_state_dict's many-line
    error becomes one line naming the first difference."""
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.num_threads = 3, 16, 1
    data = TokenCorpus(vocab_size=50, num_tokens=2000)

    def fit(hidden: int) -> dict:
        torch.manual_seed(0)
        model = MLPLanguageModel(vocab_size=50, hidden=hidden)
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, cfg).fit()

    assert fit(64)["steps"] == 3
    with pytest.raises(SnapshotError) as refused:
        fit(32)
    assert str(refused.value) == (
        f"cannot resume from {tmp_path}/run/snapshots/step_00000003: the model differs: size mismatch "
        "for hidden.weight: copying a param with shape torch.Size([64, 40]) from checkpoint, the shape in "
        "current model is torch.Size([32, 40])."
    )
