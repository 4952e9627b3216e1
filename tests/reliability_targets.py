"""`_target_`s for tests/test_reliability.py: models and datasets with the mistakes only the first batch
reveals (the package has no test hooks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


def not_a_module(**kwargs: Any) -> int:
    """A model factory that returns something else than a module (a forgotten `return model`'s cousin)."""
    return len(kwargs)


class NoParameters(nn.Module):
    """A model with nothing to train."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().sum(-1, keepdim=True)


class RaggedSequences(Dataset):
    """Sequences of two lengths (every odd sample one longer): a batch of them does not stack."""

    loss = "mse"

    def __init__(self, size: int = 256) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(4 + i % 2), torch.zeros(1)


class FlatTargets(Dataset):
    """Regression samples whose target is a scalar: a batch's target is [B] against a model's [B, 1]."""

    loss = "mse"

    def __init__(self, size: int = 256, in_features: int = 20) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(size, in_features, generator=g)
        self.y = torch.rand(size, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]
