"""The model, in a module of its own: train.py trains it sharded, and the exported weights load into it
unsharded in any plain PyTorch program (see README.md)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """A pre-norm residual MLP block: x + mlp(ln(x))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


class DeepMLP(nn.Module):
    """Blocks in an nn.ModuleList: FSDP shards each block on its own (disttrain's default blocks are the
    children of every ModuleList), and the root holds the rest (input and output layers)."""

    def __init__(self, features: int = 16, width: int = 64, depth: int = 4, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)
