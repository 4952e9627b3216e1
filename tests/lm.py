"""A tiny token model and a dataset of padded variable-length sequences, for the tests of loss items:
batches are dicts (`input_ids`, `attention_mask`, `labels` with -100 at padding), as Hugging Face
datasets give them, and the model returns a dict with its mean loss over the non-ignored labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from disttrain.step import StepOutput

#: Real tokens of the first 16 sequences. As `disttrain check` deals them (in order, rank r the samples
#: r, r + world, ...), the ranks and micro-batches of every variant hold different token counts: DDP 2×8
#: gives rank 0 50 tokens and rank 1 28; with 2 micro-batches of 4 per rank, rank 1's second one holds
#: none at all.
LENGTHS = [12, 1, 5, 9, 2, 11, 3, 7, 10, 0, 8, 0, 6, 0, 4, 0]


class PaddedSequences(Dataset):
    """Token sequences that follow a rule (each token determines the next), padded with 0 to `length`;
    the labels are the tokens, -100 at padding (a causal LM, which shifts them, learns the rule)."""

    def __init__(self, size: int = 16, length: int = 12, vocab_size: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.samples = []
        for i in range(size):
            n = LENGTHS[i] if i < len(LENGTHS) else int(torch.randint(1, length + 1, (1,), generator=g))
            ids = torch.zeros(length, dtype=torch.long)
            token = int(torch.randint(1, vocab_size, (1,), generator=g))
            for t in range(n):
                ids[t], token = token, (5 * token + 3) % (vocab_size - 1) + 1
            mask = (torch.arange(length) < n).long()
            labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
            self.samples.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples[i]


class TinyLM(nn.Module):
    """Embedding, one hidden layer, a token classifier; `labels` give the loss (a mean over the labels
    that are not -100), returned in a dict as transformers models return theirs."""

    def __init__(self, vocab_size: int = 32, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(torch.tanh(self.hidden(self.embed(input_ids))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return out


def lm_step(model: nn.Module, batch: dict) -> StepOutput:
    """A user's step: the loss computed outside the model, its items counted, accuracy reported."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    real = labels != -100
    accuracy = ((logits.argmax(-1) == labels) & real).sum() / real.sum().clamp(min=1)
    return StepOutput(loss, real.sum(), {"accuracy": accuracy})


def unweighted_step(model: nn.Module, batch: dict) -> torch.Tensor:
    """The bug users keep finding: the micro-batch's mean token loss returned without its count, so it
    is weighted like a mean over samples."""
    return model(**batch)["loss"]


def no_loss_step(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"])["logits"]


class LogitsOnly(TinyLM):
    def forward(self, input_ids, attention_mask=None, labels=None):
        return super().forward(input_ids)["logits"]


class Unlabelled(PaddedSequences):
    """Every label ignored: no loss item anywhere."""

    def __init__(self, size: int = 16, vocab_size: int = 32) -> None:
        super().__init__(size=size, vocab_size=vocab_size)
        for sample in self.samples:
            sample["labels"] = torch.full_like(sample["labels"], -100)


class NotTraced(TinyLM):
    """A model torch.compile cannot capture anything of (its forward is excluded from tracing)."""

    @torch.compiler.disable
    def forward(self, input_ids, attention_mask=None, labels=None):
        return super().forward(input_ids, attention_mask, labels)
