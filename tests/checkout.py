"""A clean checkout after the suite (a pytest plugin: tests/conftest.py loads it).

Every file a test writes goes under a temporary directory. Where the suite runs in a git checkout (its
rootdir, the directory of pyproject.toml, is the checkout's top), the session compares `git status` at
its start and its end, and fails naming every file a test wrote into the repository (a job's
`slurm-*.out`, a run dir, a `build/`, even one .gitignore covers) or changed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

#: Ignored paths that Python and the developers' own tools write wherever they run: not a test's doing.
TOOL_CACHES = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"})


def status(root: Path) -> set[str] | None:
    """`git status --porcelain` lines ("XY path") of the checkout whose top is `root`, every untracked
    and ignored file named one by one, tool caches and the editable install's egg-info left out; None
    when `root` is no git checkout's top (an unpacked sdist, a copy) or git is not installed."""
    git = ["git", "-C", str(root)]
    try:
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
            return None
        listed = subprocess.run(
            [*git, "status", "--porcelain", "-z", "--untracked-files=all", "--ignored"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except OSError:
        return None
    lines: set[str] = set()
    entries = iter(listed.split("\0"))
    for entry in entries:
        if not entry:
            continue
        if entry[0] in "RC":  # a rename or copy: the next entry is the path it came from
            next(entries, None)
        parts = Path(entry[3:]).parts
        if TOOL_CACHES.intersection(parts) or any(p.endswith(".egg-info") for p in parts):
            continue
        lines.add(entry)
    return lines


def stray(before: set[str], after: set[str]) -> list[str]:
    """The status lines of paths a run added, sorted: what its tests wrote into the checkout or changed
    in it. By path, not by line: a file the developer had changed, or stages while the suite runs, is
    not the suite's doing."""
    listed = {line[3:] for line in before}
    return sorted(line for line in after if line[3:] not in listed)


_BEFORE = pytest.StashKey[set[str] | None]()
_STRAY = pytest.StashKey[list[str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[_BEFORE] = status(session.config.rootpath)


def pytest_sessionfinish(session: pytest.Session) -> None:
    before = session.stash.get(_BEFORE, None)
    after = status(session.config.rootpath) if before is not None else None
    if before is not None and after is not None and (new := stray(before, after)):
        session.config.stash[_STRAY] = new
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    new = terminalreporter.config.stash.get(_STRAY, None)
    if not new:
        return
    terminalreporter.write_sep("=", "the checkout is not clean", red=True)
    root = terminalreporter.config.rootpath
    terminalreporter.write_line(f"the tests left {len(new)} change(s) in {root} (git status --ignored):")
    for line in new:
        terminalreporter.write_line(f"    {line}")
    terminalreporter.write_line(
        "write them under tmp_path instead (a developer tool's own cache: TOOL_CACHES in tests/checkout.py)"
    )
