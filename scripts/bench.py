"""What disttrain costs in speed, measured side by side in one invocation on one machine.

    python scripts/bench.py              # CPU: MLP and GPT, fp32 and bf16, the token job, ~7 min on 2 cores
    python scripts/bench.py --quick      # every row in seconds, figures meaningless (the test runs it)
    python scripts/bench.py --device cuda --precision bf16 --model gpt --json out.json

Tables:
  loop       the plain loop a user writes without a framework against the disttrain Trainer, same model,
             data, optimizer, precision, thread count and steps; in one process and under 2-process DDP
             (torchrun). ratio = Trainer step time / hand-written step time (target <= 1.02). Rows: the
             seed's MLP and a small GPT, fp32 and bf16, and a padded token job (`lm`, scripts/bench_lm.py:
             dict batches of variable-length sequences, 4 micro-batches a step, each weighted by its tokens).
  overhead   the Trainer's own per-step cost: the same two loops on a model that computes almost nothing.
  dp-ddp     DataParallel (one process, the global batch) against DDP (one process per device).
  scaling    1 -> N processes: samples/s ratio, with a gradient-sized all-reduce timed on its own, and the
             DDP options (bucket_cap_mb, gradient_as_bucket_view, static_graph) tried.
  extras     what the Trainer does per step beyond the hand-written loop, each timed alone.
  startup    seconds from the command to the first finished step: `disttrain` against a bare script.
  snapshot   the cost of a snapshot against a bare torch.save (scripts/bench_snapshot.py).
  data       an epoch of the same token records, in the same order, through the Trainer's loader: sharded
             streams (JSONL, Parquet and tar shards, `data=shards`) against the same rows held in memory
             (map-style), with 0 and 2 loader workers; each epoch from a cold copy of the dataset, the
             median of --data-repeats interleaved repeats (ratio: the median over repeats of stream /
             map-style); a stream's first epoch (which decodes its shards into the token cache)
             against a map-style first epoch that reads the JSONL in first; and the private memory a
             token file (`data=token_file`) costs while random batches are read, for a small and a
             large file. `--only data` runs this table alone.

Fairness (decisions):
- The hand-written loop is the plain one for the precision at hand: zero_grad, forward, loss, backward,
  clip, step; fp32 with no autocast and no GradScaler at all, bf16 with autocast only, fp16 with autocast
  and a GradScaler. The token job's hand loop weights exactly as the Trainer does: each micro-batch's mean
  × its token count, summed, ÷ the window's tokens on all ranks (one all-reduce), forward and backward of
  all but the last micro-batch under no_sync.
- Each loop loads data as it would without the other: the hand-written one through torch's DataLoader
  (num_workers=0) over a `DistributedSampler`, as a user writes it; the Trainer through its own loader
  (`disttrain.data.make_loader`: on the CPU without workers, in-process batches without DataLoader's
  per-batch machinery). Same dataset, sampler order and batches, so the difference is what the Trainer
  costs or saves a step, its loading included.
- The same intra-op thread count in both (`--threads`, default 1: torchrun sets one per process when it
  starts several, so 1 keeps the 1-process and 2-process rows comparable core for core).
- The hand-written loop wraps DDP with the same options the Trainer's config gives it.
- Warm-up steps are not timed. Step time is the wall time of a window of `--steps` steps divided by their
  number, so every per-step cost counts (the Trainer's metrics.jsonl record, its host copy of loss and
  norm, its stop-flag all-reduce when world > 1); on CUDA the window starts and ends with
  torch.cuda.synchronize(). The metrics.jsonl lines are encoded and written once a second, so a window
  shorter than that (the tiny model's) holds none of that work: the extras table times it apart.
- Repeats are interleaved (A B A B, the order reversed every other repeat) so machine noise lands on
  both; a table shows the median over repeats and the spread (max - min) / median.
- The Trainer is timed from the inside of one `fit()` through a callback that only reads the clock at
  the end of each step (`on_step_end`: the public event a user's timer would use; the hand loop reads
  it at each step's start, the same period); its run dir is a fresh temporary directory, deleted
  afterwards.

GPU: `--device cuda` sizes the GPT like GPT-2 small (12 layers, width 768, block 1024, 85M parameters),
reports tokens/s and MFU = flops_per_sample × samples/s ÷ (peak × devices), the peak being the device's
dense tensor throughput from disttrain.metrics.PEAK_TFLOPS, the table the Trainer's own MFU uses (bf16/fp16
figure, e.g. H100 SXM and H200 989 TFLOP/s; the fp32 one for fp32 rows; `--peak-tflops` overrides). DDP
rows need 2 GPUs or more; on one GPU they are skipped and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Model sizes per device type. CPU: small enough for minutes on 2 cores; CUDA: GPT-2 small's shape.
MODELS = {
    # Almost no compute: its Trainer - hand step time is the Trainer's own per-step cost (overhead table).
    "tiny": {
        "cpu": {"vocab_size": 50, "context": 2, "embed_dim": 4, "hidden": 8, "batch": 4, "steps": 1000},
        "cuda": {"vocab_size": 50, "context": 2, "embed_dim": 4, "hidden": 8, "batch": 4, "steps": 1000},
    },
    "mlp": {
        "cpu": {"vocab_size": 10000, "context": 4, "embed_dim": 10, "hidden": 64, "batch": 32, "steps": 400},
        "cuda": {"vocab_size": 10000, "context": 4, "embed_dim": 10, "hidden": 64, "batch": 32, "steps": 400},
    },
    "gpt": {
        "cpu": {
            "vocab_size": 256,
            "block_size": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_embd": 128,
            "batch": 16,
            "steps": 40,
        },
        "cuda": {
            "vocab_size": 256,
            "block_size": 1024,
            "n_layer": 12,
            "n_head": 12,
            "n_embd": 768,
            "batch": 16,
            "steps": 50,
        },
    },
    # The padded token job (scripts/bench_lm.py): sequences of 4 to block_size real tokens as dict
    # batches, a window of `accumulate` micro-batches weighted by their token counts.
    "lm": {
        "cpu": {
            "vocab_size": 256,
            "block_size": 32,
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 32,
            "batch": 8,
            "accumulate": 4,
            "steps": 100,
        },
        "cuda": {
            "vocab_size": 256,
            "block_size": 512,
            "n_layer": 6,
            "n_head": 8,
            "n_embd": 512,
            "batch": 8,
            "accumulate": 4,
            "steps": 50,
        },
    },
}
#: DDP options tried in the scaling table (the Trainer's defaults first).
DDP_VARIANTS = {
    "default": {},
    "bucket_cap_mb=1": {"bucket_cap_mb": 1.0},
    "bucket_cap_mb=100": {"bucket_cap_mb": 100.0},
    "gradient_as_bucket_view=false": {"gradient_as_bucket_view": False},
    "static_graph=true": {"static_graph": True},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak from the table the Trainer's MFU uses (disttrain.metrics.PEAK_TFLOPS):
    the bf16/fp16 tensor-core figure, or the fp32 one for fp32 runs."""
    from disttrain.metrics import PEAK_TFLOPS

    row = next((r for r in PEAK_TFLOPS if r[0] in device_name), None)
    return None if row is None else row[2] if precision == "fp32" else row[1]


# ==== the worker: runs every case of one job (one process, or each rank under torchrun) =================
class Clock:
    """Called at the start of every step; reads the clocks at the start of step `warmup` and of step
    `warmup + steps` (the window), after torch.cuda.synchronize() on CUDA (the host runs ahead of the GPU).

    Two clocks: wall time, and this process's CPU time (all its threads). On a machine shared with other
    work, wall time grows with every process that preempts this one; CPU time counts only the work this
    process did, so the Trainer / hand-written ratio stays readable under load. CPU time does not count
    waiting (for a peer in an all-reduce, for the GPU), so only wall time answers "how fast"."""

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        self.calls = 0
        self.marks: list[tuple[float, float]] = []

    def tick(self) -> None:
        if self.calls in (self.warmup, self.warmup + self.steps):
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), time.process_time()))
        self.calls += 1

    def result(self) -> tuple[float, float]:
        """(wall seconds per step, CPU seconds per step) over the window."""
        if len(self.marks) != 2:
            raise RuntimeError(f"the run ended after {self.calls} steps, before the timed window closed")
        (wall0, cpu0), (wall1, cpu1) = self.marks
        return (wall1 - wall0) / self.steps, (cpu1 - cpu0) / self.steps


def steps_of(model_name: str, plan: dict[str, Any]) -> int:
    """Timed steps per repeat: --steps, else the model's own (a window of about a second on CPU: the
    MLP's 3 ms steps need ten times the GPT's count for the same resolution)."""
    return plan["steps"] or MODELS[model_name][plan["device_type"]]["steps"]


def accumulate_of(model_name: str, plan: dict[str, Any]) -> int:
    """Micro-batches per optimizer step: 1, except for the padded token job."""
    return MODELS[model_name][plan["device_type"]].get("accumulate", 1)


def build(model_name: str, plan: dict[str, Any], world: int) -> tuple[Any, Any, int]:
    """(model, dataset, batch) for a case; every case of a model starts from the same seed and data."""
    import torch
    from bench_lm import PaddedLM, PaddedTokens

    from disttrain.data import TokenCorpus
    from disttrain.models import CharGPT, MLPLanguageModel

    size = dict(MODELS[model_name][plan["device_type"]])
    batch, steps, k = size.pop("batch"), steps_of(model_name, plan), size.pop("accumulate", 1)
    size.pop("steps")
    # Enough samples that no case reaches the end of an epoch (the Trainer would validate and snapshot).
    samples = (plan["warmup"] + steps + 3) * batch * k * max(world, plan["nproc"])
    torch.manual_seed(0)
    if model_name == "lm":
        data = PaddedTokens(samples, size["block_size"], size["vocab_size"])
        return PaddedLM(**size), data, batch
    if model_name in ("mlp", "tiny"):
        data = TokenCorpus(size["vocab_size"], samples + size["context"], size["context"])
        return MLPLanguageModel(**size), data, batch
    data = TokenCorpus(size["vocab_size"], samples + size["block_size"], size["block_size"], sequence=True)
    return CharGPT(**size), data, batch


def optimizer_config(model_name: str) -> Any:
    from disttrain.config import OptimConfig

    # The experiments' optimizers: SGD with momentum for the seed MLP, AdamW for the GPTs.
    if model_name in ("mlp", "tiny"):
        return OptimConfig(name="sgd", lr=0.1, momentum=0.9)
    return OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1)


def hand_loop(case: dict[str, Any], plan: dict[str, Any], env: Any, clock: Clock) -> None:
    """The loop a user writes without a framework, for the precision at hand: zero_grad, forward, loss,
    backward, clip, step. fp32 has no autocast and no GradScaler at all, bf16 autocast only, fp16
    autocast and a GradScaler. Timed by `clock`."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from disttrain.config import StrategyConfig
    from disttrain.trainer import make_optimizer

    model, dataset, batch = build(case["model"], plan, env.world_size)
    model = model.to(env.device)
    if env.world_size > 1:
        s = StrategyConfig(**case.get("ddp", {}))
        model = DistributedDataParallel(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            bucket_cap_mb=s.bucket_cap_mb,
            gradient_as_bucket_view=s.gradient_as_bucket_view,
            static_graph=s.static_graph,
        )
    optimizer = make_optimizer(optimizer_config(case["model"]), model)
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=0)
    sampler.set_epoch(0)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, pin_memory=env.device.type == "cuda")
    device, precision = env.device, case["precision"]
    steps = plan["warmup"] + steps_of(case["model"], plan) + 1
    if case["model"] == "lm":  # fp32: the window of micro-batches weighted by their tokens
        from bench_lm import hand_step

        batches, k = iter(loader), accumulate_of("lm", plan)
        for _ in range(steps):
            window = [next(batches) for _ in range(k)]
            clock.tick()
            hand_step(model, optimizer, window, device)
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    for _, (x, y) in zip(range(steps), loader, strict=False):
        clock.tick()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        if precision == "fp32":
            loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        elif precision == "bf16":
            with torch.autocast(device.type, dtype=dtype):
                loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        else:  # fp16: the scaler keeps small gradients from underflowing
            with torch.autocast(device.type, dtype=dtype):
                loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip in real units
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()


def trainer_loop(case: dict[str, Any], plan: dict[str, Any], env: Any, clock: Clock, run_dir: Path) -> None:
    """The same job through `disttrain.trainer.Trainer.fit()`."""
    from disttrain.config import SnapshotConfig, StrategyConfig, TrainConfig, TrainerConfig
    from disttrain.trainer import Trainer, make_optimizer

    class Ticks:
        """The clock, read through the public events as training starts and at the end of every step
        (the hand loop reads it at the start of each: the same period between two reads)."""

        def on_fit_start(self, run: Any) -> None:
            clock.tick()

        def on_step_end(self, run: Any) -> None:
            clock.tick()

    dp = case["kind"] == "dp"
    model, dataset, batch = build(case["model"], plan, env.world_size)
    cfg = TrainConfig(
        name="bench",
        run_dir=str(run_dir),
        strategy=StrategyConfig(name="dp" if dp else "auto", **case.get("ddp", {})),
        trainer=TrainerConfig(
            max_epochs=1,
            max_steps=plan["warmup"] + steps_of(case["model"], plan) + 1,
            batch_size=batch * plan["nproc"] if dp else batch,
            accumulate=accumulate_of(case["model"], plan),
            precision=case["precision"],
            grad_clip_norm=1.0,
            seed=0,
            val_fraction=0.0,
            num_threads=case.get("threads", plan["threads"]),
            device=plan["device_type"],
        ),
        optim=optimizer_config(case["model"]),
        snapshot=SnapshotConfig(every_steps=0, keep_last=1),
        model={"_target_": f"bench:{case['model']}"},
        data={"_target_": "bench_lm:PaddedTokens" if case["model"] == "lm" else "bench:TokenCorpus"},
    )
    model = model.to(env.device)
    Trainer(model, make_optimizer(cfg.optim, model), dataset, cfg, env=env, callbacks=[Ticks()]).fit()


def run_case(case: dict[str, Any], plan: dict[str, Any], env: Any, run_dir: Path) -> tuple[float, float]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(case.get("threads", plan["threads"]))
    clock = Clock(plan["warmup"], steps_of(case["model"], plan), env.device.type == "cuda")
    if case["kind"] == "hand":
        hand_loop(case, plan, env, clock)
    else:
        trainer_loop(case, plan, env, clock, run_dir)
    if env.world_size > 1:
        dist.barrier()  # rank 0 deletes the run dir only when every rank is done with it
    if env.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    if env.device.type == "cuda":
        gc.collect()  # the next case's model and optimizer state must not share the GPU with this one's
        torch.cuda.empty_cache()
    return clock.result()


def time_allreduce(numel: int, env: Any, repeats: int = 20) -> float:
    """Median seconds of one all-reduce of `numel` fp32 values (DDP all-reduces gradients in the
    parameters' dtype, fp32, also under autocast)."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(numel, device=env.device)
    times = []
    for i in range(repeats + 3):
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        dist.all_reduce(buf)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - tick)
    return statistics.median(times)


def time_extras(env: Any, scratch: Path, n: int = 2000) -> dict[str, float]:
    """Seconds per call of each per-step cost the Trainer adds to the hand-written loop."""
    import torch
    import torch.distributed as dist

    from disttrain.metrics import MetricsLog

    out: dict[str, float] = {}
    log = MetricsLog(scratch / "extras.jsonl", enabled=True)
    log.open(resume_step=0)
    record = {
        "step": 1,
        "epoch": 0,
        "loss": 2.345678,
        "lr": 0.1,
        "grad_norm": 0.98765,
        "skipped": False,
        "samples_per_s": 12345.678,
        "step_time_s": 0.0123,
        "data_time_s": 0.0001,
    }
    tick = time.perf_counter()
    for _ in range(n):
        log.write(record)
    log.flush()  # lines are encoded and written in batches: count that too
    out["metrics.jsonl line"] = (time.perf_counter() - tick) / n
    log.close()
    a, b = torch.ones((), device=env.device), torch.ones((), device=env.device)
    tick = time.perf_counter()
    for _ in range(n):  # as the Trainer's step: read on the CPU, one float64 transfer on CUDA
        if env.device.type == "cpu":
            a.item(), b.item()
        else:
            torch.stack([a.to(torch.float64), b.to(torch.float64)]).tolist()
    out["loss and norm to the host"] = (time.perf_counter() - tick) / n
    out["a do-nothing callback (3 per-step events)"] = time_idle_callback(n)
    if env.world_size > 1:
        flag = torch.zeros(1, device=env.device)
        dist.barrier()
        tick = time.perf_counter()
        for _ in range(n // 10):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            int(flag.item())
        out["stop-flag all_reduce"] = (time.perf_counter() - tick) / (n // 10)
    return out


def time_idle_callback(n: int, many: int = 10) -> float:
    """Seconds a step that one registered callback doing nothing adds: `many` of them, each with the
    events a step fires (before the optimizer step, its end, and rank 0's metrics line), fired as the
    Trainer fires them, against none; divided by `many`."""
    from disttrain.callbacks import Callbacks

    class Idle:
        def on_before_optimizer_step(self, run: Any) -> None: ...
        def on_step_end(self, run: Any) -> None: ...
        def on_log(self, run: Any, record: dict[str, Any]) -> None: ...

    record: dict[str, Any] = {"step": 1}
    took = []
    for count in (0, many):
        callbacks = Callbacks([Idle() for _ in range(count)])
        before, end, line = (
            callbacks.handlers[e] for e in ("on_before_optimizer_step", "on_step_end", "on_log")
        )
        tick = time.perf_counter()
        for _ in range(n):
            if before:
                callbacks.fire("on_before_optimizer_step", None)
            if end:
                callbacks.fire("on_step_end", None)
            if line:
                callbacks.fire("on_log", None, record)
        took.append((time.perf_counter() - tick) / n)
    return (took[1] - took[0]) / many


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def worker(plan_path: Path, out_path: Path) -> None:
    import torch

    from disttrain.dist import distributed

    plan = json.loads(plan_path.read_text())
    with distributed(plan["device_type"]) as env:
        cases = [c for c in plan["cases"] if c["world"] == env.world_size]
        scratch = Path(plan["scratch"]) / f"world{env.world_size}"
        scratch.mkdir(parents=True, exist_ok=True)
        seconds: dict[str, list[tuple[float, float]]] = {c["name"]: [] for c in cases}
        for r in range(plan["repeats"]):
            for case in cases if r % 2 == 0 else reversed(cases):
                # A fresh run dir per run: a run dir with a snapshot would resume.
                run_dir = scratch / f"run{case['index']}-{r}"
                seconds[case["name"]].append(run_case(case, plan, env, run_dir))
        result: dict[str, Any] = {"seconds": seconds, "params": {}, "flops_per_sample": {}, "allreduce_s": {}}
        for name in plan["models"]:
            model, _, _ = build(name, plan, env.world_size)
            result["params"][name] = sum(p.numel() for p in model.parameters())
            fps = getattr(model, "flops_per_sample", None)
            result["flops_per_sample"][name] = fps() if callable(fps) else None
            if env.world_size > 1:
                result["allreduce_s"][name] = time_allreduce(result["params"][name], env)
        result["extras"] = time_extras(env, scratch)
        result["device_name"] = (
            torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else cpu_name()
        )
        if env.is_main:
            out_path.write_text(json.dumps(result))


# ==== the driver: plans the cases, starts the workers, times startup, prints and saves the tables ====
def make_plan(args: argparse.Namespace, nproc: int, scratch: Path) -> dict[str, Any]:
    cases: list[dict[str, Any]] = []

    def add(world: int, model: str, precision: str, kind: str, **extra: Any) -> None:
        label = extra.pop("label", kind)
        name = f"{model}/{precision}/{'single' if world == 1 else f'ddp{world}'}/{label}"
        cases.append(
            {"name": name, "world": world, "model": model, "precision": precision, "kind": kind, **extra}
        )

    for model in args.model:
        for precision in args.precision:
            add(1, model, precision, "hand")
            add(1, model, precision, "trainer")
            if precision == args.precision[0]:
                # DataParallel: one process with the DDP job's global batch and the same threads per
                # process (on CPU, DP is that: the module on the whole batch; more intra-op threads
                # measured OpenMP oversubscription on a shared machine, not DP).
                add(1, model, precision, "dp")
            if nproc > 1:
                add(nproc, model, precision, "hand")
                add(nproc, model, precision, "trainer")
    # The padded token job, fp32: hand-written exact weighting against the Trainer's counted items.
    for world in (1, nproc) if nproc > 1 else (1,):
        add(world, "lm", "fp32", "hand")
        add(world, "lm", "fp32", "trainer")
    if nproc > 1:
        for label, options in DDP_VARIANTS.items():
            if label != "default":
                add(nproc, args.model[0], args.precision[0], "trainer", ddp=options, label=label)
    # In one process: under DDP the two processes wait for each other, and the Trainer's extra host work
    # hides in those waits (its tiny-model step measured 0.15 ms *faster* than the hand loop's).
    add(1, "tiny", "fp32", "hand")
    add(1, "tiny", "fp32", "trainer")
    for i, case in enumerate(cases):
        case["index"] = i
    return {
        "device_type": args.device,
        "models": args.model,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "nproc": nproc,
        "scratch": str(scratch),
        "cases": cases,
    }


def run_workers(plan: dict[str, Any], scratch: Path) -> dict[int, dict[str, Any]]:
    plan_path = scratch / "plan.json"
    plan_path.write_text(json.dumps(plan))
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(plan["threads"]), PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    worlds = sorted({c["world"] for c in plan["cases"]})
    for world in worlds:
        out = scratch / f"result{world}.json"
        me = [str(Path(__file__).resolve()), "--worker", str(plan_path), str(out)]
        if world == 1:
            cmd = [sys.executable, *me]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={world}",
                *me,
            ]
        print(
            f"running {sum(c['world'] == world for c in plan['cases'])} cases in {world} process(es)...",
            flush=True,
        )
        tick = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        print(f"  {time.perf_counter() - tick:.0f} s", flush=True)
        if proc.returncode != 0:
            sys.exit(
                f"bench: the {world}-process worker failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        results[world] = json.loads(out.read_text())
    return results


BARE_SCRIPT = """
import json, os, sys, time
import torch, torch.distributed as dist, torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from disttrain.data import TokenCorpus
from disttrain.models import MLPLanguageModel

world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
if world > 1:
    dist.init_process_group("gloo")
torch.set_num_threads(1)
torch.manual_seed(0)
data = TokenCorpus(vocab_size=1000, num_tokens=20000, context=4)
model = MLPLanguageModel(vocab_size=1000, context=4)
if world > 1:
    model = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
log = open(os.path.join(sys.argv[1], "metrics.jsonl"), "a", buffering=1) if rank == 0 else None
for step, (x, y) in zip(range(3), DataLoader(data, batch_size=64, sampler=sampler)):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if log:
        log.write(json.dumps({"step": step + 1, "loss": loss.item()}) + "\\n")
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
"""


def time_to_first_step(cmd: list[str], run_dir: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds from starting `cmd` to the first line of run_dir/metrics.jsonl, seconds to its exit)."""
    metrics = run_dir / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first = None
    while proc.poll() is None:
        if first is None and metrics.exists() and metrics.stat().st_size > 0:
            first = time.perf_counter() - start
        time.sleep(0.005)
    total = time.perf_counter() - start
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({proc.returncode}):\n{output}")
    if first is None:  # the run ended between two polls
        first = total
    return first, total


def measure_startup(args: argparse.Namespace, nproc: int, scratch: Path) -> list[dict[str, Any]]:
    """`disttrain` against a bare script, 1 process and (on CPU) `nproc` under torchrun, same small job."""
    bare = scratch / "bare_train.py"
    bare.write_text(BARE_SCRIPT)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    job = ["data.vocab_size=1000", "data.num_tokens=20000", "trainer.batch_size=64", "trainer.max_steps=3"]
    job += ["trainer.val_fraction=0", "trainer.num_threads=1", "trainer.device=cpu"]
    worlds = [1] + ([nproc] if nproc > 1 and args.device == "cpu" else [])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    commands = {}
    for world in worlds:
        launcher = [] if world == 1 else ["launcher=torchrun", f"launcher.nproc_per_node={world}"]
        runner = [sys.executable] if world == 1 else [*torchrun, f"--nproc-per-node={world}"]
        commands[(world, "disttrain")] = lambda d, ln=launcher: [
            sys.executable,
            "-m",
            "disttrain",
            *job,
            *ln,
            f"run_dir={d}",
        ]
        commands[(world, "bare")] = lambda d, r=runner: [*r, str(bare), str(d)]
    seconds: dict[tuple[int, str], list[tuple[float, float]]] = {key: [] for key in commands}
    keys = list(commands)
    for r in range(args.startup_repeats):
        for key in keys if r % 2 == 0 else reversed(keys):
            run_dir = scratch / f"startup{len(os.listdir(scratch))}"
            run_dir.mkdir()
            seconds[key].append(time_to_first_step(commands[key](run_dir), run_dir, env))
    rows = []
    for world in worlds:
        d_first = statistics.median(s[0] for s in seconds[(world, "disttrain")])
        b_first = statistics.median(s[0] for s in seconds[(world, "bare")])
        for who in ("disttrain", "bare"):
            firsts = [s[0] for s in seconds[(world, who)]]
            rows.append(
                {
                    "table": "startup",
                    "label": f"{'python' if world == 1 else f'torchrun x{world}'} / {who}",
                    "first_step_s": statistics.median(firsts),
                    "spread": spread(firsts),
                    "exit_s": statistics.median(s[1] for s in seconds[(world, who)]),
                    "ratio": d_first / b_first if who == "disttrain" else None,
                }
            )
    return rows


def spread(values: list[float]) -> float:
    """(max - min) / median: 0.03 means the repeats lay within 3% of each other."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


def loop_rows(
    plan: dict[str, Any], results: dict[int, dict[str, Any]], peak_override: float | None
) -> list[dict[str, Any]]:
    """One row per case: step time, samples/s (tokens/s and MFU for the GPT), ratio against its pair."""
    rows = []
    by_name = {c["name"]: c for c in plan["cases"]}
    for world, result in sorted(results.items()):
        for name, timings in result["seconds"].items():
            case = by_name[name]
            model, batch = case["model"], MODELS[case["model"]][plan["device_type"]]["batch"]
            secs = [wall for wall, _ in timings]
            per_step = statistics.median(secs)
            samples = batch * accumulate_of(model, plan) * (plan["nproc"] if case["kind"] == "dp" else world)
            row = {
                "table": "tiny"
                if model == "tiny"
                else "loop"
                if case["kind"] in ("hand", "trainer") and "ddp" not in case
                else "other",
                "name": name,
                "model": model,
                "precision": case["precision"],
                "processes": world,
                "kind": case["kind"],
                "step_ms": per_step * 1e3,
                "cpu_ms": statistics.median(cpu for _, cpu in timings) * 1e3,
                "spread": spread(secs),
                "samples_per_s": samples / per_step,
                "repeats_ms": [s * 1e3 for s in secs],
                "repeats_cpu_ms": [cpu * 1e3 for _, cpu in timings],
            }
            if model == "gpt":
                row["tokens_per_s"] = row["samples_per_s"] * MODELS["gpt"][plan["device_type"]]["block_size"]
                fps = result["flops_per_sample"][model]
                devices = world if case["kind"] != "dp" else plan["nproc"]
                peak = peak_override or peak_tflops(result["device_name"], case["precision"])
                if peak and fps and plan["device_type"] == "cuda":
                    row["mfu"] = fps * row["samples_per_s"] / (peak * 1e12 * devices)
            rows.append(row)
    return rows


def paired(a: dict[str, Any], b: dict[str, Any], key: str, f: Callable[[float, float], float]) -> list[float]:
    return [f(x, y) for x, y in zip(a[key], b[key], strict=True)]


def find(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("name") == name), None)


def derived_rows(
    plan: dict[str, Any], results: dict[int, dict[str, Any]], case_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Ratios: Trainer / hand-written, DDP / DP, N processes / 1, DDP options / default."""
    n = plan["nproc"]
    rows = []
    # Repeats ran interleaved (A B, B A, ...): a Trainer repeat and the hand repeat beside it shared the
    # machine's state, so the median of the pairs' ratios (differences) is robust to slow drifts.
    overhead_ms = None
    hand, trainer = find(case_rows, "tiny/fp32/single/hand"), find(case_rows, "tiny/fp32/single/trainer")
    if hand and trainer:
        # Other processes' work only adds time, and to a 0.4 ms step proportionally much (repeats of the
        # same loop measured 0.41-0.68 ms under load): the fastest repeat of each is nearest its own cost.
        overhead_ms = min(trainer["repeats_ms"]) - min(hand["repeats_ms"])
        label = "Trainer - hand, tiny model, 1 process"
        rows.append({"table": "overhead", "label": label, "us": overhead_ms * 1e3})
    for r in case_rows:
        if r["kind"] == "trainer" and r["table"] == "loop":
            hand = find(case_rows, r["name"].replace("/trainer", "/hand"))
            if hand is None:
                continue
            r["ratio"] = statistics.median(paired(r, hand, "repeats_ms", lambda t, h: t / h))
            r["cpu_ratio"] = statistics.median(paired(r, hand, "repeats_cpu_ms", lambda t, h: t / h))
            if overhead_ms is not None:
                # What the Trainer's own host work adds to this model's step, free of the noise that
                # moves a whole step by several percent on a shared machine (under DDP the Trainer
                # also all-reduces a stop flag, once a second: the extras table).
                r["overhead_ratio"] = 1 + overhead_ms / hand["step_ms"]
    for model in plan["models"]:
        for precision in dict.fromkeys(c["precision"] for c in plan["cases"]):
            dp = find(case_rows, f"{model}/{precision}/single/dp")
            single = find(case_rows, f"{model}/{precision}/single/trainer")
            ddp = find(case_rows, f"{model}/{precision}/ddp{n}/trainer")
            if dp:
                other = ddp or single
                rows.append(
                    {
                        "table": "dp-ddp",
                        "label": f"{model} {precision}: {f'DDP x{n}' if ddp else 'single'} / DP x{n}",
                        "dp_samples_per_s": dp["samples_per_s"],
                        "ddp_samples_per_s": other["samples_per_s"],
                        "ratio": other["samples_per_s"] / dp["samples_per_s"],
                    }
                )
            if ddp and single:
                allreduce = results[n]["allreduce_s"].get(model)
                rows.append(
                    {
                        "table": "scaling",
                        "label": f"{model} {precision}: 1 -> {n} processes",
                        "single_samples_per_s": single["samples_per_s"],
                        "ddp_samples_per_s": ddp["samples_per_s"],
                        "ratio": ddp["samples_per_s"] / single["samples_per_s"],
                        "single_step_ms": single["step_ms"],
                        "ddp_step_ms": ddp["step_ms"],
                        "allreduce_ms": allreduce * 1e3 if allreduce else None,
                        "params": results[n]["params"][model],
                    }
                )
    if n > 1:
        base = find(case_rows, f"{plan['models'][0]}/{plan['cases'][0]['precision']}/ddp{n}/trainer")
        for label in DDP_VARIANTS:
            r = (
                base
                if label == "default"
                else find(case_rows, f"{base['name']}".replace("/trainer", f"/{label}"))
            )
            rows.append(
                {
                    "table": "ddp-options",
                    "label": f"{plan['models'][0]} {label}",
                    "step_ms": r["step_ms"],
                    "spread": r["spread"],
                    "samples_per_s": r["samples_per_s"],
                    "ratio": r["step_ms"] / base["step_ms"],
                }
            )
    for world, result in sorted(results.items()):
        trainer_ms = min(
            r["step_ms"]
            for r in case_rows
            if r["kind"] == "trainer" and r["processes"] == world and r["model"] != "tiny"
        )
        for what, seconds in result["extras"].items():
            rows.append(
                {
                    "table": "extras",
                    "label": f"{what} ({world} process{'es' if world > 1 else ''})",
                    "us": seconds * 1e6,
                    "share_of_step": seconds * 1e3 / trainer_ms,
                }
            )
    return rows


def snapshot_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The snapshot-cost rows of scripts/bench_snapshot.py, one per state size."""
    from bench_snapshot import SIZES_MB, measure_snapshot_cost

    sizes, repeats = (SIZES_MB[:1], 3) if args.quick else (SIZES_MB, 21)
    return [
        {"table": "snapshot", "label": f"snapshot vs bare torch.save, {size} MB", **result}
        for size in sizes
        for result in [measure_snapshot_cost(size, repeats)]
    ]


class _Rows:
    """The map-style side of the data table: the shards' token rows, held in memory as uint16 (as a token
    file and nanoGPT's loader hold ids below 65,536) and each batch cast to int64, in the shards' own
    order (`epoch_order`), so both sides read the same samples in the same sequence."""

    def __init__(self, rows: Any, order_of: Any) -> None:
        self.rows, self.epoch_order = rows.astype("uint16"), order_of.epoch_order

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        import numpy as np
        import torch

        rows = torch.from_numpy(self.rows[np.asarray(indices)].astype(np.int64))  # one gather
        return list(zip(rows[:, :-1], rows[:, 1:], strict=True))


def _anon_kib() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["RssAnon"].split()[0])


def _write_data_shards(scratch: Path, rows: Any, shards: int) -> None:
    """The same records as JSONL, Parquet and webdataset tar shards (`KEY.tokens.npy` members)."""
    import io
    import tarfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    per_shard = len(rows) // shards
    for s in range(shards):
        part = rows[s * per_shard : (s + 1) * per_shard]
        with open(scratch / f"part{s}.jsonl", "w") as f:
            f.writelines(json.dumps({"tokens": r}) + "\n" for r in part.tolist())
        pq.write_table(pa.table({"tokens": part.tolist()}), scratch / f"part{s}.parquet")
        with tarfile.open(scratch / f"part{s}.tar", "w") as tar:
            for k, r in enumerate(part):
                buffer = io.BytesIO()
                np.save(buffer, r.astype(np.uint16))
                member = tarfile.TarInfo(f"{s * per_shard + k:08d}.tokens.npy")
                member.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(member, buffer)


def _epoch_rate(data: Any, workers: int) -> float:
    """Samples/s of one epoch of `data` through the Trainer's loader (batches of 64), from a cold copy:
    its shards opened anew, as each epoch's loader workers open them (persistent_workers=False)."""
    import pickle

    from disttrain.data import EpochSampler, make_loader

    data = pickle.loads(pickle.dumps(data))
    sampler = EpochSampler(data, 1, 0, shuffle=True, seed=0)
    loader = make_loader(data, sampler, 64, workers, False)
    tick = time.perf_counter()
    n = sum(len(batch[0]) for batch in loader)
    return n / (time.perf_counter() - tick)


def _loaded_rate(scratch: Path, rows_like: Any, workers: int) -> float:
    """Samples/s of a map-style first epoch that begins by reading the JSONL shards into memory (each
    line parsed with the json module, as a map-style dataset's constructor would), the reading timed."""
    import numpy as np

    tick = time.perf_counter()
    tokens = [json.loads(line)["tokens"] for p in sorted(scratch.glob("*.jsonl")) for line in p.open()]
    data = _Rows(np.asarray(tokens), rows_like)
    reading = time.perf_counter() - tick
    return len(data) / (reading + len(data) / _epoch_rate(data, workers))


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    """a[r] / b[r] for each repeat r."""
    return [x / y for x, y in zip(a, b, strict=True)]


def data_rows(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    """The data table: samples/s of a sharded stream against map-style over the same records in the same
    order (0 and 2 loader workers): the median of interleaved repeats (each repeat times every dataset
    once, in a rotated order), ratio = the median over repeats of the stream's / map-style's; and a
    token file's private memory growth, small file against large."""
    import numpy as np
    import torch

    from disttrain.data import TokenFile
    from disttrain.shards import Shards

    shards, per_shard, context = (3, 400, 32) if args.quick else (8, 4000, 128)
    rows = np.random.default_rng(0).integers(0, 50_000, (shards * per_shard, context + 1))
    _write_data_shards(scratch, rows, shards)
    index = str(scratch / "index")
    streams = {
        f"shards, {fmt}": Shards(f"{scratch}/*.{ext}", context, 50_000, index_dir=index)
        for fmt, ext in (("JSONL", "jsonl"), ("Parquet", "parquet"), ("tar", "tar"))
    }
    map_style = "map-style (rows in memory)"
    loaded = "map-style, first epoch (reads the JSONL in)"
    datasets = {map_style: _Rows(rows, streams["shards, Parquet"]), **streams}
    repeats = 1 if args.quick else args.data_repeats
    out: list[dict[str, Any]] = []
    for workers in (0, 2):
        rates: dict[str, list[float]] = {}
        labels = list(datasets)
        for r in range(repeats):
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                if label == map_style:  # its first epoch: the records parsed into memory, then read
                    rates.setdefault(loaded, []).append(_loaded_rate(scratch, datasets[label], workers))
                else:  # the first epoch decodes each shard into the token cache
                    for cache in Path(index).glob("*.tokens.npy"):
                        cache.unlink()
                    first = _epoch_rate(datasets[label], workers)
                    rates.setdefault(f"{label}, first epoch", []).append(first)
                rates.setdefault(label, []).append(_epoch_rate(datasets[label], workers))
        for label, measured in rates.items():
            row = {
                "table": "data", "label": f"{label}, {workers} workers",
                "samples_per_s": statistics.median(measured), "spread": spread(measured), "repeats": repeats,
            }  # fmt: skip
            if label not in (map_style, loaded):  # paired within a repeat: a passing load hits both alike
                against = rates[loaded if "first epoch" in label else map_style]
                row["ratio"] = statistics.median(paired_ratios(measured, against))
            out.append(row)
    g = torch.Generator().manual_seed(0)
    for name, size in (
        ("1 MiB", 2**20),
        ("64 MiB" if args.quick else "16 GiB", 2**26 if args.quick else 2**34),
    ):
        path = scratch / f"tokens-{size}.bin"
        with open(path, "wb") as f:  # sparse: zeros the file system does not store
            f.truncate(size)
        data = TokenFile(str(path), context=256, vocab_size=256)
        before = _anon_kib()
        for _ in range(20 if args.quick else 200):
            data.__getitems__(torch.randint(len(data), (16,), generator=g).tolist())
        out.append(
            {"table": "data", "label": f"token file of {name}: private memory", "kib": _anon_kib() - before}
        )
    return out


# ---- printing ------------------------------------------------------------------------------------
def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(rows: list[dict[str, Any]], notes: list[str], cuda: bool) -> None:
    loop = [r for r in rows if r["table"] == "loop"]
    if loop:
        print(
            "\n## loop: hand-written PyTorch loop vs disttrain Trainer (step ms: window wall time / steps,"
            " median over repeats; ratio = median of Trainer / hand over interleaved pairs of repeats;"
            " overhead = 1 + the Trainer's own per-step cost (overhead table) / hand step"
            + ("" if cuda else "; cpu ms: the process's CPU time per step, blind to other processes' load)")
            + (")" if cuda else "")
        )
        head = f"{'row':<30} {'step ms':>9} {'spread':>7} {'samples/s':>10}"
        head += f" {'tokens/s':>11} {'MFU':>6}" if cuda else f" {'cpu ms':>9}"
        print(head + f" {'ratio':>6}" + ("" if cuda else f" {'cpu ratio':>9}") + f" {'overhead':>8}")
        for r in loop:
            line = f"{r['name']:<30} {r['step_ms']:>9.3f} {r['spread']:>6.1%} {r['samples_per_s']:>10,.0f}"
            if cuda:
                line += f" {fmt(r.get('tokens_per_s'), '>11,.0f')} {fmt(r.get('mfu'), '>6.1%')}"
            else:
                line += f" {r['cpu_ms']:>9.3f}"
            line += f" {fmt(r.get('ratio'), '>6.3f')}"
            line += "" if cuda else f" {fmt(r.get('cpu_ratio'), '>9.3f')}"
            print(line + f" {fmt(r.get('overhead_ratio'), '>8.4f')}")
    for r in [r for r in rows if r["table"] == "other" and r["kind"] == "dp"]:
        extra = f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""
        print(f"  ({r['name']}: {r['step_ms']:.3f} ms/step, spread {r['spread']:.1%}{extra})")
    sections = {
        "overhead": (
            "the Trainer's own per-step cost: Trainer - hand step time on a model that computes almost"
            " nothing (fastest repeat of each)",
            lambda r: f"{r['us']:>8.1f} us",
        ),
        "dp-ddp": (
            "DDP vs DataParallel, same global batch (ratio = DDP samples/s / DP samples/s)",
            lambda r: f"DP {r['dp_samples_per_s']:>10,.0f}/s  DDP {r['ddp_samples_per_s']:>10,.0f}/s",
        ),
        "scaling": (
            "scaling, same batch per process (ratio = samples/s of N processes / 1)",
            lambda r: (
                f"{r['single_samples_per_s']:>9,.0f} -> {r['ddp_samples_per_s']:>9,.0f}/s"
                f"  step {r['single_step_ms']:.2f} -> {r['ddp_step_ms']:.2f} ms"
                f"  all-reduce {fmt(r['allreduce_ms'], '.2f')} ms ({r['params'] / 1e6:.2f}M fp32)"
            ),
        ),
        "ddp-options": (
            "DDP options, Trainer (ratio = step time / default's)",
            lambda r: f"{r['step_ms']:>8.3f} ms  spread {r['spread']:>5.1%}  {r['samples_per_s']:>9,.0f}/s",
        ),
        "extras": (
            "Trainer per-step extras, each timed alone (share = of the fastest Trainer step, same world)",
            lambda r: f"{r['us']:>8.1f} us  {r['share_of_step']:>6.2%}",
        ),
        "startup": (
            "startup: command to first finished step (ratio = disttrain / bare)",
            lambda r: (
                f"first step {r['first_step_s']:>6.2f} s  spread {r['spread']:>5.1%}"
                f"  exit {r['exit_s']:>6.2f} s"
            ),
        ),
        "data": (
            "data loading: samples/s of an epoch, the same records in the same order (median of"
            " interleaved repeats; ratio = median over repeats of stream / map-style), token file memory"
            " growth",
            lambda r: (
                f"{r['samples_per_s']:>10,.0f}/s  spread {r['spread']:>5.1%}"
                if "samples_per_s" in r
                else f"{r['kib']:>8,} KiB"
            ),
        ),
        "snapshot": (
            "snapshot cost (scripts/bench_snapshot.py)",
            lambda r: (
                f"{r['bytes'] / 1e6:.2f} MB: torch.save {r['bare_torch_save_s'] * 1e3:.2f} ms,"
                f" snapshot {r['snapshot_s'] * 1e3:.2f} ms"
            ),
        ),
    }
    for table, (title, body) in sections.items():
        chosen = [r for r in rows if r["table"] == table]
        if not chosen:
            continue
        print(f"\n## {table}: {title}")
        for r in chosen:
            ratio = f"  ratio {r['ratio']:.3f}" if r.get("ratio") is not None else ""
            print(f"{r['label']:<44} {body(r)}{ratio}")
    for note in notes:
        print(f"note: {note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16", "fp16"),
        help="default: fp32 bf16 (cpu), bf16 (cuda)",
    )
    p.add_argument(
        "--model", nargs="+", choices=tuple(MODELS), default=None, help="default: mlp gpt (cpu), gpt (cuda)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat (default: the model's, see MODELS)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per case (default 5)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process, same for both loops")
    p.add_argument(
        "--nproc", type=int, default=None, help="DDP processes (default 2 on cpu, all GPUs on cuda)"
    )
    p.add_argument("--startup-repeats", type=int, default=None, help="default 2 (1 with --quick)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    p.add_argument(
        "--quick", action="store_true", help="tiny settings: every row in seconds, figures meaningless"
    )
    p.add_argument("--only", choices=("data",), default=None, help="run this table alone")
    p.add_argument("--data-repeats", type=int, default=7, help="interleaved repeats of the data table")
    p.add_argument("--json", type=Path, default=None, help="write every row and the settings here")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.precision = args.precision or (["bf16"] if cuda else ["fp32", "bf16"])
    args.model = args.model or (["gpt"] if cuda else ["mlp", "gpt"])
    quick = args.quick
    args.steps = args.steps or (3 if quick else None)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 5 if not cuda else 10)
    args.repeats = args.repeats or (1 if quick else 5)
    args.startup_repeats = args.startup_repeats or (1 if quick else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(Path(argv[1]), Path(argv[2]))
        return 0
    args = parse_args(argv)
    import torch

    notes = []
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench: --device cuda but torch sees no GPU")
        gpus = torch.cuda.device_count()
        nproc = args.nproc or gpus
        if nproc < 2:
            notes.append(
                f"{gpus} GPU: DDP rows skipped (DDP needs 2 GPUs or more); DP runs the module on 1 GPU"
            )
        nproc = min(nproc, gpus)
    else:
        nproc = args.nproc or 2
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    if args.only == "data":
        return data_only(args, argv, load_before)
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as tmp:
        scratch = Path(tmp)
        plan = make_plan(args, nproc, scratch)
        results = run_workers(plan, scratch)
        device_name = results[1]["device_name"]
        peak = args.peak_tflops or (peak_tflops(device_name, "bf16") if args.device == "cuda" else None)
        if args.device == "cuda":
            notes.append(
                f"MFU against the dense peak of {device_name!r}: {fmt(peak, '.0f')} TFLOP/s bf16/fp16"
                f" ({fmt(peak_tflops(device_name, 'fp32'), '.1f')} fp32, for fp32 rows)"
                if peak
                else f"no peak known for {device_name!r}: pass --peak-tflops for MFU"
            )
        rows = loop_rows(plan, results, args.peak_tflops)
        rows += derived_rows(plan, results, rows)
        startup_dir = scratch / "startup"
        startup_dir.mkdir()
        rows += measure_startup(args, nproc, startup_dir)
        rows += snapshot_rows(args)
        data_dir = scratch / "data"
        data_dir.mkdir()
        rows += data_rows(args, data_dir)
    load_after = os.getloadavg()[0]
    notes.append(
        f"load average {load_before:.1f} at the start, {load_after:.1f} at the end, on {os.cpu_count()} cores"
        " (other processes' work shows up as spread and in wall times, not in cpu ms)"
    )
    steps = ", ".join(f"{m} {steps_of(m, plan)}" for m in [*args.model, "lm"])
    notes.append(
        f"{args.threads} intra-op thread(s) per process (DP too); warm-up {args.warmup},"
        f" {steps} timed steps, {args.repeats} interleaved repeats; loaders: torch's DataLoader (hand),"
        " the Trainer's own"
    )
    print_tables(rows, notes, args.device == "cuda")
    meta = {
        "command": " ".join(["python", "scripts/bench.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "nproc": nproc,
        "peak_tflops": peak,
        "load_average": [load_before, load_after],
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "seconds": time.perf_counter() - started,
    }
    print(f"\nbench took {meta['seconds']:.0f} s: {meta['command']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "notes": notes}, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


def data_only(args: argparse.Namespace, argv: list[str], load_before: float) -> int:
    """`--only data`: the data table alone, with the load average around it."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as tmp:
        rows = data_rows(args, Path(tmp))
    notes = [
        f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
        f"{os.cpu_count()} cores; median of {1 if args.quick else args.data_repeats} interleaved repeats"
    ]
    print_tables(rows, notes, False)
    print(f"\nbench took {time.perf_counter() - started:.0f} s: python scripts/bench.py {' '.join(argv)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "notes": notes}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
