"""strategy=fsdp: FSDP2 (fully_shard) under real torchrun on gloo, sharded snapshots through DCP inside the
atomic commit, exact resume, snapshots that move between FSDP and DDP/single, export to one plain file,
torch.compile, and bad input in one line. (FSDP under bf16 and fp16 mixed precision: the weights sharded,
the forward in the low precision, the loss falling, fp16 through ShardedGradScaler, are the FSDP rows of
scripts/gpu_check.py, which tests/test_gpu_check.py runs on CPU.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from disttrain.export import exported_state
from disttrain.metrics import params_sha256, read_metrics
from disttrain.models import CharGPT
from disttrain.snapshot import list_snapshots
from tests.support import ROOT, SMALL, disttrain, env, kill_at_step, losses, start, summary, torchrun

#: A small GPT on the generated corpus (2 blocks: 3 FSDP groups with the root), 2 processes.
GPT = [
    "experiment=gpt", "data.num_tokens=3000", "data.context=16", "model.n_layer=2", "model.n_embd=32",
    "model.n_head=2", "trainer.batch_size=8", "trainer.max_steps=60", "trainer.val_every_steps=0",
    "trainer.num_threads=1", "optim.warmup_steps=5",
]  # fmt: skip
FSDP = ["launcher=torchrun", "launcher.nproc_per_node=2", "strategy=fsdp"]


@pytest.mark.slow
def test_accumulation_communicates_once_per_step_and_the_norm_is_global(tmp_path) -> None:
    out = tmp_path / "probe.json"
    result = torchrun(ROOT / "tests" / "scripts" / "fsdp_probe.py", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    for probe in ranks:
        one, four = probe["accumulate=1"], probe["accumulate=4"]
        groups = one["groups"]
        assert groups == 3  # CharGPT's 2 blocks, then the root
        # The same collectives for a step of 4 micro-batches as for a step of one: one reduce-scatter per
        # group, and all-gathers only on the window's first forward and its last backward.
        for step in (*one["per_step"], *four["per_step"]):
            assert step == {"all_gather": 2 * groups - 1, "reduce_scatter": groups}, (one, four)
        assert len(four["per_step"]) == 3
    # The norm clipped against is global: the same on both ranks, and one process's unsharded norm.
    assert ranks[0]["accumulate=4"]["norms"] == ranks[1]["accumulate=4"]["norms"]
    reference = single_process_first_norm(tmp_path)
    assert ranks[0]["accumulate=4"]["norms"][0] == pytest.approx(reference, rel=1e-5)
    # Non-finite gradients on rank 1 only: both ranks skip every step.
    assert [r["poisoned"]["skipped"] for r in ranks] == [3, 3]


def single_process_first_norm(tmp_path: Path) -> float:
    """The first step's gradient norm of the probe's job in one process (accumulate 8: the same 32
    samples make the step)."""
    code = f"""
import torch, disttrain
from disttrain import TrainConfig, Trainer
from disttrain.config import TrainerConfig
from disttrain.data import TokenCorpus
from disttrain.models import CharGPT
data = TokenCorpus(vocab_size=32, num_tokens=2000, context=8, sequence=True)
disttrain.seed_everything(0)
model = CharGPT(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
trainer = TrainerConfig(batch_size=4, global_batch_size=32, max_steps=1, val_fraction=0)
cfg = TrainConfig(run_dir={str(tmp_path / "single")!r}, trainer=trainer)
Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), data, cfg).fit()
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    row = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[0])
    return row["grad_norm"]


@pytest.mark.slow
def test_sigkill_then_the_same_command_resumes_bit_exactly(tmp_path) -> None:
    # With an EMA of the weights (every rank its shards'), and in the reference the same average by hand.
    ema = [f"+callbacks.ema.{k}={v}" for k, v in {**HAND, "_target_": "disttrain.ema.EMA"}.items()]
    job = [*GPT, *FSDP, "snapshot.every_steps=10", *ema]
    hand = [f"+callbacks.hand.{k}={v}" for k, v in {**HAND, "out": tmp_path / "hand.pt"}.items()]
    # The reference is profiled too (steps 4-6), which changes nothing it computes.
    profiler = ["+callbacks.profiler._target_=disttrain.profiler.Profiler", "+callbacks.profiler.wait=2"]
    reference = disttrain(*job, *hand, *profiler, f"run_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    traces = sorted((tmp_path / "reference" / "profile").iterdir())
    assert [p.name for p in traces] == [f"rank{r:05d}.step00000006.trace.json" for r in (0, 1)]
    for trace in traces:  # one per rank, each with its own process's events
        assert json.loads(trace.read_text())["traceEvents"]
    averaged = final_weights(tmp_path / "reference", ema=True)
    by_hand = torch.load(tmp_path / "hand.pt", weights_only=True)
    assert set(by_hand) == set(averaged) - {"head.weight"}
    assert torch.equal(averaged["head.weight"], averaged["tok.weight"])  # tied: one average, two names
    for name, average in by_hand.items():
        torch.testing.assert_close(averaged[name].double(), average, rtol=0, atol=1e-6)
    run_dir = tmp_path / "killed"
    kill_at_step(start(*job, f"run_dir={run_dir}"), run_dir, 25)
    snap = list_snapshots(run_dir / "snapshots")[0]
    # Sharded: each rank wrote its own shards through DCP, inside the checksummed commit.
    files = json.loads((snap.path / "manifest.json").read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(files)
    assert "model" not in torch.load(snap.path / "shared.pt", weights_only=True)
    again = disttrain(*job, f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    assert summary(run_dir)["params_sha256"] == summary(tmp_path / "reference")["params_sha256"]
    assert losses(run_dir) == losses(tmp_path / "reference")
    assert summary(run_dir)["strategy"] == "fsdp"
    # The average resumed from every rank's shards, bit for bit.
    resumed = final_weights(run_dir, ema=True)
    for name, average in averaged.items():
        assert torch.equal(resumed[name], average), name


HAND = {"_target_": "tests.callbacks.HandEMA", "decay": 0.9, "start_step": 3}


def final_weights(run_dir: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """What `disttrain export [--ema]` writes (its own test runs the command), read in this process."""
    return exported_state(run_dir, ema)[1]


#: The job whose snapshots move between shapes: the global batch fixed (16), so the data continues
#: exactly; a constant learning rate, since a cosine schedule spans max_steps, which a first life cuts.
MOVING = [*GPT, "trainer.global_batch_size=16", "trainer.max_steps=30", "optim.schedule=constant"]
#: An EMA of the weights: its state moves between shards and full tensors too (training is the same).
EMA = ["+callbacks.ema._target_=disttrain.ema.EMA", "+callbacks.ema.decay=0.95"]
#: Four processes: a micro-batch of 4 keeps the global batch of 16.
FOUR = ["launcher=torchrun", "launcher.nproc_per_node=4", "strategy=fsdp", "trainer.batch_size=4"]


#: The reference validates once, at its last step (after which nothing trains: the other lives, which
#: never validate, continue it exactly), on the EMA's weights.
VALIDATE_ON_EMA = ["trainer.val_every_steps=30", "+callbacks.ema.validate=true"]


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MOVING never interrupted, FSDP on 2 processes: what every life of a moved snapshot continues."""
    run_dir = tmp_path_factory.mktemp("fsdp-reference") / "run"
    reference = disttrain(*MOVING, *EMA, *VALIDATE_ON_EMA, *FSDP, f"run_dir={run_dir}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    return run_dir


def validation_loss(run_dir: Path, ema: bool) -> float:
    """The held-out split's mean loss over its tokens, in this process, of the run's exported weights
    (`disttrain export [--ema]`'s), in one batch: the model and data the run's config builds."""
    from disttrain.data import training_splits
    from disttrain.step import cross_entropy
    from disttrain.worker import build, read_config

    cfg = read_config(run_dir / "config.yaml")
    model = build("model", cfg.model)
    model.load_state_dict(final_weights(run_dir, ema))
    _, held_out = training_splits(build("data", cfg.data), None, cfg.trainer, world_size=2)
    samples = [held_out[i] for i in range(len(held_out))]
    inputs, targets = torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples])
    model.eval()
    with torch.no_grad():
        return cross_entropy(model(inputs), targets).item()


@pytest.mark.slow
def test_validation_under_fsdp_runs_on_the_ema_weights(fsdp_reference) -> None:
    """Every rank swapped its shards of the average in (and back: the lives that never validate end on
    the reference's weights, test_snapshots_move_between_fsdp_and_ddp_or_one_process)."""
    (logged,) = [(r["step"], r["val_loss"]) for r in read_metrics(fsdp_reference) if "val_loss" in r]
    assert logged[0] == 30
    assert logged[1] == pytest.approx(validation_loss(fsdp_reference, ema=True), rel=1e-5)
    assert logged[1] != pytest.approx(validation_loss(fsdp_reference, ema=False), rel=1e-3)


@pytest.mark.slow
def test_hsdp_snapshot_killed_mid_epoch_moves_to_1x4_2x2_and_2_processes_and_exports(
    tmp_path, fsdp_reference
) -> None:
    # HSDP 2×2 (2 replicas of 2 shards), SIGKILLed mid-epoch; its DCP shards reshard into FSDP over 4
    # processes (1×4), back into HSDP 2×2, then 2 processes: every step's loss that of the run never
    # interrupted. The HSDP life's snapshot exports as one full model. (From 2 processes into one:
    # test_snapshots_move_between_fsdp_and_ddp_or_one_process[fsdp-to-one-process].)
    run_dir = tmp_path / "run"
    hsdp = [*FOUR, "strategy.replicate=2"]
    started = start(*MOVING, *hsdp, "snapshot.every_steps=4", f"run_dir={run_dir}")
    kill_at_step(started, run_dir, 14)
    lives = [(FOUR, 18), (hsdp, 22), (FSDP, 30)]
    for overrides, until in lives:
        res = disttrain(*MOVING, *overrides, "snapshot.every_steps=4", f"trainer.max_steps={until}",
                        f"run_dir={run_dir}")  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        assert "resumed from" in res.stderr
        if overrides is hsdp:
            name, state = exported_state(run_dir)
            assert name == "step_00000022"
            model = CharGPT(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
            model.load_state_dict(state)
            assert params_sha256(model) == summary(run_dir)["params_sha256"]
    got, expected = losses(run_dir), losses(fsdp_reference)
    assert [step for step, _ in got] == list(range(1, 31))  # contiguous: each life continues the last
    for (step, loss), (_, want) in zip(got, expected, strict=True):
        assert loss == pytest.approx(want, rel=1e-4, abs=1e-5), step


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "then"),
    [
        (["strategy=ddp", *FSDP[:2]], FSDP),
        (FSDP, []),
        (FSDP, ["launcher=torchrun", "launcher.nproc_per_node=2"]),
    ],
    ids=["ddp-to-fsdp", "fsdp-to-one-process", "fsdp-to-ddp"],
)
def test_snapshots_move_between_fsdp_and_ddp_or_one_process(tmp_path, fsdp_reference, first, then) -> None:
    # The weights and their EMA agree with the run never interrupted within fp32 reduction tolerance.
    run_dir = tmp_path / "run"
    stopped = disttrain(*MOVING, *EMA, *first, "trainer.max_steps=10", f"run_dir={run_dir}")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    again = disttrain(*MOVING, *EMA, *then, f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and summary(run_dir)["steps"] == 30
    for ema in (False, True):
        expected = final_weights(fsdp_reference, ema)
        for name, tensor in final_weights(run_dir, ema).items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def five_fsdp_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT under FSDP on 2 processes, 5 steps: a sharded snapshot. A test copies it before it writes."""
    run_dir = tmp_path_factory.mktemp("five-fsdp-steps") / "run"
    res = disttrain(*GPT, *FSDP, "trainer.max_steps=5", f"run_dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_export_writes_the_full_model_that_a_plain_model_loads(tmp_path, five_fsdp_steps) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(five_fsdp_steps, run_dir)
    exported = disttrain("export", str(run_dir))
    assert exported.returncode == 0, exported.stderr
    assert re.fullmatch(
        r"exported the model of step_00000005 \(\d+ tensors, [\d.]+ MiB\) to .*model\.pt\n", exported.stdout
    )
    model = CharGPT(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    assert params_sha256(model) == summary(run_dir)["params_sha256"]  # the full parameters, hashed


BAD = [
    (
        ["strategy=fsdp"],
        "strategy='fsdp': shards the model over the job's processes, and this job has 1; launch with "
        "torchrun (launcher=torchrun launcher.nproc_per_node=N)",
    ),
    (
        [*FSDP, "strategy.replicate=3"],
        "strategy.replicate=3: must divide the job's 2 processes",
    ),
    (
        ["strategy.replicate=2"],
        "strategy.replicate=2: needs strategy=fsdp (it is auto): replicas of FSDP shards",
    ),
    (
        [*FSDP, "strategy.fsdp_blocks=[Nope]"],
        "strategy.fsdp_blocks='Nope': matches no module of CharGPT (its classes: Block, CausalSelfAttention, "
        "CharGPT, Embedding, GELU, LayerNorm, Linear, Sequential)",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    BAD,
    ids=[
        "one-process",
        "replicate-not-dividing",
        "replicate-without-fsdp",
        "no-such-block",
    ],
)
def test_bad_fsdp_input_is_one_line_and_starts_nothing(tmp_path, overrides, message, cli_here) -> None:
    res = cli_here(*GPT, *overrides, f"run_dir={tmp_path / 'run'}")
    assert (res.returncode, res.stderr) == (2, f"disttrain: error: {message}\n")
    assert not (tmp_path / "run").exists()


def test_checkpointing_a_model_without_blocks_is_one_line_and_starts_nothing(tmp_path, cli_here) -> None:
    res = cli_here("strategy.activation_checkpointing=full", f"run_dir={tmp_path / 'run'}")  # the MLP
    assert (res.returncode, res.stderr) == (
        2,
        "disttrain: error: strategy.activation_checkpointing='full': finds no blocks in MLPLanguageModel (no "
        "nn.ModuleList, no nn.Sequential of 2+ modules of one class); name them with strategy.fsdp_blocks "
        "(class or module names)\n",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resuming_a_sharded_snapshot_into_another_shape_is_one_line(tmp_path, five_fsdp_steps) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(five_fsdp_steps, run_dir)
    # The CLI compares the model's config before anything starts; a model built in Python of another
    # shape (width 48, not 32) only shows when the shards load.
    script = tmp_path / "resume.py"
    script.write_text(
        f"""
import torch
from disttrain import TrainConfig, Trainer
from disttrain.config import OptimConfig, StrategyConfig, TrainerConfig
from disttrain.data import TokenCorpus
from disttrain.models import CharGPT
from disttrain.snapshot import SnapshotError
data = TokenCorpus(vocab_size=256, num_tokens=3000, context=16, sequence=True)
model = CharGPT(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=48)
trainer = TrainerConfig(batch_size=8, max_steps=10, val_fraction=0.02)
strategy, optim = StrategyConfig(name="fsdp"), OptimConfig(name="adamw")
cfg = TrainConfig(run_dir={str(run_dir)!r}, strategy=strategy, trainer=trainer, optim=optim)
try:
    Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), data, cfg).fit()
except SnapshotError as e:
    print(e)
"""
    )
    res = torchrun(script)
    line = r"cannot resume from .*step_00000005: the model differs: rank \d: \w+: .*[Ss]ize"
    assert re.search(line, res.stdout), res.stdout + res.stderr[-2000:]


@pytest.mark.slow
def test_compile_trains_and_says_when_it_captures_nothing(tmp_path) -> None:
    job = [*GPT, "trainer.max_steps=8", "trainer.compile=true"]
    compiled = disttrain(*job, f"run_dir={tmp_path / 'compiled'}", timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "torch.compile" not in compiled.stderr  # nothing to say: one graph, no recompiles
    eager = disttrain(*GPT, "trainer.max_steps=8", f"run_dir={tmp_path / 'eager'}")
    for (_, a), (_, b) in zip(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert eager.returncode == 0


@pytest.mark.slow
def test_compile_that_captures_nothing_is_said_in_one_line(tmp_path) -> None:
    job = [
        "--config-dir",
        "tests/conf",
        "model=not_traced",
        "data=padded",
        "data.size=64",
        "trainer.batch_size=4",
    ]
    res = disttrain(*job, "trainer.compile=true", "trainer.max_steps=6", f"run_dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [line for line in res.stderr.splitlines() if "trainer.compile=true" in line]
    assert (
        len(warnings) == 1
        and "torch.compile captured no graph in 5 steps, so the model runs eager" in warnings[0]
    )


def test_compile_without_a_compiler_is_refused_before_anything_starts(tmp_path, cli_here) -> None:
    res = cli_here(*GPT, "trainer.compile=true", f"run_dir={tmp_path / 'run'}", CXX="no-such-compiler")
    assert (res.returncode, res.stderr) == (
        2,
        "disttrain: error: trainer.compile=True: torch.compile needs a C++ compiler and 'no-such-compiler' "
        "is not on PATH (apt-get install g++, or set CXX)\n",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_buffers_are_rank_0s_as_under_ddp(tmp_path) -> None:
    # BatchNorm's running statistics: FSDP leaves buffers to each rank, and DCP keeps one rank's copy of
    # a plain tensor. disttrain broadcasts rank 0's before each synchronised forward and each snapshot,
    # as DDP does: the snapshot holds what DDP's would.
    job = [*SMALL, "trainer.max_steps=20", "trainer.val_fraction=0", "launcher=torchrun"]
    for strategy in ("ddp", "fsdp"):
        res = disttrain(*job, f"strategy={strategy}", f"run_dir={tmp_path / strategy}")
        assert res.returncode == 0, res.stderr[-3000:]
    ddp, fsdp = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    for name in ("norm.running_mean", "norm.running_var", "norm.weight", "out.weight"):
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5)
