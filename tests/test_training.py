"""The training step: learning, accumulation arithmetic, AMP clipping, DataParallel, no_sync, validation."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from disttrain import TrainConfig, Trainer
from disttrain.config import OptimConfig, TrainerConfig
from disttrain.data import RandomRegression
from disttrain.metrics import read_metrics
from tests.support import ROOT, SMALL, disttrain, env, summary, torchrun


@pytest.mark.slow
def test_default_job_learns_and_leaves_its_record(tmp_path) -> None:
    run_dir = tmp_path / "run"
    result = disttrain(f"run_dir={run_dir}", "data.num_tokens=30000", "trainer.max_epochs=3")
    assert result.returncode == 0, result.stderr
    val = [float(v) for v in re.findall(r"val loss ([\d.]+)", result.stdout)]
    assert len(val) == 3, result.stdout
    assert val[2] < val[0] < math.log(1000)
    assert val[2] < 0.5 * math.log(1000)  # far below guessing among 1,000 tokens
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert set(rows[0]) >= {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s"}
    s = summary(run_dir)
    assert s["steps"] == len(rows) and s["final_loss"] == rows[-1]["loss"]
    assert re.fullmatch(r"[0-9a-f]{64}", s["params_sha256"])
    assert (run_dir / ".hydra" / "overrides.yaml").exists() and (run_dir / "config.yaml").exists()


@pytest.mark.slow
def test_dataparallel_runs_the_module_as_is_on_cpu(tmp_path) -> None:
    single = disttrain(*SMALL, "trainer.max_epochs=1", f"run_dir={tmp_path / 'single'}")
    dp = disttrain(*SMALL, "trainer.max_epochs=1", "strategy=dp", f"run_dir={tmp_path / 'dp'}")
    assert single.returncode == 0 and dp.returncode == 0, dp.stderr
    assert "strategy=dp: no GPU on this machine, so DataParallel runs the module as is" in dp.stderr
    assert summary(tmp_path / "dp")["params_sha256"] == summary(tmp_path / "single")["params_sha256"]


def _capture(trainer: Trainer) -> list[dict]:
    """Parameters and gradients as the optimizer is about to step, every step."""
    seen: list[dict] = []

    def hook(optimizer, *_):
        seen.append(
            {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in trainer.module.named_parameters()}
        )

    trainer.optimizer.register_step_pre_hook(hook)
    return seen


def test_window_cut_short_is_divided_by_its_real_size(tmp_path) -> None:
    # 9 samples, micro-batch 2, accumulate 3: windows of micro-batches (2, 2, 2) and (2, 1) samples.
    data = RandomRegression(size=9)
    cfg = TrainConfig(
        run_dir=str(tmp_path),
        trainer=TrainerConfig(batch_size=2, accumulate=3, max_epochs=1, val_fraction=0, grad_clip_norm=0),
    )
    torch.manual_seed(0)
    model = nn.Linear(20, 1)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, cfg)
    order = list(trainer.sampler)
    seen = _capture(trainer)
    trainer.fit()
    assert len(seen) == 2
    for step, idx in zip(seen, (order[:6], order[6:]), strict=True):
        reference = nn.Linear(20, 1)
        with torch.no_grad():
            reference.weight.copy_(step["weight"][0])
            reference.bias.copy_(step["bias"][0])
        nn.functional.mse_loss(reference(data.x[idx]), data.y[idx]).backward()
        torch.testing.assert_close(step["weight"][1], reference.weight.grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(step["bias"][1], reference.bias.grad, rtol=0, atol=1e-6)


def test_fp16_clips_in_real_units_after_unscale(tmp_path) -> None:
    data = RandomRegression(size=64)
    clip = 0.01
    cfg = TrainConfig(
        run_dir=str(tmp_path),
        trainer=TrainerConfig(
            batch_size=64, max_steps=8, precision="fp16", grad_clip_norm=clip, val_fraction=0
        ),
        optim=OptimConfig(lr=0.01, momentum=0),
    )
    torch.manual_seed(0)
    model = nn.Linear(20, 1)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), data, cfg)
    assert trainer.precision.scaler is not None and trainer.precision.scaler.get_scale() > 1
    seen = _capture(trainer)
    trainer.fit()
    rows = [r for r in read_metrics(tmp_path) if "grad_norm" in r]
    # The first steps overflow at the initial scale of 65536: GradScaler skips them and halves the scale.
    assert rows[0]["skipped"] and not math.isfinite(rows[0]["grad_norm"])
    logged = [r["grad_norm"] for r in rows if not r["skipped"]]
    assert len(logged) >= 3
    for step, logged_norm in zip(seen, logged, strict=True):
        reference = nn.Linear(20, 1)
        with torch.no_grad():
            reference.weight.copy_(step["weight"][0])
            reference.bias.copy_(step["bias"][0])
        nn.functional.mse_loss(reference(data.x), data.y).backward()
        true_norm = torch.cat([reference.weight.grad.flatten(), reference.bias.grad]).norm().item()
        applied = torch.cat([g.flatten() for _, g in step.values()]).norm().item()
        assert true_norm > 10 * clip
        assert math.isclose(logged_norm, true_norm, rel_tol=1e-2)  # logged before clipping, unscaled
        assert clip * 0.99 <= applied <= clip * 1.001  # clipped to the limit in real units


@pytest.mark.slow
def test_no_sync_means_one_allreduce_per_step_and_validation_skips_padding(tmp_path) -> None:
    out = tmp_path / "probe.json"
    result = torchrun(ROOT / "tests" / "scripts" / "ddp_probe.py", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(out.read_text())
    assert probe["steps"] == 4  # 2 epochs × windows of 3 and 2 micro-batches
    assert probe["allreduce_calls"] == [4, 4]  # one bucket, all-reduced on the last micro-batch only
    assert math.isclose(probe["val_loss"], probe["expected_val_loss"], rel_tol=1e-6)


@pytest.mark.slow
def test_early_stopping_on_validation_loss(tmp_path) -> None:
    # A learning rate of 100 makes the model diverge: validation never improves after the first.
    result = disttrain(
        *SMALL,
        "optim.lr=100",
        "trainer.val_every_steps=5",
        "trainer.early_stop_patience=2",
        f"run_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    vals = [r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r]
    assert len(vals) == 3 and vals[1] > vals[0] and vals[2] > vals[0]
    assert summary(tmp_path)["stopped"] == "early_stop" and summary(tmp_path)["steps"] == 15
    assert "done: 15 steps (early_stop)" in result.stdout


@pytest.mark.slow
def test_torchrun_workers_share_rank0_run_dir_and_write_no_hydra_output(tmp_path) -> None:
    # ${now:%f} (microseconds) differs in every process that resolves it: only rank 0's may be used.
    runs = tmp_path / "runs"
    job = [*SMALL, "trainer.max_epochs=1", "strategy=ddp", f"run_dir={runs}/${{now:%H%M%S%f}}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run(
        [*launcher, "-m", "disttrain", *job],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    assert summary(run_dir)["world_size"] == 2
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written in the working directory
