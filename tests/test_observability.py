"""Seeing the run: wandb across a SIGKILL, progress lines, throughput fields, gradient health on one and
two ranks, grad flow, plots, and the health config's one-line errors."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from disttrain import TrainConfig, Trainer
from disttrain.cli import main
from disttrain.config import TrainerConfig
from disttrain.data import TokenCorpus
from disttrain.metrics import read_metrics
from tests.support import ROOT, SMALL, disttrain, kill_at_step, losses, start, summary, torchrun

PROBE = ROOT / "tests" / "scripts" / "health_probe.py"
#: The small job made to explode: SGD at learning rate 1000 with clipping at 1 throws the MLP's weights
#: so far that gradient norms above 10 × the limit keep coming, in streaks and alone.
EXPLODING = [*SMALL, "optim.lr=1000", "trainer.log_every_steps=1000"]


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """Real wandb, offline: nothing leaves the machine, nothing is written outside tmp_path."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_DIR": "",  # unset: files go to RUN_DIR/wandb
    }


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a `.wandb` transaction log, decoded with wandb's own message types.

    wandb 0.31 has no Python reader any more (the writer is its Go core), so this follows the format
    the core writes: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB-log records in
    32 KiB blocks, each with a 7-byte header (CRC-32 over type and data, length, type: full, first,
    middle, last). A record cut off by a kill ends the list."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending = path.read_bytes(), 32768, [], b""
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), path
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            break
        pending += chunk
        if kind in (1, 4):  # full, or the last piece of a split record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(path: Path) -> tuple[str, dict[int, dict[str, Any]]]:
    """(run id, {step: {key: value}}) of one offline run file; rows of one step merge, as wandb does."""
    run_id, steps = "", {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            row = steps.setdefault(record.history.step.num, {})
            for item in record.history.item:
                row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return run_id, steps


def attempts(wandb_dir: Path) -> list[Path]:
    """The `.wandb` file of every attempt, oldest first (offline, each attempt writes its own)."""
    return sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def replay_policy(rows: list[dict], patience: int, lr: float, limit: float) -> list[float]:
    """The learning rate after each step that health.on_explosion=halve_lr must produce from the norms
    the run logged: `patience` explosions in a row halve it, a normal step ends a streak."""
    streak, out = 0, []
    for r in rows:
        if r["grad_norm"] > limit:
            streak += 1
            if streak == patience:
                lr, streak = lr / 2, 0
        else:
            streak = 0
        out.append(lr)
    return out


def steps_of(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


# -- wandb and exact resume ------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_resume_continues_the_wandb_run_and_the_health_state(tmp_path) -> None:
    job = [
        *EXPLODING,
        "trainer.max_steps=200",  # room past the kill: the test sees step 50 up to a second late
        "snapshot.every_steps=20",
        "logger=wandb",
        "health.on_explosion=halve_lr",
        "health.patience=2",
    ]
    env = wandb_env(tmp_path)
    reference = disttrain(*job, f"run_dir={tmp_path / 'reference'}", **env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref = summary(tmp_path / "reference")
    assert ref["lr_halvings"] >= 2, ref  # the model did explode, and the policy acted

    run_dir, wandb_dir = tmp_path / "killed", tmp_path / "wandb-dir"
    env["WANDB_DIR"] = str(wandb_dir)
    kill_at_step(start(*job, f"run_dir={run_dir}", **env), run_dir, 50)
    again = disttrain(*job, f"run_dir={run_dir}", **env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr

    # Exact resume, with the learning rate halved before the snapshot it resumed from and again after.
    resumed = int(re.search(r"resumed from .*step (\d+)\)", again.stderr).group(1))
    lr = [r["lr"] for r in steps_of(tmp_path / "reference")]
    assert lr[-1] < lr[resumed - 1] < 1000, (resumed, lr)
    assert losses(run_dir) == losses(tmp_path / "reference")
    assert summary(run_dir)["params_sha256"] == ref["params_sha256"]
    assert summary(run_dir)["lr_halvings"] == ref["lr_halvings"]

    # One wandb run: the id in run_dir, in summary.json and in both attempts' offline files.
    run_id = (run_dir / "wandb_run_id").read_text()
    assert summary(run_dir)["wandb_run_id"] == run_id
    first, second = attempts(wandb_dir)
    (id1, hist1), (id2, hist2) = wandb_history(first), wandb_history(second)
    assert id1 == id2 == run_id
    # The killed attempt holds a prefix of the run (wandb writes lazily, a kill loses the tail; how far
    # it got past the step the test saw is not known, metrics.jsonl lags by up to a second); the resumed
    # one replays what may be missing, so its history alone has every step once, 1..N, contiguous.
    n = summary(run_dir)["steps"]
    assert sorted(hist1) == list(range(1, len(hist1) + 1)) and len(hist1) < n
    assert sorted(hist2) == list(range(1, n + 1))
    logged = dict(losses(run_dir))
    for hist in (hist1, hist2):
        assert all(hist[s]["loss"] == logged[s] for s in hist)
        assert all(hist[s]["lr"] == r["lr"] for r in steps_of(run_dir) if (s := r["step"]) in hist)
    # The reference kept its files in its run dir (no WANDB_DIR) under a run of its own.
    (ref_file,) = attempts(tmp_path / "reference")
    assert wandb_history(ref_file)[0] == ref["wandb_run_id"] != run_id


# -- progress, throughput, grad flow ---------------------------------------------------------------------
@pytest.mark.slow
def test_plain_progress_lines_and_grad_flow_in_a_log(tmp_path) -> None:
    run_dir = tmp_path / "run"
    result = disttrain(
        *SMALL,
        "trainer.max_steps=60",
        "trainer.log_every_steps=20",
        "health.grad_flow_every=25",
        f"run_dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # stdout is a pipe here, as in a SLURM log: plain lines every 20 steps, no bar redrawn with \r.
    assert "\r" not in result.stdout
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("step ")]
    pattern = r"step (\d+)/60  epoch 0  loss \d+\.\d{4}  [\d,]+ samples/s  eta \d+:\d\d:\d\d"
    assert [int(re.fullmatch(pattern, ln).group(1)) for ln in lines] == [20, 40, 60], result.stdout

    rows = steps_of(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 61))
    for r in rows:
        assert r["tokens_per_s"] == r["samples_per_s"]  # the MLP predicts one token per sample
        assert 0 <= r["data_time_s"] <= r["step_time_s"]
        assert "peak_mem_gib" not in r and "mfu" not in r  # CPU, and a model without declared FLOPs
    flows = {r["step"]: r["grad_flow"] for r in rows if "grad_flow" in r}
    assert sorted(flows) == [25, 50]
    for step, flow in flows.items():
        assert sorted(flow) == ["embed", "hidden", "norm", "out"]
        total = math.sqrt(sum(v * v for v in flow.values()))
        assert math.isclose(total, rows[step - 1]["grad_norm"], rel_tol=1e-5)


@pytest.mark.slow
def test_progress_bar_on_a_terminal(tmp_path) -> None:
    """stdout on a pseudo-terminal, as in an interactive shell: tqdm redraws one bar, no plain lines."""
    import fcntl
    import os
    import pty
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal has a size
    command = [*SMALL, "trainer.max_steps=30", "trainer.log_every_steps=10", f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "disttrain", *command], cwd=ROOT, stdout=slave, stderr=subprocess.PIPE
    )
    os.close(slave)
    out = b""
    while chunk := _read_pty(master):
        out += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
    text = out.decode()
    assert "\r" in text
    assert re.search(r"30/30 \[[\d:]+<[\d:]+, .*loss=\d+\.\d{4}, samples/s=[\d,]+\]", text), text
    assert not re.search(r"^step \d+/30 ", text, re.M), text


def _read_pty(fd: int) -> bytes:
    import os

    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the child closed the terminal
        return b""


class TinyGPT(nn.Module):
    """Embedding → Linear: a next-token prediction at every position, and a declared FLOPs count."""

    flops_per_sample = 6.0 * (50 * 8 + 8 * 50) * 8

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(50, 8), nn.Linear(8, 50)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(idx))


def test_tokens_per_s_counts_every_position_and_mfu_uses_declared_flops(tmp_path) -> None:
    data = TokenCorpus(vocab_size=50, num_tokens=600, context=8, sequence=True)
    peak_tflops = 1e-3
    cfg = TrainConfig(
        run_dir=str(tmp_path),
        trainer=TrainerConfig(batch_size=16, max_steps=10, val_fraction=0, peak_tflops=peak_tflops),
    )
    model = TinyGPT()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, cfg).fit()
    rows = steps_of(tmp_path)
    assert len(rows) == 10
    for r in rows:
        assert math.isclose(r["tokens_per_s"], 8 * r["samples_per_s"], rel_tol=1e-12)
        expected = TinyGPT.flops_per_sample * r["samples_per_s"] / (peak_tflops * 1e12)
        assert math.isclose(r["mfu"], expected, rel_tol=1e-12)


# -- gradient health -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["warn", "skip"])
def test_explosions_warn_or_skip_as_configured(tmp_path, policy) -> None:
    run_dir = tmp_path / "run"
    # Under skip the weights stop moving once the explosions start, so most steps skip in a row: a run
    # health.max_skipped_steps would stop as diverged (tests/test_reliability.py); here it may not.
    never_diverge = "health.max_skipped_steps=0"
    result = disttrain(
        *EXPLODING,
        "trainer.max_steps=40",
        f"health.on_explosion={policy}",
        never_diverge,
        f"run_dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows, s = steps_of(run_dir), summary(run_dir)
    exploded = [r["grad_norm"] > 10.0 for r in rows]
    assert [r["explosion"] for r in rows] == exploded
    assert 0 < sum(exploded) < len(rows), "the model must explode on some steps, not all"
    assert s["explosions"] == sum(exploded) and s["lr_halvings"] == 0
    assert [r["skipped"] for r in rows] == (exploded if policy == "skip" else [False] * len(rows))
    assert s["skipped_steps"] == (sum(exploded) if policy == "skip" else 0)
    assert all(r["lr"] == 1000 for r in rows)
    # Warnings at the 1st, 2nd, 4th ... explosion, each naming its step.
    warned = re.findall(
        r"disttrain: step (\d+): gradient explosion (\d+): norm .* (clipped|step skipped)$",
        result.stderr,
        re.M,
    )
    explosion_steps = [r["step"] for r in rows if r["explosion"]]
    expected = [n for n in range(1, len(explosion_steps) + 1) if n & (n - 1) == 0]
    assert [int(n) for _, n, _ in warned] == expected, result.stderr
    assert [int(step) for step, _, _ in warned] == [explosion_steps[n - 1] for n in expected]
    assert {action for _, _, action in warned} == {"step skipped" if policy == "skip" else "clipped"}


@pytest.mark.slow
def test_halve_lr_on_two_ranks_decides_alike_everywhere(tmp_path) -> None:
    out = tmp_path / "ranks.json"
    run_dir = tmp_path / "run"
    result = torchrun(
        PROBE,
        str(out),
        *EXPLODING,
        "trainer.max_steps=40",
        "trainer.log_every_steps=20",
        "health.on_explosion=halve_lr",
        "health.patience=2",
        f"run_dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Progress and warnings come from rank 0 alone: each line once, not once per rank.
    assert [int(n) for n in re.findall(r"^step (\d+)/40 ", result.stdout, re.M)] == [20, 40], result.stdout
    warned = re.findall(r"^step (\d+): gradient explosion", result.stderr, re.M)
    assert warned and len(warned) == len(set(warned)), result.stderr
    rank0, rank1 = json.loads(out.read_text())
    assert {k: v for k, v in rank0.items() if k != "rank"} == {k: v for k, v in rank1.items() if k != "rank"}
    rows = steps_of(run_dir)
    expected_lr = replay_policy(rows, patience=2, lr=1000.0, limit=10.0)
    assert [r["lr"] for r in rows] == expected_lr
    assert rank0["lr_halvings"] == round(math.log2(1000.0 / expected_lr[-1])) >= 2
    assert rank0["lr"] == rank0["base_lrs"][0] == expected_lr[-1]
    assert rank0["explosions"] == sum(r["explosion"] for r in rows) and rank0["skipped_steps"] == 0


@pytest.mark.slow
def test_non_finite_gradients_on_one_rank_skip_the_step_on_both(tmp_path) -> None:
    out = tmp_path / "ranks.json"
    run_dir = tmp_path / "run"
    job = ["experiment=regression", "data.size=256", "trainer.max_epochs=2", "trainer.num_threads=1"]
    result = torchrun(PROBE, str(out), "--poison", "5", *job, f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = json.loads(out.read_text())
    assert rank0["params_sha256"] == rank1["params_sha256"]
    assert rank0["params_finite"] and rank1["params_finite"]  # the poisoned step never reached them
    rows = steps_of(run_dir)
    assert [r["skipped"] for r in rows] == [not math.isfinite(r["grad_norm"]) for r in rows]
    assert (
        rank0["skipped_steps"] == rank1["skipped_steps"] == sum(r["skipped"] for r in rows) == 2
    )  # once an epoch
    assert "non-finite gradients (norm nan): step skipped (1 so far)" in result.stderr


# -- plots -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("plot")
    runs = [base / "a", base / "b"]
    result = disttrain(*SMALL, "trainer.max_steps=40", "trainer.val_every_steps=20", f"run_dir={runs[0]}")
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(runs[0], runs[1])
    return runs


@pytest.mark.slow
def test_plot_draws_every_run_on_each_panel(two_runs, tmp_path) -> None:
    from disttrain.plot import plot_runs

    fig = plot_runs(two_runs, tmp_path / "out.png")
    labels = [
        [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")] for ax in fig.axes
    ]
    a, b = (str(r) for r in two_runs)
    assert labels == [[a, f"{a} (val)", b, f"{b} (val)"], [a, b], [a, b]]
    loss_line = fig.axes[0].get_lines()[0]
    assert list(loss_line.get_xdata()) == list(range(1, 41))


@pytest.mark.slow
@pytest.mark.parametrize("command", [["-m", "disttrain", "plot"], [str(ROOT / "scripts" / "plot.py")]])
def test_plot_command_writes_a_png(two_runs, tmp_path, command) -> None:
    import matplotlib.image

    out = tmp_path / "figs" / "cmp.png"
    result = subprocess.run(
        [sys.executable, *command, *map(str, two_runs), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (900, 900)

    missing = subprocess.run(
        [sys.executable, *command, str(two_runs[0]), str(tmp_path / "nope"), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert missing.returncode == 2
    assert missing.stderr == (
        f"disttrain plot: error: {tmp_path / 'nope'}: no metrics.jsonl (not a run directory, or the run has "
        "not logged a step)\n"
    )


# -- configuration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["health.on_explosion=halve"], "health.on_explosion='halve': must be one of warn, skip, halve_lr"),
        (["health.explosion_factor=0.5"], "health.explosion_factor=0.5: must be at least 1"),
        (["health.patience=0"], "health.patience=0: must be at least 1"),
        (["health.grad_flow_every=-1"], "health.grad_flow_every=-1: must be at least 0"),
        (["trainer.peak_tflops=-1"], "trainer.peak_tflops=-1.0: must be at least 0"),
        (
            ["health.on_explosion=skip", "trainer.grad_clip_norm=0"],
            "health.on_explosion='skip': needs trainer.grad_clip_norm > 0 (an explosion is a norm above "
            "health.explosion_factor × trainer.grad_clip_norm)",
        ),
    ],
)
def test_bad_health_config_is_one_line(overrides, message, tmp_path, capsys) -> None:
    assert main([*overrides, f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"disttrain: error: {message}\n"
    assert not (tmp_path / "run").exists()
