"""Fixtures several test modules share; the plugins that keep the fast tier in-process (tests/tiers.py)
and the checkout clean after the suite (tests/checkout.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
import torch

from disttrain.cli import main
from tests.clusters.netns import TwoHosts, netns_available
from tests.clusters.slurm import SlurmCluster, slurm_available
from tests.support import JOB, ROOT, disttrain, require, summary


class CliHere(Protocol):
    """What the cli_here fixture returns."""

    def __call__(self, *args: str, cwd: Path = ..., **environ: str) -> subprocess.CompletedProcess[str]: ...


pytest_plugins = ["tests.tiers", "tests.checkout", "pytester"]


# ==== shared runs ====================================================================================


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """params_sha256 of JOB on one node with 2 torchrun processes: what every other launch of JOB
    (multinode, elastic restart, SLURM, a signal and a resume) must end on. One run for the session."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    res = disttrain(*JOB, "launcher=torchrun", "launcher.nproc_per_node=2", f"run_dir={run_dir}")
    assert res.returncode == 0, res.stdout + res.stderr
    return summary(run_dir)["params_sha256"]


@pytest.fixture
def cli_here(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> CliHere:
    """`disttrain ARGS` run in this process, for what the command line refuses before anything starts:
    the call's exit code, stdout and stderr, as `tests.support.disttrain` returns a process's. Keyword
    arguments set environment variables for the call; it runs in the checkout, as that does, unless
    given `cwd`. A refusal leaves this process as it found it: no process group made, the same
    threads. (The CLI appends the directory it runs from to sys.path: restored afterwards.)"""

    def run(*args: str, cwd: Path = ROOT, **environ: str) -> subprocess.CompletedProcess[str]:
        monkeypatch.setattr(sys, "path", list(sys.path))
        monkeypatch.chdir(cwd)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        before = (torch.distributed.is_initialized(), torch.get_num_threads())
        code = main(list(args))
        out, err = capsys.readouterr()
        assert (torch.distributed.is_initialized(), torch.get_num_threads()) == before
        return subprocess.CompletedProcess(["disttrain", *args], code, out, err)

    return run


# ==== real-cluster fixtures (tests/clusters): SLURM and network namespaces ===========================
# They need a service; `require` fails under CI=true when it is missing (CI must provide it), and may
# only skip outside CI.


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real slurmctld + slurmd n1, n2 on this machine, shared by the whole session."""
    require(slurm_available())
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    """Two network namespaces joined by a veth pair; deleted after the test."""
    require(netns_available())
    with TwoHosts() as hosts:
        yield hosts


# ==== end of real-cluster fixtures ===================================================================


# ==== two tests at a time (pytest-xdist: scripts/test runs `-n 2 --dist loadgroup`) ==================
# A test spends much of its time in one process's start (imports, rendezvous, a scheduler's poll) while
# the other core idles, so the suite runs two at a time. A fixture shared by several tests is made once
# per worker: the tests that use the SLURM cluster (one per session: its daemons, ports and job ids) or
# a module's shared run go to one worker together. The network namespaces are no such fixture: each
# test makes its own pair, named after its worker's pid, and nothing outside the pair sees it, so those
# tests run wherever xdist puts them (beside the SLURM ones too, whose daemons listen on this host's
# loopback only).

#: fixture -> the worker group of every test that uses it (None: the test's own module).
SHARED_BY: dict[str, str | None] = {
    "slurm_cluster": "cluster",
    "reference": None,
    "tail_reference": None,
    "shard_reference": None,
    "fsdp_reference": None,
    "five_fsdp_steps": None,
    "two_runs": None,
    "finished_run": None,
    "five_steps": None,
    "stream_lives": None,
    "venv": None,
    "import_failures": None,
}


def pytest_configure(config: pytest.Config) -> None:
    """matplotlib's first import on a machine lists its fonts with fontconfig's `fc-list` (a process)
    and caches them: done once here, so that the fast tier's plot tests find the cache on a fresh
    machine instead of tripping the fast tier's rule against starting processes."""
    with contextlib.suppress(ImportError):
        import matplotlib.font_manager  # noqa: F401


# tryfirst: xdist reads the marks in its own hook of this name (it appends the group to each node id,
# which is what loadgroup schedules by), and a conftest's hook runs after a plugin's unless told.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = [name for name in SHARED_BY if name in getattr(item, "fixturenames", ())]
        if used:
            group = next((SHARED_BY[n] for n in used if SHARED_BY[n]), None) or item.module.__name__
            item.add_marker(pytest.mark.xdist_group(group))
