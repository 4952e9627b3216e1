"""Built-in models. Any `nn.Module` works with the Trainer; these are the ones the configs name."""

from __future__ import annotations

import torch
from torch import nn


class MLPLanguageModel(nn.Module):
    """The seed's MLP language model (makemore part 4): embed the last `context` tokens, concatenate,
    Linear → BatchNorm → tanh → Linear to the vocabulary.

    BatchNorm normalises over the batch each process sees, so its statistics (and so the gradients)
    change with the micro-batch size: under DDP or accumulation they differ from one large batch. Set
    `batchnorm=False` where gradients must match across strategies bit for bit.
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        context: int = 4,
        embed_dim: int = 10,
        hidden: int = 64,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.hidden = nn.Linear(context * embed_dim, hidden, bias=not batchnorm)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.out = nn.Linear(hidden, vocab_size)
        # The seed's initialisation: tanh gain 5/3 on the hidden layer, a small output layer so the first
        # loss is close to ln(vocab_size) instead of far above it.
        nn.init.kaiming_normal_(self.hidden.weight, nonlinearity="tanh")
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx).flatten(1)
        return self.out(torch.tanh(self.norm(self.hidden(x))))


def regression(in_features: int = 20, out_features: int = 1) -> nn.Module:
    """The PyTorch DDP tutorial's model: one Linear layer."""
    return nn.Linear(in_features, out_features)
