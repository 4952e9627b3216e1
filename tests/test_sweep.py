"""`disttrain -m`: one job per combination, each in its own run dir under one sweep dir, then one table;
the same sweep again resumes every job; bad sweeps are refused before the first job starts."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from disttrain.cli import main
from tests.clusters.slurm import SlurmCluster
from tests.support import disttrain, summary, tree_hashes

#: The torchrun tutorial's job, small: 256 samples of 20 features, batch 32, 8 steps an epoch.
JOB = ["experiment=regression", "data.size=256", "trainer.max_epochs=1", "trainer.num_threads=1"]
SWEPT = ["optim.lr=0.1,0.03", "trainer.seed=1,2"]
COMBOS = [f"optim.lr={lr},trainer.seed={seed}" for lr in ("0.1", "0.03") for seed in (1, 2)]


def table(stdout: str) -> list[list[str]]:
    """The rows of the sweep's closing table, after its header."""
    lines = stdout[stdout.index("job | overrides") :].splitlines()
    return [[cell.strip() for cell in line.split("|")] for line in lines[1:] if "|" in line]


@pytest.mark.slow
def test_a_two_by_two_sweep_runs_four_jobs_and_resumes_them_all(tmp_path: Path) -> None:
    first = disttrain("-m", *JOB, *SWEPT, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    sweep_dir = tmp_path / "runs" / "regression" / "multirun"
    assert sorted(p.name for p in sweep_dir.iterdir()) == sorted(COMBOS)
    rows = table(first.stdout)
    assert [r[1] for r in rows] == [c.replace(",", " ") for c in COMBOS]
    hashes = set()
    for row, combo in zip(rows, COMBOS, strict=True):
        s = summary(sweep_dir / combo)
        assert (
            row[2:5] == ["0", "8", f"{s['final_loss']:.4f}"] and row[5] == f"runs/regression/multirun/{combo}"
        )
        hashes.add(s["params_sha256"])
    assert len(hashes) == 4  # four different jobs, not one job four times
    lr = (sweep_dir / "optim.lr=0.03,trainer.seed=2" / "config.yaml").read_text()
    assert "lr: 0.03" in lr and "seed: 2" in lr

    before = tree_hashes(sweep_dir)
    again = disttrain("-m", *JOB, *SWEPT, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stderr.count("resumed from") == 4  # every job found its snapshot
    assert table(again.stdout) == rows
    after = tree_hashes(sweep_dir)
    for combo in COMBOS:  # nothing retrained: the steps and the weights are the first run's
        metrics = f"{combo}/metrics.jsonl"
        assert after[metrics] == before[metrics]
        assert summary(sweep_dir / combo)["params_sha256"] in hashes


@pytest.mark.slow
def test_a_sweep_of_torchrun_jobs_runs_them_one_after_the_other(tmp_path: Path) -> None:
    result = disttrain("-m", *JOB, "launcher=torchrun", "trainer.seed=1,2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for seed in (1, 2):
        s = summary(tmp_path / "runs" / "regression" / "multirun" / f"trainer.seed={seed}")
        assert (s["world_size"], s["steps"]) == (2, 4)  # 256 samples on 2 ranks, batch 32: 4 steps


def refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """A sweep the command line refuses, in this process (nothing starts): its stderr. The CLI appends
    the directory it runs from to sys.path, so sys.path is restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["-m", *JOB, *args]) == 2
    return capsys.readouterr().err


def test_a_sweep_with_one_bad_combination_starts_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert refused(monkeypatch, capsys, "optim.lr=0.1,-1", "trainer.seed=1,2") == (
        "disttrain: error: sweep job 3 (optim.lr=-1 trainer.seed=1): optim.lr=-1.0: must be positive\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_job_whose_callback_breaks_when_built_is_one_line_naming_the_job(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    broken = "+callbacks.broken._target_=tests.callbacks.BreaksWhenBuilt"
    assert main(["-m", *JOB, "optim.lr=0.1,0.03", broken]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"disttrain: error: sweep job 1 \(optim\.lr=0\.1\): callbacks\.broken\._target_="
        r"'tests\.callbacks\.BreaksWhenBuilt': building it raised RuntimeError: the metrics server is down "
        r"\(\S+/tests/callbacks\.py:\d+\)\n",
        err,
    ), err
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_whose_jobs_would_share_a_run_dir_starts_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert refused(monkeypatch, capsys, "optim.lr=0.1,0.03", "run_dir=runs/one") == (
        "disttrain: error: sweep: jobs 1 (optim.lr=0.1) and 2 (optim.lr=0.03) would share "
        "run_dir='runs/one'; leave run_dir to the sweep, or make it depend on a swept value\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_sweep_submits_one_slurm_job_per_combination(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    result = disttrain(
        "-m",
        *JOB,
        "trainer.seed=1,2",
        "launcher=slurm",
        "launcher.time=00:05:00",
        "launcher.wait=true",
        cwd=tmp_path,
        SLURM_CONF=slurm_cluster.env["SLURM_CONF"],
        PATH=slurm_cluster.env["PATH"],
        timeout=400,
    )
    assert result.returncode == 0, result.stdout + result.stderr + slurm_cluster.logs()
    jobs = re.findall(r"^submitted SLURM job (\d+)$", result.stdout, re.M)
    assert len(set(jobs)) == 2
    rows = table(result.stdout)
    for row, seed in zip(rows, (1, 2), strict=True):
        run_dir = tmp_path / "runs" / "regression" / "multirun" / f"trainer.seed={seed}"
        assert row[2:4] == ["0", "8"] and summary(run_dir)["steps"] == 8
