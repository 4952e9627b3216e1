"""Run under torchrun with 2 processes: a user's step (tests/lm.py's lm_step) that reports accuracy, on
padded sequences whose ranks hold different token counts; validation on a split the sampler pads."""

import json
import sys
from pathlib import Path

import torch

import disttrain
from disttrain import TrainConfig, Trainer, distributed
from disttrain.config import TrainerConfig
from disttrain.metrics import read_metrics
from disttrain.step import collate
from tests.lm import PaddedSequences, TinyLM, lm_step

out = Path(sys.argv[1])
# 40 sequences → 20 per rank → 5 micro-batches of 4 an epoch → windows of 2, 2 and 1: 3 steps an epoch.
cfg = TrainConfig(
    run_dir=str(out.parent / "run"),
    trainer=TrainerConfig(batch_size=4, accumulate=2, max_epochs=2, val_fraction=0, log_every_steps=2),
)


def main() -> None:
    with distributed() as env:
        disttrain.seed_everything(0)
        model = TinyLM()
        val = PaddedSequences(size=5, seed=1)  # 5 sequences on 2 ranks: DistributedSampler pads one
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        trainer = Trainer(model, optimizer, PaddedSequences(size=40), cfg, val_dataset=val, step=lm_step)
        trainer.fit()
        if env.is_main:
            with torch.no_grad():
                expected = lm_step(model.eval(), collate([val[i] for i in range(len(val))]))
            rows = read_metrics(cfg.run_dir)
            train = [r for r in rows if "train_accuracy" in r]
            last_val = [r for r in rows if "val_loss" in r][-1]
            out.write_text(
                json.dumps(
                    {
                        "val_loss": last_val["val_loss"],
                        "val_accuracy": last_val["val_accuracy"],
                        "expected_val_loss": expected.loss.item(),
                        "expected_val_accuracy": expected.metrics["accuracy"].item(),
                        "train_accuracy_steps": [r["step"] for r in train],
                        "train_accuracy": [r["train_accuracy"] for r in train],
                    }
                )
            )
        del trainer  # its DDP reducer holds the group (see tests/scripts/ddp_probe.py)


main()
