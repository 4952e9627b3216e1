"""Every check that needs a GPU, in one run of a few minutes, ending in one table (check, result, figure).

    scripts/gpu_check.sh                 # on a GPU machine: nccl, bf16/fp16, FSDP, compile, memory, MFU
    scripts/gpu_check.sh --cpu           # the same checks on CPU/gloo, tiny sizes (the test runs this)
    scripts/gpu_check.sh --json out.json
    scripts/gpu_check.sh --cpu --skip torch.compile   # leave out the checks whose names start so

Without a GPU (or with --cpu) each check runs on CPU with gloo where it can, and the ones that only mean
something on CUDA (peak memory, MFU, scripts/bench.py --device cuda) say `needs CUDA`. Results:
  ok             the check ran and its figure is what it measured
  needs CUDA     CPU mode: this check is for a GPU
  needs 2 GPUs   a 2-process check on a 1-GPU machine that NCCL cannot run (it refuses two ranks on
                 one GPU: "Duplicate GPU detected"); the figure says what was tried
  not available  disttrain has no such option (nothing is invented to check)
  skipped        left out with --skip
  FAILED         the check ran and went wrong: the figure is its error; the script exits 1

Each check runs in a process of its own (`--check NAME`, under torchrun for 2-process ones) with a time
limit, and the whole run keeps to --budget-s (default 540 s: under 10 minutes with startup), the long
benchmark checks last.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: The GPT the training checks use: a toy on CPU, a small one on CUDA (seconds either way).
SIZES = {
    "cpu": {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "batch": 8},
    "cuda": {"vocab_size": 256, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 256, "batch": 16},
}
#: GPT-2 small's shape (scripts/bench.py's CUDA GPT) for peak memory and MFU.
GPT2_SMALL = {"vocab_size": 256, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768, "batch": 8}
OK, NEEDS_CUDA, NEEDS_2_GPUS, NOT_AVAILABLE, SKIPPED, FAILED = (
    "ok",
    "needs CUDA",
    "needs 2 GPUs",
    "not available",
    "skipped",
    "FAILED",
)


# ==== the checks, each in its own process ===============================================================
class Refused(Exception):
    """A check this machine cannot run (status, figure), as opposed to one that went wrong."""

    def __init__(self, status: str, figure: str) -> None:
        super().__init__(figure)
        self.status, self.figure = status, figure


def gpt_run(
    args: argparse.Namespace,
    run_dir: Path,
    *,
    precision: str = "fp32",
    strategy: str = "auto",
    steps: int = 30,
    size: dict[str, Any] | None = None,
    compile_: bool = False,
    env: Any = None,
    probe: Callable[[Any], None] | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """A GPT trained through the disttrain Trainer (Python API) on this device; what metrics.jsonl says."""
    import torch

    from disttrain.config import OptimConfig, SnapshotConfig, StrategyConfig, TrainConfig, TrainerConfig
    from disttrain.data import TokenCorpus
    from disttrain.models import CharGPT
    from disttrain.trainer import Trainer, make_optimizer, seed_everything

    size = dict(size or SIZES[args.device])
    batch = size.pop("batch")
    world = int(os.environ.get("WORLD_SIZE", 1))
    tokens = (steps + 2) * batch * world + size["block_size"]
    data = TokenCorpus(size["vocab_size"], tokens, size["block_size"], sequence=True)
    seed_everything(0)
    model = CharGPT(**size)
    cfg = TrainConfig(
        name="gpu-check",
        run_dir=str(run_dir),
        strategy=StrategyConfig(name=strategy),
        trainer=TrainerConfig(
            max_epochs=1,
            max_steps=steps,
            batch_size=batch,
            precision=precision,
            seed=0,
            val_fraction=0.0,
            num_threads=1 if args.device == "cpu" else 0,
            device=args.device,
            compile=compile_,
            log_every_steps=10**6,
        ),
        optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=0.0, warmup_steps=0, schedule="constant"),
        snapshot=SnapshotConfig(every_steps=0, keep_last=1),
    )
    trainer = Trainer(model, make_optimizer(cfg.optim, model), data, cfg, env=env, callbacks=callbacks)
    if probe is not None:
        probe(trainer)
    summary = trainer.fit()
    rows = []
    if (run_dir / "metrics.jsonl").exists():
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows = [r for r in map(json.loads, lines) if "loss" in r]
    out = {"summary": summary, "rows": rows, "trainer": trainer}
    scaler = trainer.precision.scaler
    out["scale"] = scaler.get_scale() if scaler is not None else None
    out["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return out


def learned(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(first loss, mean of the last five applied steps); raises if training did not learn."""
    applied = [r["loss"] for r in rows if not r["skipped"]]
    if len(applied) < 10 or not all(math.isfinite(v) for v in applied):
        raise AssertionError(f"{len(applied)} of {len(rows)} steps applied, losses {applied[:3]}...")
    first, last = applied[0], statistics.fmean(applied[-5:])
    if not last < first:
        raise AssertionError(f"the loss did not fall: {first:.3f} -> {last:.3f}")
    return first, last


def check_process_group(args: argparse.Namespace, scratch: Path) -> str:
    import torch
    import torch.distributed as dist

    from disttrain.dist import setup_distributed, teardown

    env = setup_distributed(args.device, timeout_s=60)
    try:
        world = env.world_size
        t = torch.full((1,), float(env.rank + 1), device=env.device)
        dist.all_reduce(t)
        if t.item() != world * (world + 1) / 2:
            raise AssertionError(f"all_reduce gave {t.item()}, expected {world * (world + 1) / 2}")
        from bench import time_allreduce  # (scripts/: this script's own directory)

        ms = time_allreduce(1 << 22, env, repeats=6) * 1e3  # 16 MiB of fp32
        where = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "CPU"
        return f"{dist.get_backend()} on {world} x {where}: all_reduce correct; 16 MiB in {ms:.2f} ms"
    finally:
        teardown()


def check_train(args: argparse.Namespace, scratch: Path) -> str:
    res = gpt_run(args, scratch / "run", precision=args.precision)
    first, last = learned(res["rows"])
    figure = f"loss {first:.3f} -> {last:.3f} in {len(res['rows'])} steps"
    skipped = sum(r["skipped"] for r in res["rows"])
    if args.precision == "fp16":
        scaler = res["trainer"].precision.scaler
        figure += f", {type(scaler).__name__}({args.device}) scale {res['scale']:g}, {skipped} skipped"
    if args.device == "cuda":
        figure += f", peak {max(r['peak_mem_gib'] for r in res['rows']):.2f} GiB"
    return figure


def same_gpu_env(args: argparse.Namespace) -> Any:
    """Two ranks on the one GPU (cuda:0), the process group made here (disttrain takes the GPU of the
    local rank, which a 1-GPU machine has not): NCCL refuses this, and the refusal is the figure."""
    import datetime

    import torch
    import torch.distributed as dist

    from disttrain.dist import DistEnv

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60), device_id=device)
        t = torch.ones(1, device=device)
        dist.all_reduce(t)  # the communicator exists once a collective has run
        torch.cuda.synchronize()
    except Exception as e:
        line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise Refused(NEEDS_2_GPUS, f"2 ranks on 1 GPU: NCCL refused ({line[:160]})") from None
    return DistEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world, device=device)


def check_fsdp(args: argparse.Namespace, scratch: Path) -> str:
    """FSDP2 over 2 processes with MixedPrecisionPolicy (bf16) or with ShardedGradScaler too (fp16)."""
    import torch
    from torch.distributed.tensor import DTensor

    env = same_gpu_env(args) if args.same_gpu else None
    seen: dict[str, Any] = {}

    def probe(trainer: Any) -> None:
        layer = trainer.module.blocks[0].mlp[0]
        seen["sharded"] = isinstance(layer.weight, DTensor)
        seen["local"] = tuple(layer.weight.to_local().shape) if seen["sharded"] else None

        def hook(module: Any, inputs: Any) -> None:  # inside FSDP's forward: the gathered, cast weight
            seen.setdefault("compute", module.weight.dtype)

        layer.register_forward_pre_hook(hook)

    clean = False
    try:
        res = gpt_run(args, scratch / "run", precision=args.precision, strategy="fsdp", env=env, probe=probe)
        clean = True
    finally:
        if env is not None:  # the group made here (without env= the Trainer makes and ends its own)
            from disttrain.dist import teardown

            teardown(clean)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if not seen.get("sharded") or seen.get("compute") != want:
        raise AssertionError(f"parameters sharded: {seen.get('sharded')}, forward in {seen.get('compute')}")
    if res["trainer"].env.rank != 0:  # rank 0 writes metrics.jsonl and judges the losses
        return f"rank {res['trainer'].env.rank}"
    first, last = learned(res["rows"])
    figure = (
        f"loss {first:.3f} -> {last:.3f}; weights sharded {seen['local']} per rank, forward in"
        f" {str(want).removeprefix('torch.')}"
    )
    if args.precision == "fp16":
        figure += f", {type(res['trainer'].precision.scaler).__name__} scale {res['scale']:g}"
    if args.same_gpu:
        figure += "; 2 ranks on 1 GPU"
    return figure


def check_compile(args: argparse.Namespace, scratch: Path) -> str:
    import torch

    eager = gpt_run(args, scratch / "eager", steps=12)
    torch._dynamo.reset()
    compiled = gpt_run(args, scratch / "compiled", steps=12, compile_=True)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    a, b = [r["loss"] for r in eager["rows"]], [r["loss"] for r in compiled["rows"]]
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
    tolerance = 2e-3 if args.device == "cpu" else 1e-2  # CUDA: other kernels, other rounding, 12 steps
    if not graphs or worst > tolerance:
        raise AssertionError(f"{graphs} graphs compiled; losses differ from eager by {worst:.2e} relative")
    step = statistics.median(r["step_time_s"] for r in compiled["rows"][3:]) * 1e3
    eager_step = statistics.median(r["step_time_s"] for r in eager["rows"][3:]) * 1e3
    first = compiled["rows"][0]["step_time_s"]
    return (
        f"{graphs} graph(s); losses within {worst:.0e} of eager; step {step:.2f} ms vs eager"
        f" {eager_step:.2f} ms; first step (compile) {first:.1f} s"
    )


def check_peak_mfu(args: argparse.Namespace, scratch: Path) -> str:
    res = gpt_run(args, scratch / "run", precision="bf16", steps=20, size=GPT2_SMALL)
    rows = res["rows"][5:]
    peak = max(r["peak_mem_gib"] for r in res["rows"])
    mfu = [r["mfu"] for r in rows if "mfu" in r]
    mfu_text = (
        f"MFU {statistics.median(mfu):.1%}" if mfu else f"no MFU: no peak known for {res['device_name']!r}"
    )
    tokens = statistics.median(r["tokens_per_s"] for r in rows)
    return f"GPT-2 small bf16 batch 8x1024: peak {peak:.2f} GiB, {tokens:,.0f} tokens/s, {mfu_text}"


def check_profiler(args: argparse.Namespace, scratch: Path) -> str:
    """disttrain.profiler.Profiler: a chrome trace of a window of steps that parses; on CUDA also the
    memory snapshots (a window's, one on demand at a step), which https://pytorch.org/memory_viz reads."""
    from disttrain.profiler import Profiler

    cuda = args.device == "cuda"
    profiler = Profiler(wait=1, warmup=1, active=2, memory=cuda, memory_at_steps=[3] if cuda else [])
    gpt_run(args, scratch / "run", steps=6, callbacks=[profiler])
    if len(profiler.traces) != 1:
        raise AssertionError(f"{len(profiler.traces)} traces written, expected 1")
    events = json.loads(profiler.traces[0].read_text())["traceEvents"]
    steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")]
    kernels = sum(e.get("cat") == "kernel" for e in events)
    figure = f"trace of {len(steps)} steps, {len(events)} events"
    if not cuda:
        return figure + "; memory snapshots need CUDA"
    snapshots = sorted((scratch / "run" / "profile").glob("*.memory.pickle"))
    if len(snapshots) < 2:
        raise AssertionError(f"memory snapshots written: {[p.name for p in snapshots]}, expected 2")
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in snapshots)
    return f"{figure}, {kernels} CUDA kernels; memory snapshots: {sizes}"


CHECK_WORKERS: dict[str, Callable[[argparse.Namespace, Path], str]] = {
    "process_group": check_process_group,
    "train": check_train,
    "fsdp": check_fsdp,
    "compile": check_compile,
    "peak_mfu": check_peak_mfu,
    "profiler": check_profiler,
}


def run_check_worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--check", required=True, choices=tuple(CHECK_WORKERS))
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--same-gpu", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    # One directory for every rank of the job: a run dir is shared (DCP writes every rank's shards into it).
    scratch = args.out.parent / args.out.stem
    try:
        result = {"status": OK, "figure": CHECK_WORKERS[args.check](args, scratch)}
    except Refused as e:
        result = {"status": e.status, "figure": e.figure}
    except Exception as e:  # the check went wrong: one line for the table, the traceback on stderr
        import traceback

        traceback.print_exc()
        line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        result = {"status": FAILED, "figure": f"{type(e).__name__}: {line}"[:300]}
    Path(f"{args.out}.{rank}").write_text(json.dumps(result))
    return 0 if result["status"] != FAILED else 1


# ==== the driver ==========================================================================================
@dataclasses.dataclass
class Check:
    name: str
    #: The worker and its arguments, or None for checks the driver answers itself.
    worker: str | None = None
    options: tuple[str, ...] = ()
    nproc: int = 1
    cuda_only: bool = False
    timeout_s: float = 120.0
    #: A driver-side check: (seconds it may take) -> (status, figure).
    answer: Callable[[float], tuple[str, str]] | None = None


def syncbn_option(timeout: float = 0) -> tuple[str, str]:
    """disttrain's StrategyConfig has a SyncBatchNorm option, or it is not available (nothing invented)."""
    from disttrain.config import StrategyConfig

    names = [f.name for f in dataclasses.fields(StrategyConfig)]
    found = [n for n in names if "sync" in n.lower() and ("bn" in n.lower() or "batchnorm" in n.lower())]
    if not found:
        return NOT_AVAILABLE, f"StrategyConfig has no SyncBatchNorm option (its fields: {', '.join(names)})"
    return FAILED, f"StrategyConfig.{found[0]} exists and this script does not check it yet: add the check"


def bench_gpu(scratch: Path, timeout: float) -> tuple[str, str]:
    """scripts/bench.py --device cuda: the Trainer / hand-written ratio and MFU of the GPT (GPT-2 small)."""
    out = scratch / "bench.json"
    cmd = [sys.executable, "scripts/bench.py", "--device", "cuda", "--precision", "bf16", "--model", "gpt"]
    cmd += ["--repeats", "3", "--startup-repeats", "1", "--json", str(out)]
    proc = run(cmd, timeout)
    if proc.returncode != 0:
        return FAILED, f"scripts/bench.py exited {proc.returncode}: {last_line(proc.stderr or proc.stdout)}"
    rows = json.loads(out.read_text())["rows"]
    row = next(r for r in rows if r.get("name") == "gpt/bf16/single/trainer")
    mfu = f"MFU {row['mfu']:.1%}" if "mfu" in row else "no MFU (unknown GPU: --peak-tflops)"
    return OK, (
        f"GPT-2 small bf16: Trainer/hand {row['ratio']:.3f}, {row['step_ms']:.1f} ms/step,"
        f" {row['tokens_per_s']:,.0f} tokens/s, {mfu}"
    )


def bench_fsdp_gpu(scratch: Path, timeout: float) -> tuple[str, str]:
    """scripts/bench_fsdp.py --device cuda: FSDP vs DDP memory (2+ GPUs) and compile on/off."""
    out = scratch / "bench_fsdp.json"
    cmd = [sys.executable, "scripts/bench_fsdp.py", "--device", "cuda", "--repeats", "3"]
    cmd += ["--snapshot-repeats", "3", "--compile-repeats", "1", "--json", str(out)]
    cmd += ["--only", "memory,step,snapshot,compile"]  # (scale, checkpointing: bench_scale)
    proc = run(cmd, timeout)
    if proc.returncode != 0:
        return (
            FAILED,
            f"scripts/bench_fsdp.py exited {proc.returncode}: {last_line(proc.stderr or proc.stdout)}",
        )
    rows = json.loads(out.read_text())["rows"]
    parts = []
    memory = next((r for r in rows if r.get("label") == "FSDP / DDP per-rank total"), None)
    if memory:
        parts.append(f"FSDP/DDP state per rank {memory['ratio']:.3f}, peak {memory['peak_ratio']:.3f}")
    step = next((r for r in rows if r.get("label") == "FSDP / DDP step time"), None)
    if step:
        parts.append(f"step FSDP/DDP {step['ratio']:.3f}")
    if not memory:
        parts.append("memory rows need 2 GPUs")
    comp = next(r for r in rows if r.get("label") == "compiled / eager step time")
    parts.append(f"compiled/eager step {comp['ratio']:.3f}")
    return OK, "; ".join(parts)


def bench_scale(scratch: Path, timeout: float, cuda: bool) -> tuple[str, str]:
    """scripts/bench_fsdp.py's scale and checkpointing tables: per-rank state FSDP / DDP and the peak
    memory of a meta build against a full one on 4 processes (4+ GPUs; on CPU 2 processes of a toy),
    activation checkpointing's peak step memory and step time against none (one process)."""
    out = scratch / "bench_scale.json"
    cmd = [sys.executable, "scripts/bench_fsdp.py", "--only", "scale,checkpointing", "--json", str(out)]
    cmd += (
        ["--device", "cuda", "--repeats", "3"]
        if cuda
        else ["--quick", "--scale-nproc", "2", "--repeats", "1"]
    )
    proc = run(cmd, timeout)
    if proc.returncode != 0:
        return (
            FAILED,
            f"scripts/bench_fsdp.py exited {proc.returncode}: {last_line(proc.stderr or proc.stdout)}",
        )
    report = json.loads(out.read_text())
    rows = {r["label"]: r for r in report["rows"]}
    parts = []
    for prefix, name in (("state FSDP / DDP", "state FSDP/DDP"), ("build meta / full", "build meta/full")):
        row = next((r for label, r in rows.items() if label.startswith(prefix)), None)
        if row is not None:
            world = row["label"].rsplit(" ", 1)[1]
            # The targets are for 4 processes (fewer shard less: CPU mode's toy runs 2).
            missed = " MISSED" if world == "x4" and row["ratio"] > row["target"] else ""
            parts.append(f"{name} {world} {row['ratio']:.3f} (x4 target <= {row['target']:.2f}{missed})")
    if not parts:  # too few GPUs: the note says how many the rows need
        parts.append(next((n for n in report["notes"] if "scale rows skipped" in n), "no scale rows"))
    for mode in ("selective", "full"):
        row = rows[f"activation_checkpointing={mode}"]
        parts.append(f"{mode}: step memory x{row['peak_ratio']:.2f}, step time x{row['ratio']:.2f}")
    return OK, "; ".join(parts)


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`cmd` in a process group of its own; on the timeout SIGTERM to the group (torchrun passes it on to
    its workers, which run in sessions of their own), SIGKILL 15 s later; then TimeoutExpired."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or [""])[-1][:300]


def plan_checks(cuda: bool, gpus: int, scratch: Path) -> list[Check]:
    two = "2 processes" + ("" if not cuda else " (2 GPUs)" if gpus >= 2 else " (tried on 1 GPU)")
    checks = [
        Check("process group, 1 process (nccl; gloo on CPU)", "process_group", timeout_s=60),
        Check("process group, 2 processes (nccl; gloo on CPU)", "process_group", nproc=2, timeout_s=60),
        Check("bf16 training (Trainer, autocast)", "train", ("--precision", "bf16")),
        Check("fp16 training (Trainer, GradScaler)", "train", ("--precision", "fp16")),
        Check(f"FSDP bf16 (MixedPrecisionPolicy), {two}", "fsdp", ("--precision", "bf16"), nproc=2),
        Check(f"FSDP fp16 (+ ShardedGradScaler), {two}", "fsdp", ("--precision", "fp16"), nproc=2),
        Check("torch.compile (trainer.compile=true)", "compile", timeout_s=240),
        Check("profiler trace + CUDA memory snapshots", "profiler", timeout_s=120),
        Check("SyncBatchNorm option", answer=syncbn_option),
        Check("peak memory + Trainer MFU (GPT-2 small)", "peak_mfu", cuda_only=True, timeout_s=180),
        Check(
            "scripts/bench.py --device cuda (ratio, MFU)", cuda_only=True, timeout_s=300,
            answer=lambda timeout: bench_gpu(scratch, timeout),
        ),
        Check(
            "scripts/bench_fsdp.py --device cuda", cuda_only=True, timeout_s=300,
            answer=lambda timeout: bench_fsdp_gpu(scratch, timeout),
        ),
        Check(
            "FSDP x4 state + meta build, activation checkpointing (scripts/bench_fsdp.py)", timeout_s=200,
            answer=lambda timeout: bench_scale(scratch, timeout, cuda),
        ),
    ]  # fmt: skip
    return checks


#: Why two ranks on the one GPU could not run (NCCL's refusal), once the first FSDP check has found it.
_REFUSED_ON_ONE_GPU: list[str] = []


def run_check(check: Check, cuda: bool, gpus: int, scratch: Path, seconds_left: float) -> tuple[str, str]:
    if check.cuda_only and not cuda:
        return NEEDS_CUDA, "-"
    if seconds_left < 20:
        return FAILED, f"not run: the time budget was spent ({seconds_left:.0f} s left)"
    timeout = min(check.timeout_s, seconds_left)
    if check.answer is not None:
        try:
            return check.answer(timeout)
        except subprocess.TimeoutExpired as e:
            return FAILED, f"timed out after {e.timeout:.0f} s"
        except Exception as e:
            return FAILED, f"{type(e).__name__}: {e}"[:300]
    device = "cuda" if cuda else "cpu"
    options = list(check.options)
    same_gpu = cuda and check.nproc > gpus
    if same_gpu:
        if check.worker != "fsdp":  # "a 2-process job if 2 GPUs"
            return NEEDS_2_GPUS, f"{gpus} GPU on this machine"
        if _REFUSED_ON_ONE_GPU:  # NCCL refused it for the first FSDP check: the same for the next
            return NEEDS_2_GPUS, _REFUSED_ON_ONE_GPU[0]
        options.append("--same-gpu")
    out = scratch / f"{check.worker}-{len(os.listdir(scratch))}.json"
    me = [str(Path(__file__).resolve()), "--check", check.worker, "--device", device, *options]
    me += ["--out", str(out)]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={check.nproc}",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if same_gpu:
        timeout = min(timeout, 60.0)  # NCCL refuses at once, or the ranks hang: do not wait long
    try:
        proc = run([*torchrun, *me], timeout, env)
    except subprocess.TimeoutExpired:
        if same_gpu:
            _REFUSED_ON_ONE_GPU.append(f"2 ranks on 1 GPU did not finish in {timeout:.0f} s")
            return NEEDS_2_GPUS, _REFUSED_ON_ONE_GPU[0]
        return FAILED, f"timed out after {timeout:.0f} s"
    results = [json.loads(p.read_text()) for p in sorted(scratch.glob(f"{out.name}.*"))]
    if not results:
        return FAILED, f"exit {proc.returncode}: {last_line(proc.stderr or proc.stdout)}"
    failed = next((r for r in results if r["status"] == FAILED), None)
    result = failed or results[0]
    if result["status"] == FAILED and os.environ.get("GPU_CHECK_VERBOSE"):
        print(proc.stderr[-4000:], file=sys.stderr)
    if same_gpu and result["status"] == NEEDS_2_GPUS:
        _REFUSED_ON_ONE_GPU.append(result["figure"])
    return result["status"], result["figure"]


def print_table(rows: list[dict[str, str]]) -> None:
    width = max(len(r["check"]) for r in rows)
    status = max(len(r["result"]) for r in rows)
    print(f"{'check':<{width}} | {'result':<{status}} | figure")
    print(f"{'-' * width}-|-{'-' * status}-|-------")
    for r in rows:
        print(f"{r['check']:<{width}} | {r['result']:<{status}} | {r['figure']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        return run_check_worker(argv)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu", action="store_true", help="CPU/gloo mode even on a GPU machine")
    p.add_argument("--budget-s", type=float, default=540.0, help="the whole run's time limit (seconds)")
    p.add_argument("--json", type=Path, default=None, help="write the table and the settings here")
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated starts of check names to leave out (their rows say skipped)",
    )
    args = p.parse_args(argv)
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    names = [c.name for c in plan_checks(False, 0, Path())]
    for start in skip:
        if not any(name.startswith(start) for name in names):
            print(f"gpu_check: error: --skip={start!r}: starts no check's name ({'; '.join(names)})",
                  file=sys.stderr)  # fmt: skip
            return 2
    import torch

    started = time.perf_counter()
    cuda = not args.cpu and torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    where = f"{gpus} x {torch.cuda.get_device_name(0)}" if cuda else "CPU (gloo)"
    why = " (--cpu)" if args.cpu else "" if cuda else " (no GPU visible to torch)"
    print(f"gpu_check: {where}{why}, torch {torch.__version__}, budget {args.budget_s:.0f} s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        scratch = Path(tmp)
        for check in plan_checks(cuda, gpus, scratch):
            tick = time.perf_counter()
            left = args.budget_s - (tick - started)
            if any(check.name.startswith(start) for start in skip):
                status, figure = SKIPPED, "-"
            else:
                status, figure = run_check(check, cuda, gpus, scratch, left)
            seconds = time.perf_counter() - tick
            rows.append({"check": check.name, "result": status, "figure": figure, "seconds": seconds})
            print(f"  {check.name}: {status} ({seconds:.0f} s)", flush=True)
    total = time.perf_counter() - started
    print()
    print_table(rows)
    failed = [r for r in rows if r["result"] == FAILED]
    print(
        f"\ngpu_check: {len(rows) - len(failed)} of {len(rows)} checks not failing, {total:.0f} s on {where}"
    )
    if args.json:
        meta = {"device": where, "cuda": cuda, "gpus": gpus, "torch": torch.__version__}
        meta |= {"seconds": total, "load_average": os.getloadavg()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
