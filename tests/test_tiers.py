"""The test suite's own rules: a test outside the `slow` tier starts no process (tests/tiers.py), and the
suite leaves the checkout as it found it (tests/checkout.py)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import checkout
from tests.tiers import STARTERS, no_process_started


def fork() -> None:
    if os.fork() == 0:  # not refused after all: the child must not go on running the suite
        os._exit(1)


# Each looks its starter up when called, as the code under test does (none is bound here, unguarded).
ATTEMPTS: dict[str, Callable[[], Any]] = {
    "Popen._execute_child": lambda: subprocess.run([sys.executable, "-c", "pass"]),
    "os.fork": fork,
    "os.system": lambda: os.system("true"),
    "os.posix_spawn": lambda: os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ),
    "multiprocessing.util.spawnv_passfds": lambda: (
        multiprocessing.get_context("spawn").Process(target=print).start()
    ),
}


@pytest.mark.parametrize("label", ATTEMPTS)
def test_every_way_to_start_a_process_is_refused(label: str) -> None:
    with pytest.raises(pytest.fail.Exception) as refused, no_process_started("here"):
        ATTEMPTS[label]()
    assert str(refused.value).startswith(f"here started a process ({label}): a test that starts processes")


def test_a_refusal_the_code_catches_still_fails() -> None:
    caught = r"here started a process \(Popen._execute_child\)"
    with pytest.raises(pytest.fail.Exception, match=caught), no_process_started("here"):
        try:  # noqa: SIM105 - what code that swallows everything does
            subprocess.run(["true"])
        except BaseException:
            pass


def test_the_starters_come_back_and_pickle_as_before() -> None:
    before = [getattr(owner, name) for owner, name in STARTERS]
    expected = pickle.dumps(os.system)
    with no_process_started("here"):
        assert all(getattr(o, n) is not b for (o, n), b in zip(STARTERS, before, strict=True))
        assert pickle.dumps(os.system) == expected  # a reference to posix.system, as test_snapshots needs
    assert all(getattr(o, n) is b for (o, n), b in zip(STARTERS, before, strict=True))


@pytest.mark.slow
def test_the_fast_tier_fails_a_test_that_starts_a_process_and_spares_a_slow_one(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(
        "[pytest]\nmarkers =\n    slow: starts processes\naddopts = --strict-markers -p tests.tiers\n"
    )
    pytester.makepyfile(
        test_inner="""
        import subprocess, sys
        import pytest

        def start():
            return subprocess.run([sys.executable, "-c", "pass"]).returncode

        @pytest.fixture
        def started():
            start()

        def test_in_process():
            assert sum([1, 2]) == 3

        def test_starts_one():
            start()

        def test_whose_fixture_starts_one(started):
            pass

        @pytest.mark.slow
        def test_marked_slow():
            assert start() == 0
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*the setup of test_inner.py::test_whose_fixture_starts_one started a process (Popen.*",
            "*test_inner.py::test_starts_one started a process (Popen._execute_child): a test that starts*",
        ],
        consecutive=False,
    )


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@pytest.mark.slow
def test_the_checkout_status_names_what_a_run_added(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / ".gitignore").write_text("runs/\n__pycache__/\n")
    (root / "kept.txt").write_text("tracked\n")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    before = checkout.status(root)
    assert before == set()
    (root / "slurm-1.out").write_text("a job's log\n")
    (root / "runs" / "x").mkdir(parents=True)
    (root / "runs" / "x" / "summary.json").write_text("{}")  # ignored by .gitignore, reported all the same
    (root / "kept.txt").write_text("changed\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"")  # a tool's cache: not reported
    (root / "disttrain.egg-info").mkdir()
    (root / "disttrain.egg-info" / "PKG-INFO").write_text("")
    after = checkout.status(root)
    assert after is not None
    assert checkout.stray(before, after) == [" M kept.txt", "!! runs/x/summary.json", "?? slurm-1.out"]
    git(root, "add", "kept.txt")  # staged while a suite runs: a developer's doing, not the suite's
    staged = checkout.status(root)
    assert staged is not None and "M  kept.txt" in staged
    assert checkout.stray(after, staged) == []
    assert checkout.status(root / "runs") is None  # inside a checkout, but not its top
    outside = tmp_path / "not-a-checkout"
    outside.mkdir()
    assert checkout.status(outside) is None


@pytest.mark.slow
def test_a_session_that_leaves_a_file_in_the_checkout_fails_naming_it(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = -p tests.checkout -p no:cacheprovider\n")
    pytester.makepyfile(
        test_writes="""
        def test_in_tmp(tmp_path):
            (tmp_path / "slurm-1.out").write_text("")

        def test_in_the_checkout(request):
            (request.config.rootpath / "slurm-1.out").write_text("")
        """
    )
    git(pytester.path, "init", "-q")
    git(pytester.path, "add", ".")
    git(pytester.path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    assert pytester.runpytest_inprocess("-k", "in_tmp").ret == pytest.ExitCode.OK
    dirty = pytester.runpytest_inprocess("-k", "in_the_checkout")
    assert dirty.ret == pytest.ExitCode.TESTS_FAILED
    dirty.stdout.fnmatch_lines(
        [
            "*= the checkout is not clean =*",
            "the tests left 1 change(s) in *",
            "    ?? slurm-1.out",
            "*tmp_path*",
        ]
    )
    # The next session starts with the file there: only what a session adds counts.
    assert pytester.runpytest_inprocess("-k", "in_the_checkout").ret == pytest.ExitCode.OK
