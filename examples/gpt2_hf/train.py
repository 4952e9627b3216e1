"""A `transformers` GPT-2 trained through disttrain's Python API on a Hugging Face `datasets` dataset.

The model is built from a `GPT2Config` (nothing is downloaded) and the dataset from a local text file,
one sample per line, read as bytes (so no tokenizer either). Lines differ in length: each is padded to
the block, with its padding masked out of attention and of the loss (`labels` -100), so a step's loss is
the mean over the real tokens of the whole step, however they fall on micro-batches and processes.

    python train.py                          # one process
    torchrun --nproc-per-node=2 train.py     # DDP: the same script, one process per GPU (or CPU core)
    python train.py --epochs 8               # the same run dir again resumes and trains on to epoch 8
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

import disttrain
from disttrain import TrainConfig, Trainer
from disttrain.config import SnapshotConfig, TrainerConfig

HERE = Path(__file__).resolve().parent
PAD = 0  # byte 0 never occurs in text; padded positions carry it, masked out


def line_dataset(path: Path, block: int) -> Dataset:
    """One sample per non-empty line: its bytes, cut to `block`, padded to it."""
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for line in path.read_text().splitlines():
        ids = list(line.strip().encode())[:block]
        if not ids:
            continue
        pad = block - len(ids)
        rows["input_ids"].append(ids + [PAD] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["labels"].append(ids + [-100] * pad)  # -100: not a loss item (GPT-2 shifts labels itself)
    return Dataset.from_dict(rows).with_format("torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=HERE / "sample.txt")
    parser.add_argument("--run-dir", default="runs/gpt2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    # disttrain logs what it decides (a resume, and from which snapshot) at INFO; warnings show anyway.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("disttrain").setLevel(logging.INFO)

    dataset = line_dataset(args.text, args.block)
    disttrain.seed_everything(0)  # before the model is built: the same weights on every run and rank
    config = GPT2Config(
        vocab_size=256,
        n_positions=args.block,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=2,
        bos_token_id=None,  # GPT-2's own ids (50256) lie outside a byte vocabulary; nothing here uses them
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config)
    cfg = TrainConfig(
        name="gpt2",
        run_dir=args.run_dir,
        trainer=TrainerConfig(
            batch_size=8,
            max_steps=args.steps,
            max_epochs=args.epochs,
            val_fraction=0.1,  # the last 10% of the lines, validated at the end of every epoch
            num_threads=1,
        ),
        snapshot=SnapshotConfig(every_steps=50),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # The batch is a dict, so the Trainer calls model(**batch) and uses the loss the model returns,
    # weighted by the batch's real tokens (its labels that are not -100).
    trainer = Trainer(model, optimizer, dataset, cfg)
    summary = trainer.fit()
    if trainer.env.is_main:
        print(
            f"{summary['steps']} steps, train loss {summary['final_loss']:.4f}, "
            f"val loss {summary['final_val_loss']:.4f}, run dir {args.run_dir}"
        )


if __name__ == "__main__":
    main()
