"""The package's layers import downwards only (docs/design.md, the layers): read from the source, every
import of a disttrain module, at module level or inside a function, points at a lower layer or the same
one."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

#: Bottom to top; modules of one layer may import each other.
LAYERS = [
    ["config"],
    ["dist"],
    ["data", "shards", "streams", "models", "step"],
    ["strategy", "precision"],
    ["sharded", "snapshot"],
    ["runlock", "health", "metrics", "progress", "run_state"],
    ["callbacks"],
    ["loggers", "ema", "early_stopping", "best_snapshots", "profiler"],
    ["training_step", "validation", "reporting", "stop_agreement", "checkpointer"],
    ["trainer"],
    ["worker"],
    ["compose", "conf"],
    ["launch.supervise", "launch.local", "launch.torchrun", "launch.slurm", "launch"],
    ["sweep", "check", "plot", "export", "tokenize"],
    ["cli", "__main__", ""],
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
PACKAGE = ROOT / "disttrain"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def disttrain_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module == "disttrain":  # `from disttrain import x`
            names = [
                f"disttrain.{a.name}" if (PACKAGE / f"{a.name}.py").exists() else "disttrain"
                for a in node.names
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            if name == "disttrain" or name.startswith("disttrain."):
                found.add(name.removeprefix("disttrain").removeprefix("."))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) or "__init__" for p in MODULES])
def test_every_import_points_down(path: Path) -> None:
    me = module_name(path)
    assert me in LEVEL, f"{me}: not placed in a layer of tests/test_layers.py"
    upward = [m for m in disttrain_imports(path) if me and LEVEL.get(m, -1) > LEVEL[me]]
    assert not upward, f"disttrain.{me} (layer {LEVEL[me]}) imports upwards: {upward}"


IMPORTABLE = [p for p in MODULES if p.name != "__main__.py"]  # importing __main__ runs the CLI

#: Imports each module named on the command line with no disttrain module loaded before it (the ones an
#: earlier import loaded are dropped; torch and the rest stay, which is what makes one process enough).
IMPORT_EACH_ALONE = """
import json, sys, traceback
failures = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "disttrain" or m.startswith("disttrain.")]:
        del sys.modules[loaded]
    try:
        __import__(name)
    except BaseException:
        failures[name] = traceback.format_exc()
print(json.dumps(failures))
"""


def importable_name(path: Path) -> str:
    return ".".join(filter(None, ["disttrain", module_name(path)]))


@pytest.fixture(scope="module")
def import_failures() -> dict[str, str]:
    """Each importable module's traceback when it fails to import alone (one process for them all)."""
    names = [importable_name(p) for p in IMPORTABLE]
    res = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_ALONE, *names], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("path", IMPORTABLE, ids=[module_name(p) or "__init__" for p in IMPORTABLE])
def test_every_module_imports_alone(path: Path, import_failures: dict[str, str]) -> None:
    assert importable_name(path) not in import_failures, import_failures[importable_name(path)]


TEST_MODULES = sorted((ROOT / "tests").rglob("*.py"))


@pytest.mark.parametrize("path", TEST_MODULES, ids=[str(p.relative_to(ROOT)) for p in TEST_MODULES])
def test_no_test_module_imports_another(path: Path) -> None:
    """What several test files share lives in tests/support.py, tests/callbacks.py or tests/conftest.py:
    a test module importing another runs that module's fixtures and module-level work as a side effect."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    tests = [m for m in imported if m.split(".")[-1].startswith("test_") and m.startswith("tests")]
    assert not tests, f"{path.relative_to(ROOT)} imports test modules: {tests}"
