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


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4× GELU MLP (each branch
    through dropout when `dropout` > 0)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        if dropout:  # (no module otherwise: the model's classes stay those of a model without it)
            self.drop = nn.Dropout(dropout)
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dropout:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharGPT(nn.Module):
    """A small GPT (nanoGPT's shape): token + position embeddings, `n_layer` pre-norm blocks with causal
    self-attention, a final LayerNorm and an output layer tied to the token embedding. Input (B, T)
    token ids with T <= block_size; output (B, T, vocab_size) logits, one next-token prediction per
    position (train it on a dataset with `sequence=True`).

    FLOPs (`flops_per_token`, `flops_per_sample`) follow nanoGPT's `estimate_mfu`, i.e. the PaLM paper's
    appendix B: 6·N for forward + backward of the weight matrices (2 per multiply-add forward, 4
    backward), N the parameters without the position embedding (a lookup, no multiplies; the token
    embedding counts because it is the output layer too), plus 12·n_layer·n_embd·block_size for the
    attention scores and their weighted sum (QKᵀ and AV, forward + backward, full T×T as if not causal).
    LayerNorm, GELU, softmax and the optimizer are not counted. MFU = flops_per_sample × samples/s ÷ peak.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.block_size = block_size
        self.n_layer, self.n_embd = n_layer, n_embd
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*(Block(n_embd, n_head, dropout) for _ in range(n_layer)))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying, as GPT-2
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2: residual projections scaled by 1/sqrt(2·n_layer) so the residual stream's
                # variance does not grow with depth.
                nn.init.normal_(p, std=0.02 / (2 * n_layer) ** 0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln_f(self.blocks(x)))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (tied weights once); without the position embedding by default (see the class doc)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos.weight.numel() if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token at full context, nanoGPT's estimate."""
        return 6.0 * self.num_params() + 12.0 * self.n_layer * self.n_embd * self.block_size

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample: one sample is a sequence of block_size tokens."""
        return self.flops_per_token() * self.block_size
