"""The test suite's own rule: a test outside the `slow` tier starts no process (tests/tiers.py)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

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
