"""The padded token job of scripts/bench.py: variable-length sequences padded to one length, batched as
Hugging Face batches are (`input_ids`, `attention_mask`, `labels` at -100 on padding), and a small
causal GPT called the way a `transformers` model is, returning its own mean loss.

Each micro-batch holds a different number of real tokens, so the gradient of a window is that of the
mean over all its tokens only when each micro-batch's mean is weighted by its token count:
`hand_step` below is that loop written by hand, the Trainer does the same from the labels it counts.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from disttrain.models import CharGPT

IGNORE_INDEX = -100


class PaddedTokens(Dataset):
    """`size` sequences of `min_length` to `length` real tokens (drawn from the seed), padded with 0 to
    `length`. Each token determines the next (a rule a model learns); `labels` are the next tokens,
    -100 where the sequence has ended."""

    def __init__(
        self, size: int, length: int = 32, vocab_size: int = 256, min_length: int = 4, seed: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_length, length + 1, (size, 1), generator=g)
        tokens = torch.empty(size, length + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(1, vocab_size, (size,), generator=g)
        for t in range(length):
            tokens[:, t + 1] = (5 * tokens[:, t] + 3) % (vocab_size - 1) + 1
        real = torch.arange(length) < lengths
        self.input_ids = torch.where(real, tokens[:, :-1], 0)
        self.attention_mask = real.long()
        self.labels = torch.where(real, tokens[:, 1:], IGNORE_INDEX)
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }


class PaddedLM(CharGPT):
    """CharGPT with a `transformers`-style forward: a dict with the logits and, given labels, their mean
    cross-entropy over the labels that are not -100 (labels are already the next tokens: no shift).
    Attention is causal, so the padding after a sequence's tokens changes nothing before it."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: Any = None
    ) -> dict[str, torch.Tensor]:
        logits = super().forward(input_ids)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        return out


def hand_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, window: list[Any], device: torch.device
) -> None:
    """One optimizer step over a window of micro-batches, written by hand with the exact weighting: each
    micro-batch's mean loss × its token count, summed, ÷ the window's tokens on all ranks (counted
    before backward, one all-reduce); DDP's mean over ranks is undone by the world size. Forward and
    backward of all but the last micro-batch run under no_sync (DDP all-reduces once)."""
    window = [{k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in window]
    counts = [(batch["labels"] != IGNORE_INDEX).sum() for batch in window]
    total = torch.stack(counts).sum()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(total)
    scale = world / total.clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    for i, (batch, count) in enumerate(zip(window, counts, strict=True)):
        last = i == len(window) - 1
        with contextlib.nullcontext() if last or world == 1 else model.no_sync():
            loss = model(**batch)["loss"]
            (loss * count * scale).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
