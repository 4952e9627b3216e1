"""disttrain as a user gets it: a wheel installed into a fresh virtual environment outside this checkout,
run from another directory, extended from the user's own project (their package and their config dir),
and driven from their own `@hydra.main` app."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow  # every test here starts processes

#: The user's project: a package with a model and a dataset, and a config dir with a model, a dataset
#: and an experiment that overrides built-in defaults (optim.lr, trainer.batch_size, name).
USER_PROJECT = {
    "mypkg/__init__.py": """
        import torch
        from torch import nn
        from torch.utils.data import Dataset


        class MyNet(nn.Module):
            def __init__(self, width: int = 8) -> None:
                super().__init__()
                self.net = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))

            def forward(self, x):
                return self.net(x)


        class MyData(Dataset):
            loss = "mse"

            def __init__(self, size: int = 256) -> None:
                g = torch.Generator().manual_seed(0)
                self.x = torch.randn(size, 4, generator=g)
                self.y = self.x.sum(1, keepdim=True)

            def __len__(self):
                return len(self.x)

            def __getitem__(self, i):
                return self.x[i], self.y[i]
    """,
    "conf/model/mynet.yaml": """
        _target_: mypkg.MyNet
        width: 16
    """,
    "conf/data/mydata.yaml": """
        _target_: mypkg.MyData
    """,
    "conf/experiment/big.yaml": """
        # @package _global_
        defaults:
          - override /model: mynet
          - override /data: mydata
        name: big
        trainer:
          batch_size: 16
          max_epochs: 2
          num_threads: 1
        optim:
          lr: 0.05
    """,
    # Their own app: a primary config that starts from disttrain's, found through the search path.
    "conf/app.yaml": """
        defaults:
          - train
          - _self_
        hydra:
          searchpath:
            - pkg://disttrain.conf
    """,
    "app.py": """
        import hydra
        from omegaconf import DictConfig

        import disttrain


        @hydra.main(version_base="1.3", config_path="conf", config_name="app")
        def main(cfg: DictConfig) -> int:
            return disttrain.run(cfg)


        if __name__ == "__main__":
            main()
    """,
}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel built from this checkout (and its `plot` extra)
    installed, CPU torch pinned by the constraints file, as the README tells a user."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and an egg-info into the tree it builds, and this
    # checkout must stay as it was (tests/checkout.py).
    source = root / "source"
    junk = (
        "build",
        "dist",
        "*.egg-info",
        ".git",
        ".venv",
        "__pycache__",
        ".*_cache",
        "runs",
        "outputs",
        "wandb",
    )
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*junk))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (root / "dist").glob("disttrain-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    pip = [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "-q"]
    install = subprocess.run(
        [*pip, "-c", str(ROOT / "constraints.txt"), f"{wheel}[plot]"], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return root / "venv"


def run_in(venv: Path, cwd: Path, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A command of the venv, in `cwd`, with nothing of this checkout on the path."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE", "RANK")}
    environ.update(PATH=f"{venv / 'bin'}:{environ['PATH']}", OMP_NUM_THREADS="1", VIRTUAL_ENV=str(venv))
    return subprocess.run(list(cmd), cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


def user_project(root: Path) -> Path:
    for name, text in USER_PROJECT.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


SMALL = ["data.num_tokens=3000", "data.vocab_size=50", "trainer.batch_size=16", "trainer.num_threads=1"]


def test_the_installed_wheel_runs_the_readme_commands_from_another_directory(venv, tmp_path) -> None:
    where = run_in(venv, tmp_path, "python", "-c", "import disttrain, sys; print(disttrain.__file__)")
    assert where.stdout.startswith(str(venv)), where.stdout  # the wheel's copy, not this checkout's
    one = run_in(venv, tmp_path, "disttrain", *SMALL, "trainer.max_steps=5", "run_dir=one")
    assert one.returncode == 0, one.stderr
    assert "done: 5 steps (max_steps)" in one.stdout and summary(tmp_path / "one")["steps"] == 5
    cfg = run_in(venv, tmp_path, "disttrain", "--cfg", "experiment=gpt")
    assert cfg.returncode == 0 and "name: gpt" in cfg.stdout and "lr: 0.001" in cfg.stdout, cfg.stderr
    ddp = run_in(
        venv, tmp_path, "disttrain", *SMALL, "trainer.max_steps=6", "launcher=torchrun", "run_dir=ddp"
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert summary(tmp_path / "ddp")["world_size"] == 2
    slurm = run_in(venv, tmp_path, "disttrain", "launcher=slurm", "launcher.dry_run=true", "run_dir=s")
    assert slurm.returncode == 0 and "-m disttrain.worker" in slurm.stdout, slurm.stderr
    # `disttrain check` on a GPT with dropout: its twins only (tests/test_check.py runs every pair).
    gpt = ["experiment=gpt", "data.num_tokens=2000", "data.context=8", "model.n_layer=2", "model.n_embd=16"]
    check = run_in(venv, tmp_path, "disttrain", "check", *gpt, "model.n_head=2", "model.dropout=0.1")
    assert check.returncode == 0 and "OK: all 18 pairs" in check.stdout, check.stdout + check.stderr
    plot = run_in(venv, tmp_path, "disttrain", "plot", "one", "ddp", "-o", "p.png")
    assert plot.returncode == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG", plot.stderr


def test_a_user_project_adds_its_own_groups_overrides_defaults_and_resumes(venv, tmp_path) -> None:
    project = user_project(tmp_path)
    first = run_in(venv, project, "disttrain", "--config-dir", "conf", "experiment=big", "run_dir=runs/a")
    assert first.returncode == 0, first.stderr
    frozen = (project / "runs/a/config.yaml").read_text()
    assert "_target_: mypkg.MyNet" in frozen and "width: 16" in frozen and "lr: 0.05" in frozen
    assert summary(project / "runs/a")["steps"] == 30  # 2 epochs × 15 batches (231 training samples)
    # Resume with more epochs: the run continues from its snapshot, it does not start over.
    more = run_in(
        venv, project, "disttrain", "-cd", "conf", "experiment=big", "trainer.max_epochs=3", "run_dir=runs/a"
    )
    assert more.returncode == 0, more.stderr
    assert "resumed from runs/a/snapshots/step_00000030" in more.stderr
    assert summary(project / "runs/a")["steps"] == 45
    # The same groups through Hydra's own search-path override, and through the user's @hydra.main app:
    # the same job, the same weights.
    searchpath = f"hydra.searchpath=[file://{project / 'conf'}]"
    via_searchpath = run_in(venv, project, "disttrain", searchpath, "experiment=big", "run_dir=runs/b")
    app = run_in(venv, project, "python", "app.py", "experiment=big", "run_dir=runs/c")
    assert via_searchpath.returncode == 0, via_searchpath.stderr
    assert app.returncode == 0, app.stderr[-3000:]
    first_sha = json.loads((project / "runs/a/snapshots/step_00000030/manifest.json").read_text())
    assert first_sha["config"]["model"]["_target_"] == "mypkg.MyNet"
    assert summary(project / "runs/b")["params_sha256"] == summary(project / "runs/c")["params_sha256"]
    assert summary(project / "runs/b")["steps"] == summary(project / "runs/c")["steps"] == 30


def test_bad_config_dirs_are_one_line(venv, tmp_path) -> None:
    project = user_project(tmp_path)
    missing = run_in(venv, project, "disttrain", "--config-dir", "nope", "run_dir=r")
    assert (missing.returncode, missing.stderr) == (
        2,
        "disttrain: error: --config-dir='nope': no such directory\n",
    )
    (project / "conf/model/gpt.yaml").write_text("_target_: mypkg.MyNet\n")
    shadow = run_in(venv, project, "disttrain", "--config-dir", "conf", "model=gpt", "run_dir=r")
    assert (shadow.returncode, shadow.stderr) == (
        2,
        "disttrain: error: --config-dir='conf': model/gpt.yaml has the name of disttrain's built-in "
        "model=gpt, which would win over it; rename yours\n",
    )
    assert not (project / "r").exists()
