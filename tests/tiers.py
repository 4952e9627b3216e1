"""The two test tiers, kept true (a pytest plugin: tests/conftest.py loads it).

A test that starts a process (the CLI, a script, torchrun, a DataLoader's workers, SLURM, network
namespaces) is marked `slow`; `scripts/test -m "not slow"` runs the others, all in pytest's own process,
in a few minutes. Outside `slow`, a process started by a test, by its fixtures' setup or by its teardown
fails that test, with the traceback of the call that started it: a test cannot slip into the fast tier
by accident, and the fast tier stays fast."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

#: Every way Python starts a process: Popen (subprocess.run, check_output, os.popen, asyncio), fork
#: (multiprocessing's default start method, pty, os.spawn*), posix_spawn, os.system, and the fork-exec
#: of multiprocessing's spawn and forkserver start methods.
STARTERS: list[tuple[Any, str]] = [
    (subprocess.Popen, "_execute_child"),
    (os, "fork"),
    (os, "forkpty"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
    (os, "system"),
    (multiprocessing.util, "spawnv_passfds"),
]

RULE = "a test that starts processes is marked @pytest.mark.slow (or its module sets pytestmark)"


@contextlib.contextmanager
def no_process_started(where: str) -> Iterator[None]:
    """Within the block, starting a process raises pytest's Failed (a BaseException, which the code under
    test does not catch by accident), naming `where` and the rule; one the code caught anyway fails at
    the block's end. Nothing is started: the refusal comes before any fork."""
    started: list[str] = []

    def refusal(label: str, original: Callable[..., Any]) -> Callable[..., Any]:
        # wraps: the refusal has the original's module and name, so pickling it still writes a reference
        # to the original (test_snapshots pickles os.system and expects `posix.system` in the file).
        @functools.wraps(original)
        def refused(*args: Any, **kwargs: Any) -> Any:
            started.append(label)
            pytest.fail(f"{where} started a process ({label}): {RULE}")

        return refused

    patched: list[tuple[Any, str, Any]] = []
    for owner, name in STARTERS:
        original = getattr(owner, name, None)
        if original is None:
            continue
        replacement = refusal(f"{getattr(owner, '__name__', owner)}.{name}", original)
        # os.fork is posix.fork: both names get the refusal (pickle looks the function up in posix).
        home = sys.modules.get(getattr(original, "__module__", None) or "")
        for holder in (owner, home):
            if holder is not None and getattr(holder, name, None) is original:
                patched.append((holder, name, original))
                setattr(holder, name, replacement)
    try:
        yield
    finally:
        for holder, name, original in reversed(patched):
            setattr(holder, name, original)
    if started:  # the refusal was caught (an `except BaseException` in the code under test)
        pytest.fail(f"{where} started a process ({', '.join(started)}): {RULE}")


def _fast(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    if not _fast(item):
        return (yield)
    with no_process_started(f"the setup of {item.nodeid}"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if not _fast(item):
        return (yield)
    with no_process_started(item.nodeid):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # The last item's teardown also ends the session's fixtures, such as the SLURM cluster a slow test
    # started: stopping it is not this test's doing.
    if not _fast(item) or nextitem is None:
        return (yield)
    with no_process_started(f"the teardown of {item.nodeid}"):
        return (yield)
