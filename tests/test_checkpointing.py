"""strategy.activation_checkpointing: the recomputed forward gives the same gradients (dropout included:
the same random numbers), keeps less for backward, and a model without blocks is refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disttrain.config import ConfigError, StrategyConfig
from disttrain.models import CharGPT
from disttrain.strategy import checkpoint_blocks


def gpt() -> CharGPT:
    torch.manual_seed(0)
    return CharGPT(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32, dropout=0.1)


def gradients_and_saved_bytes(mode: str, compile_: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """One forward and backward with dropout on: the gradients, and the bytes autograd kept for backward."""
    model = gpt()
    chosen = checkpoint_blocks(model, StrategyConfig(activation_checkpointing=mode))
    assert len(chosen) == {"none": 0, "full": 4, "selective": 2}[mode]
    names = {n for n, _ in model.named_parameters()}  # the module paths stay: snapshots and hashes too
    assert names == {n for n, _ in gpt().named_parameters()}
    # aot_eager: dynamo and AOTAutograd trace the checkpointed blocks as trainer.compile does, without
    # inductor's C++ build (which starts processes; test_fsdp's compile test runs that)
    step = torch.compile(model, backend="aot_eager") if compile_ else model
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    torch.manual_seed(2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = step(idx)
    nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, saved


def test_full_and_selective_recompute_the_same_gradients_with_dropout_and_keep_less() -> None:
    plain, kept_plain = gradients_and_saved_bytes("none")
    full, kept_full = gradients_and_saved_bytes("full")
    selective, kept_selective = gradients_and_saved_bytes("selective")
    for grads in (full, selective):
        for name, grad in plain.items():
            assert torch.equal(grads[name], grad), name  # bit-equal: dropout recomputed the same
    assert kept_full < kept_selective < kept_plain


@pytest.mark.slow  # (dynamo's tracing takes tens of seconds on 2 cores)
def test_checkpointing_under_torch_compile_gives_eager_gradients() -> None:
    eager, _ = gradients_and_saved_bytes("full")
    compiled, _ = gradients_and_saved_bytes("full", compile_=True)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-6)


def test_a_model_without_blocks_is_refused_in_one_line() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ConfigError) as e:
        checkpoint_blocks(model, StrategyConfig(activation_checkpointing="full"))
    assert str(e.value) == (
        "strategy.activation_checkpointing='full': finds no blocks in Sequential (no nn.ModuleList, no "
        "nn.Sequential of 2+ modules of one class); name them with strategy.fsdp_blocks "
        "(class or module names)"
    )
