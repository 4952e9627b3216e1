"""A test hook, outside the package: slow snapshot writes, so that a signal or a kill lands inside one.

Python imports `sitecustomize` at start-up from the first directory on its path that has one: a process
with this directory on its PYTHONPATH (tests/support.py `slow_writes`, scripts/fault_inject.py), and every
process it starts that inherits the environment (torchrun's workers), loads this file. With
DISTTRAIN_TEST_SLOW_WRITE=SECONDS set, every snapshot write then sleeps SECONDS after its data files and
before its commit (the manifest, written last, inside the `.partial` staging directory), having appended
a line to the file DISTTRAIN_TEST_SLOW_WRITE_LOG names, if any: a test asserts the slowdown applied.

The patch goes on `disttrain.snapshot.write_file` as that module is imported (a process that never
imports it, such as torchrun itself, is left alone). This file shadows any other `sitecustomize` on the
path; the test environment has none.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

SECONDS_ENV = "DISTTRAIN_TEST_SLOW_WRITE"
LOG_ENV = "DISTTRAIN_TEST_SLOW_WRITE_LOG"
HOOKS = Path(__file__).resolve().parent
TARGET = "disttrain.snapshot"


def slow_down(snapshot: ModuleType, seconds: float) -> None:
    """Make `snapshot`'s write of a commit's manifest sleep `seconds` first (and log it)."""
    write_file = snapshot.write_file

    def slow_write_file(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path.name == snapshot.MANIFEST and path.parent.name.endswith(snapshot.PARTIAL):
            if log := os.environ.get(LOG_ENV):  # first: a test may look while the write sleeps
                with open(log, "a") as f:
                    f.write(f"{os.getpid()} {path.parent.name}\n")
            time.sleep(seconds)
        return write_file(path, *args, **kwargs)

    snapshot.write_file = slow_write_file


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds `disttrain.snapshot` as the path finder does, and patches it once it has run."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            slow_down(module, float(os.environ[SECONDS_ENV]))

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get(SECONDS_ENV):
    sys.meta_path.insert(0, _PatchOnImport())
