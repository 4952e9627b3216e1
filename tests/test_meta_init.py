"""strategy=fsdp's sharded initialisation: every rank but rank 0 builds the model on the meta device
(disttrain.build_model), and the sharded model starts from rank 0's weights and buffers, those of a
one-process build with the same seed; models that cannot be built on meta are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import disttrain
from disttrain import Trainer
from disttrain.config import ConfigError, StrategyConfig, TrainConfig
from disttrain.data import TokenCorpus
from disttrain.dist import DistEnv
from disttrain.models import CharGPT
from disttrain.strategy import check_built
from tests.support import ROOT, env, summary, torchrun
from tests.support import disttrain as run_disttrain
from tests.targets import TableGPT

PROBE = ROOT / "tests" / "scripts" / "meta_init_probe.py"
GPT = [
    "experiment=gpt", "data.num_tokens=3000", "data.context=16", "model.n_layer=2", "model.n_embd=32",
    "model.n_head=2", "trainer.batch_size=8", "trainer.val_every_steps=0", "trainer.num_threads=1",
]  # fmt: skip
FSDP = ["launcher=torchrun", "launcher.nproc_per_node=2", "strategy=fsdp"]


def rank(r: int, world: int = 2) -> DistEnv:
    return DistEnv(rank=r, local_rank=r, world_size=world, local_world_size=world, device=torch.device("cpu"))


def test_build_model_builds_on_meta_on_every_rank_but_rank_0_under_fsdp_only() -> None:
    fsdp = TrainConfig(strategy=StrategyConfig(name="fsdp"))
    factory = lambda: CharGPT(n_layer=1, n_embd=16, n_head=2)  # noqa: E731
    devices = {
        "fsdp rank 0": disttrain.build_model(factory, fsdp, rank(0)),
        "fsdp rank 1": disttrain.build_model(factory, fsdp, rank(1)),
        "ddp rank 1": disttrain.build_model(factory, TrainConfig(), rank(1)),
        "meta_init=false": disttrain.build_model(
            factory, TrainConfig(strategy=StrategyConfig(name="fsdp", meta_init=False)), rank(1)
        ),
    }
    on = {name: next(model.parameters()).device.type for name, model in devices.items()}
    assert on == {"fsdp rank 0": "cpu", "fsdp rank 1": "meta", "ddp rank 1": "cpu", "meta_init=false": "cpu"}


def test_a_plain_tensor_attribute_is_refused_naming_its_module() -> None:
    fsdp = TrainConfig(strategy=StrategyConfig(name="fsdp"))
    with pytest.raises(ConfigError) as refused:
        disttrain.build_model(
            lambda: TableGPT(plain_table=True, n_layer=1, n_embd=16, n_head=2), fsdp, rank(1)
        )
    assert str(refused.value) == (
        "model TableGPT: cannot be built on the meta device for strategy=fsdp: the root (TableGPT) holds "
        "tensor 'table' that is neither a parameter nor a buffer, so rank 0 cannot send it; register it "
        "with register_buffer, or set strategy.meta_init=false"
    )


def test_a_meta_model_is_refused_where_rank_0_cannot_fill_it(tmp_path) -> None:
    with torch.device("meta"):
        model = CharGPT(block_size=8, n_layer=1, n_embd=16, n_head=2)
    data = TokenCorpus(vocab_size=256, num_tokens=2000, context=8, sequence=True)
    with pytest.raises(ConfigError) as refused:
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, TrainConfig(run_dir=str(tmp_path)))
    assert str(refused.value) == (
        "model: CharGPT has tensors on the meta device (no values), and only strategy=fsdp fills such a "
        "model with rank 0's weights (this job's is single); build it with disttrain.build_model"
    )
    with pytest.raises(ConfigError, match="rank 0 builds it in full: its weights are the ones every other"):
        check_built(model, "fsdp", rank=0)
    check_built(model, "fsdp", rank=1)  # filled from rank 0's


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    command = [sys.executable, str(PROBE), str(out), "single", "1"]
    res = subprocess.run(command, cwd=ROOT, env=env(PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "replicate"), [(2, 1), (4, 2)], ids=["fsdp-2", "hsdp-2x2"])
def test_sharded_model_starts_from_the_weights_of_one_process(
    tmp_path, one_process, nproc, replicate
) -> None:
    res = torchrun(PROBE, str(tmp_path), "fsdp", str(replicate), nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = (json.loads((d / "probe.json").read_text()) for d in (tmp_path, one_process))
    assert got["built_on"] == ["cpu"] + ["meta"] * (nproc - 1)
    assert got["start_sha256"] == want["start_sha256"]  # step 0: bit for bit one process's weights
    assert got["tables"] == want["tables"] * nproc  # the buffer kept out of the state dict, on every rank
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    weights, expected = (torch.load(d / "weights.pt", weights_only=True) for d in (tmp_path, one_process))
    assert torch.equal(weights["gpt.head.weight"], weights["gpt.tok.weight"])  # still tied
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "rule"),
    [
        (
            ["model._target_=tests.targets.FailsOnMeta"],
            "model._target_='tests.targets.FailsOnMeta': cannot be built on the meta device for "
            "strategy=fsdp (every rank but rank 0 builds it there): it raised RuntimeError: Tensor.item() "
            "cannot be called on meta tensors (",
        ),
        (
            ["model._target_=tests.targets.TableGPT", "+model.plain_table=true"],
            "model._target_='tests.targets.TableGPT': cannot be built on the meta device for strategy=fsdp: "
            "the root (TableGPT) holds tensor 'table' that is neither a parameter nor a buffer, so rank 0 "
            "cannot send it; register it with register_buffer, or set strategy.meta_init=false\n",
        ),
    ],
    ids=["fails-on-meta", "plain-tensor"],
)
def test_a_model_that_cannot_be_built_on_meta_is_one_line_and_starts_nothing(
    tmp_path, model, rule, cli_here
) -> None:
    res = cli_here(*GPT, *model, *FSDP, f"run_dir={tmp_path / 'run'}")
    assert res.returncode == 2
    assert res.stderr.startswith(f"disttrain: error: {rule}") and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_meta_init_false_builds_in_full_everywhere_and_trains(tmp_path) -> None:
    job = [*GPT, "model._target_=tests.targets.FailsOnMeta", *FSDP, "strategy.meta_init=false"]
    res = run_disttrain(*job, "trainer.max_steps=2", f"run_dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert summary(tmp_path / "run")["steps"] == 2
