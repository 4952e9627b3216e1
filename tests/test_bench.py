"""scripts/bench.py runs and prints every row; the GPT it measures trains through the CLI.

Speed is never asserted: the machine is shared and the figures are the script's output, not a test's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from disttrain.data import TokenCorpus
from disttrain.models import CharGPT
from tests.support import disttrain, losses, run_script, summary


@pytest.mark.slow
def test_bench_quick_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_script("bench.py", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    printed = proc.stdout
    # The loop table: hand-written and Trainer, 1 and 2 processes, both models, fp32 and bf16.
    for model in ("mlp", "gpt"):
        for precision in ("fp32", "bf16"):
            for world in ("single", "ddp2"):
                for kind in ("hand", "trainer"):
                    name = f"{model}/{precision}/{world}/{kind}"
                    row = next(r for r in rows if r.get("name") == name)
                    assert row["step_ms"] > 0 and row["samples_per_s"] > 0, row
                    assert name in printed
                    if kind == "trainer":
                        assert math.isfinite(row["ratio"]), row
                        assert math.isfinite(row["overhead_ratio"]), row
            assert f"{model} {precision}: 1 -> 2 processes" in printed
        # DataParallel runs for the first precision only (it is the slowest case on CPU).
        assert f"{model} fp32: DDP x2 / DP x2" in printed
    # The padded token job: dict batches, 4 micro-batches weighted by their tokens, by hand and Trainer.
    for world in ("single", "ddp2"):
        for kind in ("hand", "trainer"):
            name = f"lm/fp32/{world}/{kind}"
            row = next(r for r in rows if r.get("name") == name)
            assert row["step_ms"] > 0 and math.isfinite(row["samples_per_s"]), row
            assert name in printed
            if kind == "trainer":
                assert math.isfinite(row["ratio"]) and math.isfinite(row["overhead_ratio"]), row
    scaling = [r for r in rows if r["table"] == "scaling"]
    assert all(r["allreduce_ms"] > 0 for r in scaling), scaling
    for label in ("default", "bucket_cap_mb=1", "gradient_as_bucket_view=false", "static_graph=true"):
        assert f"mlp {label}" in printed
    extras = ("metrics.jsonl line (1 process)", "stop-flag all_reduce (2 processes)")
    for label in (*extras, "a do-nothing callback (3 per-step events) (1 process)"):
        assert label in printed
    row = next(r for r in rows if r.get("label") == "Trainer - hand, tiny model, 1 process")
    assert math.isfinite(row["us"]), row
    assert row["label"] in printed
    for label in ("python / disttrain", "python / bare", "torchrun x2 / disttrain", "torchrun x2 / bare"):
        row = next(r for r in rows if r.get("label") == label)
        assert 0 < row["first_step_s"] <= row["exit_s"], row
        assert label in printed
    snapshot = next(r for r in rows if r["table"] == "snapshot")
    assert snapshot["bare_torch_save_s"] > 0 and snapshot["snapshot_s"] > 0, snapshot
    assert f"{snapshot['label']:<44} {snapshot['bytes'] / 1e6:.2f} MB: torch.save" in printed
    for workers in (0, 2):  # streaming against map-style over the same records, side by side
        for label in ("map-style (rows in memory)", "shards, JSONL", "shards, Parquet", "shards, tar"):
            row = next(r for r in rows if r.get("label") == f"{label}, {workers} workers")
            assert row["samples_per_s"] > 0 and (label.startswith("map") or row["ratio"] > 0), row
            assert row["label"] in printed
    memory = [r for r in rows if r["table"] == "data" and "kib" in r]
    assert [r["label"] for r in memory] == [
        "token file of 1 MiB: private memory",
        "token file of 64 MiB: private memory",
    ]
    assert report["meta"]["command"].startswith("python scripts/bench.py --quick")


@pytest.mark.slow
def test_bench_only_data_prints_the_data_table_alone(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_script("bench.py", "--quick", "--only", "data", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["table"] for r in rows} == {"data"}
    streams = [r for r in rows if "ratio" in r]  # 3 formats x 0 and 2 workers x the first and a later epoch
    assert len(streams) == 12 and all(r["samples_per_s"] > 0 and r["repeats"] == 1 for r in streams)
    assert sum("first epoch" in r["label"] for r in streams) == 6
    assert "## data: " in proc.stdout and "## loop" not in proc.stdout


def test_gpt_flops_follow_the_documented_estimate() -> None:
    model = CharGPT(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128)
    n = sum(p.numel() for p in model.parameters()) - 64 * 128  # tied head counted once, no position table
    assert model.flops_per_token() == 6 * n + 12 * 2 * 128 * 64
    assert model.flops_per_sample() == model.flops_per_token() * 64


def test_sequence_samples_are_the_input_shifted_by_one() -> None:
    data = TokenCorpus(vocab_size=50, num_tokens=200, context=8, sequence=True)
    x, y = data[5]
    assert torch.equal(x, data.tokens[5:13]) and torch.equal(y, data.tokens[6:14])
    (bx, by), *_ = data.__getitems__([5, 6])
    assert torch.equal(bx, x) and torch.equal(by, y)
    assert len(data) == len(TokenCorpus(vocab_size=50, num_tokens=200, context=8))


@pytest.mark.slow
def test_gpt_trains_through_the_cli(tmp_path: Path) -> None:
    run_dir = tmp_path / "gpt"
    proc = disttrain(
        "experiment=gpt",
        "data.num_tokens=5000",
        "data.vocab_size=32",
        "data.context=16",
        "model.n_embd=32",
        "trainer.max_steps=30",
        "trainer.val_every_steps=0",
        "trainer.num_threads=1",
        "optim.lr=0.01",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
        f"run_dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(run_dir)["steps"] == 30
    curve = [loss for _, loss in losses(run_dir)]
    assert len(curve) == 30
    # Starts near ln(32) (a uniform guess) and learns the corpus' successors.
    assert abs(curve[0] - math.log(32)) < 0.3, curve[0]
    assert sum(curve[-5:]) / 5 < curve[0] - 0.5, curve
