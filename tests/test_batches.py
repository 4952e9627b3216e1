"""Your model, your batches, your loss: any nested batch trains, a model's own loss is used as is, a user's
step says how many loss items it covers, and the gradient stays that of the mean over all items of the
window on all ranks (tests/lm.py holds the model, the padded sequences and the steps)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
import textwrap
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import disttrain
from disttrain import TrainConfig, Trainer
from disttrain.config import TrainerConfig
from disttrain.data import EpochSampler, InProcessLoader, TokenCorpus, make_loader
from disttrain.metrics import read_metrics
from disttrain.step import collate, map_tensors, to_device
from tests.lm import PaddedSequences, TinyLM
from tests.support import ROOT, SMALL, env, summary, torchrun
from tests.support import disttrain as run_cli

#: tests/conf's options for tests/lm.py: `disttrain --config-dir tests/conf model=tiny_lm data=padded`.
LM = ["--config-dir", "tests/conf", "model=tiny_lm", "data=padded"]


def pairs(stdout: str) -> list[tuple[str, str, float]]:
    rows = re.findall(r"^(\S+ ~ \S+)\s+\| (?:True|False)\s+\| (True|False)\s+\| (\S+)", stdout, re.M)
    return [(pair, approx, float(maxdiff)) for pair, approx, maxdiff in rows]


#: A user's step weighs its loss by the items it returns, in the one code path every strategy runs: the
#: variants of one and of 2 processes show it, without HSDP's job of 4 (the model's loss runs them all).
WITHOUT_HSDP = ["--variants", "single,accumulate,dp,ddp,ddp+accum,fsdp,fsdp+accum"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "compared"),
    [([], 56), (["+step._target_=tests.lm.lm_step", *WITHOUT_HSDP], 42)],
    ids=["model-loss", "user-step"],
)
def test_padded_sequences_give_the_same_gradients_under_every_strategy(step, compared) -> None:
    # 16 sequences of 0-12 real tokens: 1×16, 1×(4×4), DDP and FSDP 2×8 and 2×(2×4), DataParallel and HSDP 2×2
    # hold different token counts per micro-batch and per rank, one micro-batch of rank 1 none at all.
    result = run_cli("check", *LM, *step, "--samples", "16", "--accumulate", "4")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = pairs(result.stdout)
    assert len(rows) == compared and all(approx == "True" and diff <= 1e-6 for _, approx, diff in rows), rows
    assert f"OK: all {compared} pairs give the same gradients within 1e-06" in result.stdout


@pytest.mark.slow
def test_a_step_that_averages_micro_batches_without_counts_is_a_mismatch() -> None:
    variants = ["--variants", "single,accumulate,ddp,dp"]  # the pairs it looks at
    result = run_cli("check", *LM, "+step._target_=tests.lm.unweighted_step", "--samples", "16", *variants)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    rows = {pair: diff for pair, _, diff in pairs(result.stdout)}
    assert rows["single ~ accumulate"] > 1e-4 and rows["single ~ ddp"] > 1e-4
    assert rows["single ~ dp"] <= 1e-6  # one process, one batch: the same mean either way
    assert re.search(
        r"^MISMATCH: \d+ of 12 pairs differ beyond 1e-06: the step tests.lm.unweighted_step returns a loss "
        r"that is not the mean over the items it reports \(a token loss returned without its count is "
        r"weighted like a mean over samples\)$",
        result.stdout,
        re.M,
    )


def reference_gradients(weights: dict, data: PaddedSequences, indices: list[int]) -> dict:
    """The gradient of the mean loss over every real token of `indices`, in one batch."""
    model = TinyLM()
    model.load_state_dict(weights)
    model(**collate([data[i] for i in indices]))["loss"].backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_the_python_api_trains_dict_batches_with_the_models_own_loss(tmp_path) -> None:
    data = PaddedSequences(size=24)
    trainer_cfg = TrainerConfig(batch_size=4, accumulate=3, max_steps=2, val_fraction=0, grad_clip_norm=0)
    disttrain.seed_everything(0)
    model = TinyLM()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        data,
        TrainConfig(run_dir=str(tmp_path), trainer=trainer_cfg),
    )
    order = list(trainer.sampler)
    seen = []

    def capture(*_) -> None:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen.append((weights, {n: p.grad.clone() for n, p in model.named_parameters()}))

    trainer.optimizer.register_step_pre_hook(capture)
    trainer.fit()
    for (weights, grads), window in zip(seen, (order[:12], order[12:]), strict=True):
        expected = reference_gradients(weights, data, window)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-6)
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    tokens = sum(int((data[i]["labels"] != -100).sum()) for i in order[:12])  # real tokens, not padding
    assert rows[0]["tokens_per_s"] * rows[0]["step_time_s"] == pytest.approx(tokens)


@dataclasses.dataclass
class Pair:
    features: torch.Tensor
    target: torch.Tensor


class Sample(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_any_nested_batch_is_collated_and_moved_as_a_whole() -> None:
    samples = [
        {
            "a": Pair(torch.ones(2), torch.tensor(i)),
            "b": [Sample(torch.zeros(3), torch.tensor(1.0))],
            "s": "x",
        }
        for i in range(4)
    ]
    batch = collate(samples)
    assert isinstance(batch["a"], Pair) and batch["a"].features.shape == (4, 2)
    assert batch["a"].target.tolist() == [0, 1, 2, 3]
    assert isinstance(batch["b"][0], Sample) and batch["b"][0].x.shape == (4, 3)
    assert batch["s"] == ["x"] * 4
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved["a"], Pair) and isinstance(moved["b"][0], Sample) and moved["s"] == ["x"] * 4


def leaves(batch) -> list[torch.Tensor]:
    flat: list[torch.Tensor] = []
    map_tensors(flat.append, batch)
    return flat


# With workers a loader starts a process: that case is in the slow tier, the in-process one in the fast.
@pytest.mark.parametrize(
    "workers", [0, pytest.param(1, marks=pytest.mark.slow)], ids=["in-process", "workers"]
)
@pytest.mark.parametrize("source", ["tokens", "dicts", "subset-mid-epoch", "dataclasses"])
def test_the_in_process_loader_yields_torchs_batches(source, workers) -> None:
    # The Trainer's loader on the CPU without workers fetches in-process (make_loader): batch for batch
    # what torch's DataLoader gives over the same sampler, and with workers (StatefulDataLoader, whose
    # workers collate into shared memory) the same again. Three of the four end on a short batch.
    data, start = {
        "tokens": (TokenCorpus(vocab_size=50, num_tokens=205), 0),
        "dicts": (PaddedSequences(size=30), 0),
        "subset-mid-epoch": (Subset(TokenCorpus(vocab_size=50, num_tokens=403), range(7, 393)), 12),
        "dataclasses": (DataclassData(), 8),
    }[source]
    collate_fn = None if source == "tokens" else collate
    batches = {}
    for name, loader_of in {
        "torch": lambda s: DataLoader(data, batch_size=4, sampler=s, collate_fn=collate_fn),
        "make_loader": lambda s: make_loader(data, s, 4, workers, False, collate_fn),
    }.items():
        sampler = EpochSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
        sampler.set_epoch(5, start=start)
        loader = loader_of(sampler)
        batches[name] = [leaves(b) for b in loader]
        assert len(loader) == math.ceil(len(sampler) / 4) == len(batches[name])
    assert isinstance(make_loader(data, sampler, 4, workers, False), InProcessLoader) == (workers == 0)
    assert len(batches["torch"]) > 1
    assert len(batches["make_loader"]) == len(batches["torch"])
    for mine, theirs in zip(batches["make_loader"], batches["torch"], strict=True):
        assert len(mine) == len(theirs)
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


class DataclassData(Dataset):
    """Samples as dataclasses; the model takes the whole batch and returns its loss."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> Pair:
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        return Pair(x, x.sum(0, keepdim=True))


class LossModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch: Pair) -> torch.Tensor:
        return nn.functional.mse_loss(self.linear(batch.features), batch.target)


def test_a_model_that_takes_the_batch_and_returns_its_loss_trains(tmp_path) -> None:
    trainer_cfg = TrainerConfig(batch_size=8, max_epochs=3, val_fraction=0.25)
    model = LossModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = Trainer(
        model, optimizer, DataclassData(), TrainConfig(run_dir=str(tmp_path), trainer=trainer_cfg)
    ).fit()
    vals = [r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r]
    assert result["steps"] == 18 and len(vals) == 3 and vals[-1] < vals[0]


@pytest.mark.slow
def test_a_step_reports_metrics_averaged_over_items_in_training_and_validation(tmp_path) -> None:
    out = tmp_path / "probe.json"
    result = torchrun(ROOT / "tests" / "scripts" / "items_probe.py", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(out.read_text())
    # Validation on 2 ranks (the sampler pads one sequence in) equals the one-batch computation.
    assert probe["val_loss"] == pytest.approx(probe["expected_val_loss"], rel=1e-6)
    assert probe["val_accuracy"] == pytest.approx(probe["expected_val_accuracy"], rel=1e-6)
    assert probe["train_accuracy_steps"] == [2, 3, 4, 6]  # every log_every_steps=2, and at each epoch end
    assert all(0 <= a <= 1 for a in probe["train_accuracy"])


BAD_STEPS = [
    (
        ["+step._target_=tests.lm.no_loss_step"],
        "step: returned a loss of shape (4, 12, 32); it must be a scalar, the mean over the batch's loss "
        "items",
    ),
    (
        ["model=logits_only"],
        "model output: a tensor of shape (4, 12, 32) carries no loss; return a scalar tensor, a dict with "
        '"loss" or an object with .loss (as transformers does when given labels), or pass a step function',
    ),
    (
        ["model=linear"],
        "batch: calling the model with a dict with keys input_ids, attention_mask, labels failed: "
        "Linear.forward() got an unexpected keyword argument 'input_ids'",
    ),
    (
        ["data=unlabelled"],
        "step 1: the window holds no loss items on any rank (every target ignored, -100?); a step's "
        "items count the targets its loss averages over",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "message"), BAD_STEPS, ids=[o[-1] for o, _ in BAD_STEPS])
def test_bad_steps_and_batches_are_one_line(overrides, message, tmp_path) -> None:
    job = [*LM, "trainer.batch_size=4", "trainer.val_fraction=0", "trainer.max_steps=3"]
    result = run_cli(*job, *overrides, f"run_dir={tmp_path / 'run'}")
    assert (result.returncode, result.stderr) == (2, f"disttrain: error: {message}\n")
    assert not (tmp_path / "run" / "snapshots").exists()


#: The default job's step written by hand as it was before batches could be anything: forward, mean
#: cross-entropy, backward, clip, SGD, over torch's own DataLoader (the Trainer's loader fetches in-process).
HAND_WRITTEN_DEFAULT_JOB = """
import random, numpy as np, torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset
from disttrain.data import TokenCorpus
from disttrain.metrics import params_sha256
from disttrain.models import MLPLanguageModel
torch.set_num_threads(1)
seed = 2147483647
data = TokenCorpus(vocab_size=50, num_tokens=4000)
train = Subset(data, range(len(data) - int(len(data) * 0.1)))
torch.manual_seed(seed)
model = MLPLanguageModel(vocab_size=50)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
random.seed(seed); np.random.seed(seed % 2**32); torch.manual_seed(seed)
sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=False)
sampler.set_epoch(0)
for x, y in DataLoader(train, batch_size=16, sampler=sampler):
    F.cross_entropy(model(x).float(), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
print(params_sha256(model))
"""


@pytest.mark.slow
def test_the_built_in_job_keeps_its_weights_bit_for_bit(tmp_path) -> None:
    run_dir = tmp_path / "trainer"
    result = run_cli(*SMALL, "trainer.max_epochs=1", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    hand = subprocess.run(
        [sys.executable, "-c", HAND_WRITTEN_DEFAULT_JOB], cwd=ROOT, env=env(), capture_output=True, text=True
    )
    assert hand.returncode == 0, hand.stderr
    assert summary(run_dir)["params_sha256"] == hand.stdout.strip()


README_EXAMPLE = textwrap.dedent(
    """
    import torch
    import disttrain
    from disttrain import Trainer, TrainConfig
    from disttrain.config import TrainerConfig
    from tests.lm import PaddedSequences, TinyLM, lm_step

    disttrain.seed_everything(0)  # before the model is built: the same weights every run
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = TrainConfig(run_dir=RUN_DIR, trainer=TrainerConfig(batch_size=4, accumulate=2, max_epochs=2))
    print(Trainer(model, optimizer, PaddedSequences(size=64), cfg, step=lm_step).fit()["params_sha256"])
    """
)


@pytest.mark.slow
def test_the_python_example_is_reproducible(tmp_path) -> None:
    shas = []
    for name in ("a", "b"):
        code = README_EXAMPLE.replace("RUN_DIR", repr(str(tmp_path / name)))
        res = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        shas.append(res.stdout.strip().splitlines()[-1])
    assert shas[0] == shas[1] and re.fullmatch(r"[0-9a-f]{64}", shas[0])
    manifest = json.loads(next((tmp_path / "a" / "snapshots").glob("step_*/manifest.json")).read_text())
    assert manifest["config"]["step"] == {"_target_": "tests.lm.lm_step"}  # what a resume compares


def test_a_python_loss_fn_is_a_plain_mean_and_validation_uses_it_too(tmp_path) -> None:
    # No `reduction=` keyword needed: validation goes through the same step, weighted by samples.
    from disttrain.data import RandomRegression

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).mean()

    disttrain.seed_everything(0)
    model = nn.Linear(20, 1)
    cfg = TrainConfig(
        run_dir=str(tmp_path), trainer=TrainerConfig(batch_size=16, max_epochs=2, val_fraction=0.25)
    )
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), RandomRegression(size=128), cfg, loss_fn=loss_fn
    )
    val = trainer.val_loader.dataset
    trainer.fit()
    with torch.no_grad():
        expected = loss_fn(
            model(torch.stack([val[i][0] for i in range(len(val))])),
            torch.stack([val[i][1] for i in range(len(val))]),
        )
    assert [r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r][-1] == pytest.approx(
        expected.item(), rel=1e-6
    )
