"""`_target_`s that fail on cue, for the tests of one-line errors (the package has no test hooks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FailsInInit(nn.Module):
    """A model or dataset whose constructor raises, as a user's code with a bug does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        raise ValueError(f"{len(kwargs)} arguments, and none of them is width")


class TableGPT(nn.Module):
    """A CharGPT whose input goes through a table computed in __init__ and kept out of the state dict
    (a non-persistent buffer, as a rotary table is): a meta build leaves it without values, so rank 0's
    must reach every rank. With `plain_table`, the table is a plain tensor attribute instead, which no
    state dict or buffer broadcast reaches."""

    def __init__(self, plain_table: bool = False, **gpt: Any) -> None:
        super().__init__()
        from disttrain.models import CharGPT

        self.gpt = CharGPT(**gpt)
        table = 1.0 + torch.arange(self.gpt.n_embd) / self.gpt.n_embd
        if plain_table:
            self.table = table
        else:
            self.register_buffer("table", table, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.gpt.tok(idx) * self.table + self.gpt.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.gpt.head(self.gpt.ln_f(self.gpt.blocks(x)))


class FailsOnMeta(nn.Module):
    """A token model whose __init__ reads a value out of a tensor it made: impossible on the meta device."""

    def __init__(self, vocab_size: int = 256, width: int = 16, **_: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.head = nn.Linear(width, vocab_size)
        self.scale = float(self.layers[0].weight.abs().max().item())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for layer in self.layers:
            x = torch.tanh(layer(x)) * self.scale
        return self.head(x)
