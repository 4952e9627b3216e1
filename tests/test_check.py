"""`disttrain check`: the seed's accumulation identity, proven across strategies on real torchrun."""

from __future__ import annotations

import re

import pytest

from disttrain.check import main as check_main
from tests.support import disttrain

SMALL_CHECK = ["data.num_tokens=2000", "data.vocab_size=50"]


@pytest.mark.slow
def test_every_strategy_gives_the_same_gradients_without_batchnorm() -> None:
    result = disttrain("check", *SMALL_CHECK, "model.batchnorm=false", "--samples", "16", "--accumulate", "4")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    pairs = re.findall(r"^(\S+ ~ \S+)\s+\| (True|False)\s+\| (True|False)\s+\| (\S+)", result.stdout, re.M)
    # single, 4×4 accumulated, DDP and FSDP 2×8 and 2×(2×4), DataParallel, HSDP 2×2 of 4 processes:
    # every pair of the eight, and the same over an epoch's short last step of 9 samples (ranks of 5
    # and 4; under 2×(2×4) in 4 + 1 and 4 + a filler weighted by zero): every pair of those eight. (The
    # MLP has no blocks: no activation-checkpointed variants.)
    assert len(pairs) == 28 + 28
    variants = {"single", "accumulate", "ddp", "ddp+accum", "dp", "fsdp", "fsdp+accum", "hsdp"}
    names = {p[0].split(" ~ ")[0] for p in pairs} | {p[0].split(" ~ ")[1] for p in pairs}
    assert names == variants | {v + "+tail" for v in variants}
    assert not [p for p in pairs if p[0].count("+tail") == 1]  # a tail is compared with tails only
    assert all(approx == "True" and float(maxdiff) <= 1e-6 for _, _, approx, maxdiff in pairs)
    assert "OK: all 56 pairs give the same gradients within 1e-06" in result.stdout


@pytest.mark.slow
def test_activation_checkpointing_recomputes_dropout_exactly_under_every_strategy() -> None:
    gpt = ["experiment=gpt", "data.num_tokens=2000", "data.context=8", "model.n_layer=2", "model.n_embd=16"]
    result = disttrain("check", *gpt, "model.n_head=2", "model.dropout=0.1", "trainer.num_threads=1")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "the model has dropout" in result.stdout
    pairs = re.findall(r"^(\S+) ~ (\S+)\s+\| (True|False)\s+\|", result.stdout, re.M)
    # Each of single, DDP and FSDP with its full and selective twins (3 pairs each), whole step and tail:
    # bit-equal, as the recomputed forward drew dropout's random numbers again.
    assert len(pairs) == 3 * 3 * 2
    assert all(exact == "True" for _, _, exact in pairs)
    twins = {(a.replace("+tail", ""), b.replace("+tail", "")) for a, b, _ in pairs}
    for base in ("single", "ddp", "fsdp"):
        assert {(base, f"{base}+full"), (base, f"{base}+selective")} <= twins


@pytest.mark.slow
def test_batchnorm_breaks_the_identity_and_check_says_so() -> None:
    # The two variants of one process that show it: no torchrun job starts.
    result = disttrain("check", *SMALL_CHECK, "--samples", "16", "--variants", "single,accumulate")
    assert result.returncode == 1
    assert re.search(r"single ~ accumulate\s+\| False\s+\| False", result.stdout)
    assert "MISMATCH" in result.stdout and "BatchNorm" in result.stdout


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        (
            "single,dpp",
            "--variants='single,dpp': no variant 'dpp'; the job's are single, accumulate, dp, ddp, "
            "ddp+accum, fsdp, fsdp+accum, hsdp",
        ),
        ("ddp", "--variants='ddp': name two variants or more, to compare"),
    ],
)
def test_variants_the_job_lacks_are_one_line(variants: str, message: str, capsys) -> None:
    assert check_main([*SMALL_CHECK, "--variants", variants]) == 2
    assert capsys.readouterr().err == f"disttrain: error: {message}\n"
