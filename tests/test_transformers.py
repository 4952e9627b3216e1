"""A real third-party model: a `transformers` GPT-2 built from a small config (no download) trains through
the Python API and the CLI, on padded variable-length sequences with attention_mask and labels, in one
process and under 2-process DDP with accumulation, and resumes after SIGKILL on the very same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import disttrain
from disttrain import TrainConfig, Trainer
from disttrain.config import TrainerConfig
from disttrain.metrics import read_metrics
from tests.lm import PaddedSequences
from tests.support import disttrain as run_cli
from tests.support import kill_at_step, losses, start, summary

#: tests/conf/model/gpt2.yaml (transformers.GPT2LMHeadModel of a GPT2Config) on tests/lm.py's sequences.
GPT2 = ["--config-dir", "tests/conf", "model=gpt2", "data=padded", "data.size=256", "trainer.num_threads=1"]


def test_gpt2_trains_from_python_and_counts_the_tokens_it_predicts(tmp_path) -> None:
    disttrain.seed_everything(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    data = PaddedSequences(size=128)
    cfg = TrainConfig(run_dir=str(tmp_path), trainer=TrainerConfig(batch_size=8, accumulate=2, max_epochs=3))
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), data, cfg)
    window = list(trainer.sampler)[:16]
    result = trainer.fit()
    assert result["steps"] == 24  # 116 training sequences: 15 micro-batches, 8 windows an epoch
    vals = [r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r]
    assert vals[-1] < 0.9 * vals[0]
    # transformers shifts the labels inside the model: a sequence's first label is no target, and the
    # first step's items are the labels from the second position on.
    first = next(r for r in read_metrics(tmp_path) if "loss" in r)
    predicted = sum(int((data[i]["labels"][1:] != -100).sum()) for i in window)
    assert first["tokens_per_s"] * first["step_time_s"] == pytest.approx(predicted)


@pytest.mark.slow
def test_gpt2_through_the_cli_resumes_after_sigkill_on_the_same_weights(tmp_path) -> None:
    # Under DDP on 2 processes (examples/gpt2_hf resumes one process through the Python API). 6 epochs,
    # 48 steps: room past the kill, which lands up to a second after metrics.jsonl shows the step.
    job = [*GPT2, "launcher=torchrun", "launcher.nproc_per_node=2", "trainer.batch_size=8",
           "trainer.accumulate=2", "trainer.max_epochs=6", "snapshot.every_steps=5", "optim.name=adamw",
           "optim.lr=0.003"]  # fmt: skip
    reference = run_cli(*job, f"run_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "killed"
    kill_at_step(start(*job, f"run_dir={run_dir}"), run_dir, 15)
    assert not (run_dir / "summary.json").exists()
    again = run_cli(*job, f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    assert summary(run_dir)["params_sha256"] == summary(tmp_path / "reference")["params_sha256"]
    assert losses(run_dir) == losses(tmp_path / "reference")
