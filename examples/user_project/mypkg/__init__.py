"""Your own project's model and data: plain PyTorch, nothing of disttrain in them. The config dir names
them by import path (`_target_: mypkg.SumNet`), so `disttrain` builds them with the YAML's arguments."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class SumNet(nn.Module):
    """An MLP that learns to add up its inputs."""

    def __init__(self, inputs: int = 4, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SumData(Dataset):
    """`(x, x.sum())` pairs from a seeded generator: the same samples on every run and every rank."""

    #: The Trainer's `trainer.loss=auto` reads this: an `(inputs, target)` batch gets mse.
    loss = "mse"

    def __init__(self, size: int = 256, inputs: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, inputs, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]
