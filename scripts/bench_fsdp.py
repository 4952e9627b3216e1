"""FSDP against DDP through the disttrain Trainer: memory per rank, step time, snapshot cost, compile,
and on 4 processes the state per rank, the model's build, and activation checkpointing.

    python scripts/bench_fsdp.py                  # CPU: 2 processes (gloo), then 4; ~5 min on 2 cores
    python scripts/bench_fsdp.py --quick          # every row in seconds, figures meaningless (the test)
    python scripts/bench_fsdp.py --device cuda --json fsdp.json   # 2+ GPUs (nccl); on 1 GPU: compile only
    python scripts/bench_fsdp.py --only scale,checkpointing       # some tables only

Tables:
  memory    per-rank bytes of parameters, gradients and AdamW state under DDP and FSDP on 2 processes,
            from the tensors' sizes (numel × element_size; a DTensor by its local shard, `to_local()`);
            gradients are counted after backward, before the optimizer step (when they exist: the
            Trainer sets them to None after each step), parameters and optimizer state after the run.
            On CUDA also `torch.cuda.max_memory_allocated` over each step (activations and FSDP's
            gathered parameters included). `FSDP / DDP` is the ratio of the per-rank totals (ideal 1/2).
  step      step time of the same GPT, data, global batch and optimizer under DDP and FSDP: the
            Trainer timed from inside one fit() (the clock read at each step's end by a callback, a window
            of --steps steps after --warmup untimed ones), median of interleaved repeats (A B, B A, ...);
            ratio = median of FSDP / DDP over the pairs of repeats that ran side by side.
  snapshot  what a snapshot costs the training loop (a callback's `on_before_snapshot` to its
            `on_snapshot`, on every rank, the slowest rank counted): FSDP's sharded one (every rank
            writes its shards through DCP) and DDP's (rank 0 serialises the full state), against a bare
            `torch.save` of the full state on rank 0 (under FSDP after gathering it:
            `get_*_state_dict(full_state_dict=True)`, timed apart); `committed` adds rank 0's background
            hashing, fsync and rename (`run.wait_for_snapshots()`).
  compile   trainer.compile=true against false, one process, step time after warm-up (the first
            compiled step, which compiles, is shown apart: cold ~30 s on CPU, seconds from the inductor
            cache, TORCHINDUCTOR_CACHE_DIR or ~/.cache/disttrain/inductor).
  scale     on --scale-nproc processes (default 4): per-rank bytes of parameters, gradients and AdamW
            state under DDP and FSDP (as memory), and the peak memory each rank adds while
            disttrain.build_model builds a bigger GPT and a Trainer shards it (strategy=fsdp), on meta on
            every rank but rank 0 against in full on every rank (strategy.meta_init=false); the figure
            is the largest rank but rank 0 (PeakMemory: CUDA's allocator, or on CPU the peak RSS).
  checkpointing  strategy.activation_checkpointing none, selective, full in one process: the memory
            a step's forward and backward add to what it starts with (PeakMemory), and step time,
            interleaved repeats; ratios against none.

Method as in scripts/bench.py (this script does not import it): one intra-op thread per process
(`--threads`), the Trainer's loader in every case, fresh temporary run dirs, no validation, no snapshot
inside the timed window, torch.cuda.synchronize() around the window on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import cpu_name, spread  # (scripts/: this script's own directory)

ROOT = Path(__file__).resolve().parent.parent

#: The GPT per device: CPU the one scripts/bench.py times (0.44M parameters, ~40 ms a DDP step on 2
#: cores), CUDA GPT-2 small's shape; quick: a toy, so every row takes seconds.
SIZES: dict[str, dict[str, Any]] = {
    "cpu": {"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 128, "batch": 16},
    "cuda": {"vocab_size": 256, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768, "batch": 8},
    "quick": {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "batch": 4},
}
#: --quick's checkpointing job: a toy still, but its activations (tensors of 256 KiB, above the 64 KiB
#: mmap threshold PeakMemory relies on on CPU) outweigh its gradients, so the memory column measures
#: what checkpointing keeps; the quick GPT's activations of a few KiB would be malloc's noise.
QUICK_CHECKPOINTING_SIZE = {
    "vocab_size": 64, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 64, "batch": 8,
}  # fmt: skip
STRATEGIES = ("ddp", "fsdp")
CHECKPOINTING = ("none", "selective", "full")
#: The tables, and the worker phase that measures each (memory, step and snapshot share one job).
TABLES = ("memory", "step", "snapshot", "compile", "scale", "checkpointing")
#: How the scale table builds the model: in full on every rank, or on meta on every rank but rank 0.
BUILDS = ("full", "meta")
#: The GPT whose build the scale table measures: big enough that its bytes, not the interpreter's,
#: make the figure (CPU: 25M parameters, 0.1 GB in fp32; CUDA: GPT-2 medium's shape).
BUILD_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {"vocab_size": 256, "block_size": 64, "n_layer": 8, "n_head": 8, "n_embd": 512, "batch": 1},
    "cuda": {
        "vocab_size": 50304,
        "block_size": 1024,
        "n_layer": 24,
        "n_head": 16,
        "n_embd": 1024,
        "batch": 1,
    },
    "quick": {"vocab_size": 64, "block_size": 16, "n_layer": 4, "n_head": 4, "n_embd": 256, "batch": 1},
}
MB = 1e6


# ==== the workers ========================================================================================
def local_bytes(tensors: Any) -> int:
    """Bytes this rank holds of `tensors`: numel × element_size, a DTensor by its local shard."""
    import torch
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def optimizer_tensors(optimizer: Any) -> list[Any]:
    return [v for state in optimizer.state.values() for v in state.values()]


class Clock:
    """Read at the start of every step: the wall clock at step `warmup` and `warmup + steps` (the
    window) and at steps 0 and 1 (the first step: compile), after torch.cuda.synchronize() on CUDA."""

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        self.calls = 0
        self.marks: dict[int, float] = {}

    def tick(self) -> None:
        if self.calls in (0, 1, self.warmup, self.warmup + self.steps):
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.marks[self.calls] = time.perf_counter()
        self.calls += 1

    def step_s(self) -> float:
        if self.warmup + self.steps not in self.marks:
            raise RuntimeError(f"the run ended after {self.calls} steps, before the timed window closed")
        return (self.marks[self.warmup + self.steps] - self.marks[self.warmup]) / self.steps

    def first_step_s(self) -> float:
        return self.marks[1] - self.marks[0]


def build(plan: dict[str, Any], world: int, steps: int) -> tuple[Any, Any, int]:
    """(model, dataset, batch): the same weights (seed 0) and data for every case."""
    import torch

    from disttrain.data import TokenCorpus
    from disttrain.models import CharGPT

    size = dict(plan["size"])
    batch = size.pop("batch")
    # Enough samples that no run reaches the end of an epoch (the Trainer would validate and snapshot).
    samples = (steps + 3) * batch * world
    torch.manual_seed(0)
    data = TokenCorpus(size["vocab_size"], samples + size["block_size"], size["block_size"], sequence=True)
    return CharGPT(**size), data, batch


def make_config(plan: dict[str, Any], strategy: str, run_dir: Path, max_steps: int, **trainer: Any) -> Any:
    from disttrain.config import OptimConfig, SnapshotConfig, StrategyConfig, TrainConfig, TrainerConfig

    every = trainer.pop("snapshot_every", 0)
    strategy_options = trainer.pop("strategy_options", {})
    return TrainConfig(
        name="bench-fsdp",
        run_dir=str(run_dir),
        strategy=StrategyConfig(name=strategy, **strategy_options),
        trainer=TrainerConfig(
            max_epochs=1,
            max_steps=max_steps,
            batch_size=plan["size"]["batch"],
            precision=plan["precision"],
            grad_clip_norm=1.0,
            seed=0,
            val_fraction=0.0,
            num_threads=plan["threads"],
            device=plan["device_type"],
            **trainer,
        ),
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1),
        snapshot=SnapshotConfig(every_steps=every, keep_last=1),
    )


def timed_run(
    plan: dict[str, Any],
    env: Any,
    strategy: str,
    run_dir: Path,
    compile_: bool = False,
    checkpointing: str = "none",
) -> dict:
    """One fit() of the GPT: step time over the window, this rank's bytes of state, and the memory a
    step's forward and backward add to what the step starts with (activations, gradients)."""
    import torch

    from disttrain.trainer import Trainer, make_optimizer

    cuda = env.device.type == "cuda"
    clock = Clock(plan["warmup"], plan["steps"], cuda)
    seen: dict[str, int] = {"grads": 0, "peak": 0}
    step_memory = PeakMemory(env.device)  # a step's forward and backward

    class Measures:
        """The clock and the memory, read through the public events: the clock at the start and at each
        step's end (one step period between two reads), the gradients as they are held once final
        (after backward and FSDP's reduce-scatter), and on CUDA the allocator's peak over each step."""

        def on_fit_start(self, run: Any) -> None:
            clock.tick()  # the first step's start: the compile step is the first period
            step_memory.start()

        def on_before_optimizer_step(self, run: Any) -> None:
            seen["grads"] = max(seen["grads"], local_bytes(p.grad for p in run.model.parameters()))
            if clock.calls > 1:  # the first step allocates what later steps reuse
                step_memory.read()

        def on_step_end(self, run: Any) -> None:
            clock.tick()
            if cuda:
                seen["peak"] = max(seen["peak"], torch.cuda.max_memory_allocated(env.device))
                torch.cuda.reset_peak_memory_stats(env.device)
            step_memory.start()

    max_steps = plan["warmup"] + plan["steps"] + 1
    model, data, _ = build(plan, env.world_size, max_steps)
    options = {"activation_checkpointing": checkpointing}
    cfg = make_config(plan, strategy, run_dir, max_steps, compile=compile_, strategy_options=options)
    if strategy != "fsdp":
        model = model.to(env.device)  # FSDP moves each shard to the device itself
    trainer = Trainer(model, make_optimizer(cfg.optim, model), data, cfg, env=env, callbacks=[Measures()])
    trainer.fit()
    out = {
        "step_s": clock.step_s(),
        "first_step_s": clock.first_step_s(),
        "params": local_bytes(trainer.module.parameters()),
        "grads": seen["grads"],
        "optimizer": local_bytes(optimizer_tensors(trainer.optimizer)),
        "step_peak": step_memory.peak,
    }
    if cuda:
        out["peak_allocated"] = seen["peak"]
        out["allocated_after"] = torch.cuda.memory_allocated(env.device)
    del trainer, model
    if cuda:
        gc.collect()  # the next run's model and optimizer state must not share the GPU with this one's
        torch.cuda.empty_cache()
    return out


def process_memory(field: str) -> int:
    """This process's VmRSS (resident now) or VmHWM (the peak since the last reset), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """What a stretch of code adds at its peak to the memory it starts with. On CUDA the caching
    allocator's `max_memory_allocated` above `memory_allocated`; on CPU the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs) above its resident set (VmRSS) at the start. The CPU
    figure is honest only because the driver sets MALLOC_MMAP_THRESHOLD_ (glibc then maps every block
    of 64 KiB or more on its own and returns it to the system when freed, so that resident memory
    follows the live tensors instead of malloc's cache)."""

    def __init__(self, device: Any) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.base = 0
        self.peak = 0

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        Path("/proc/self/clear_refs").write_text("5")
        self.base = process_memory("VmRSS")

    def read(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            added = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            added = process_memory("VmHWM") - self.base
        self.peak = max(self.peak, added)
        return added


def build_run(plan: dict[str, Any], env: Any, meta: bool, run_dir: Path) -> dict[str, int]:
    """This rank's peak memory while the model is built and sharded into a Trainer (strategy=fsdp),
    built with disttrain.build_model: on meta on every rank but rank 0 (`meta`), or in full on every
    rank (strategy.meta_init=false). On CUDA also the host's peak (the model is built on the host)."""
    import torch

    from disttrain.data import TokenCorpus
    from disttrain.models import CharGPT
    from disttrain.strategy import build_model
    from disttrain.trainer import Trainer, make_optimizer

    size = {k: v for k, v in plan["build_size"].items() if k != "batch"}
    data = TokenCorpus(size["vocab_size"], 64 * size["block_size"], size["block_size"], sequence=True)
    options = {"meta_init": meta}
    cfg = make_config(plan, "fsdp", run_dir, 1, strategy_options=options)
    gc.collect()
    barrier(env)
    device, host = PeakMemory(env.device), PeakMemory(torch.device("cpu"))
    host.start()
    device.start()
    torch.manual_seed(0)
    model = build_model(lambda: CharGPT(**size), cfg, env)
    trainer = Trainer(model, make_optimizer(cfg.optim, model), data, cfg, env=env)
    out = {"peak": device.read(), "host_peak": host.read()}
    barrier(env)
    del trainer, model
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def max_over_ranks(env: Any, seconds: float) -> float:
    """The slowest rank's time: a collective step waits for it."""
    import torch
    import torch.distributed as dist

    if env.world_size == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(env: Any) -> None:
    import torch.distributed as dist

    if env.world_size > 1:
        dist.barrier()


def snapshot_run(plan: dict[str, Any], env: Any, strategy: str, run_dir: Path, scratch: Path) -> dict:
    """A fit() with a snapshot after every step, each timed as the training loop waits for it, and
    beside each a bare torch.save of the full state on rank 0 (alternating which goes first)."""
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from disttrain.callbacks import Callback, RunView
    from disttrain.trainer import Trainer, make_optimizer

    times: dict[str, list[float]] = {"snapshot": [], "committed": [], "gather": [], "torch_save": []}
    sizes: dict[str, int] = {}
    bare = scratch / f"full-{strategy}.pt"

    def sync() -> None:
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        barrier(env)

    def bare_save(run: RunView) -> None:
        sync()
        start = time.perf_counter()
        if strategy == "fsdp":
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = {
                "model": get_model_state_dict(run.model, options=options),
                "optimizer": get_optimizer_state_dict(run.model, run.optimizer, options=options),
            }
        else:
            full = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()}
        gathered = time.perf_counter()
        times["gather"].append(max_over_ranks(env, gathered - start))
        if env.is_main:
            torch.save(full, bare)
            sizes["torch_save"] = bare.stat().st_size
        times["torch_save"].append(max_over_ranks(env, time.perf_counter() - gathered))
        barrier(env)

    class SnapshotTimer(Callback):
        """Each snapshot as the training loop waits for it (from `on_before_snapshot` to `on_snapshot`)
        and until it is committed, with a bare save beside it (before it, then after it, in turn)."""

        def on_before_snapshot(self, run: RunView, step: int) -> None:
            run.wait_for_snapshots()  # the previous snapshot's commit is not this one's cost
            self.bare_first = len(times["snapshot"]) % 2 == 0
            if self.bare_first:
                bare_save(run)
            sync()
            self.start = time.perf_counter()

        def on_snapshot(self, run: RunView, step: int) -> None:
            times["snapshot"].append(max_over_ranks(env, time.perf_counter() - self.start))
            run.wait_for_snapshots()
            times["committed"].append(max_over_ranks(env, time.perf_counter() - self.start))
            if env.is_main:
                files = (run.run_dir / "snapshots" / f"step_{step:08d}").rglob("*")
                sizes["snapshot"] = sum(p.stat().st_size for p in files if p.is_file())
            if not self.bare_first:
                bare_save(run)

    repeats = plan["snapshot_repeats"]
    model, data, _ = build(plan, env.world_size, repeats)
    cfg = make_config(plan, strategy, run_dir, repeats, snapshot_every=1)
    if strategy != "fsdp":
        model = model.to(env.device)
    Trainer(model, make_optimizer(cfg.optim, model), data, cfg, env=env, callbacks=[SnapshotTimer()]).fit()
    bare.unlink(missing_ok=True)
    return {"seconds": times, "bytes": sizes}


def worker(plan_path: Path, out_path: Path) -> None:
    import torch
    import torch.distributed as dist

    from disttrain.dist import distributed

    plan = json.loads(plan_path.read_text())
    torch.set_num_threads(plan["threads"])
    with distributed(plan["device_type"]) as env:
        scratch = Path(plan["scratch"]) / f"world{env.world_size}"
        if env.is_main:
            scratch.mkdir(parents=True, exist_ok=True)
        barrier(env)
        result: dict[str, Any] = {"world_size": env.world_size}
        if plan["phase"] == "scale":
            short = {**plan, "warmup": 1, "steps": 2}  # bytes, not time: a few steps
            state = {s: timed_run(short, env, s, scratch / f"state-{s}") for s in STRATEGIES}
            # Each rank's figures (a DTensor's shards need not be equal: dim 0 in world_size chunks).
            builds = {
                kind: build_run(plan, env, kind == "meta", scratch / f"build-{kind}") for kind in BUILDS
            }
            for key, value in (("state", state), ("build", builds)):
                gathered = [None] * env.world_size
                dist.all_gather_object(gathered, value)
                result[key] = gathered
        elif plan["phase"] == "checkpointing":
            runs = {mode: [] for mode in CHECKPOINTING}
            for r in range(plan["repeats"]):
                for mode in CHECKPOINTING if r % 2 == 0 else reversed(CHECKPOINTING):
                    run_dir = scratch / f"checkpointing-{mode}-{r}"
                    runs[mode].append(timed_run(plan, env, "auto", run_dir, checkpointing=mode))
            result["checkpointing"] = runs
        elif env.world_size > 1:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in STRATEGIES}
            for r in range(plan["repeats"]):
                for strategy in STRATEGIES if r % 2 == 0 else reversed(STRATEGIES):
                    runs[strategy].append(timed_run(plan, env, strategy, scratch / f"{strategy}-{r}"))
            # Every rank's bytes: shards need not be equal (dim 0 split in world_size chunks).
            gathered: list[Any] = [None] * env.world_size
            dist.all_gather_object(gathered, {s: runs[s][0] for s in STRATEGIES})
            result["runs"] = runs
            result["ranks"] = gathered
            result["snapshot"] = {
                s: snapshot_run(plan, env, s, scratch / f"snapshot-{s}", scratch) for s in STRATEGIES
            }
        else:
            runs = {"eager": [], "compiled": []}
            for r in range(plan["compile_repeats"]):
                for kind in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                    torch._dynamo.reset()  # each compiled run compiles (from the cache) as a user's would
                    run_dir = scratch / f"{kind}-{r}"
                    runs[kind].append(timed_run(plan, env, "auto", run_dir, compile_=kind == "compiled"))
            result["compile"] = runs
        result["device_name"] = (
            torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else cpu_name()
        )
        barrier(env)
        if env.is_main:
            out_path.write_text(json.dumps(result))
            shutil.rmtree(scratch, ignore_errors=True)


# ==== the driver =========================================================================================
def run_worker(plan: dict[str, Any], scratch: Path, world: int) -> dict[str, Any]:
    plan_path, out = scratch / f"plan{world}.json", scratch / f"result{world}.json"
    plan_path.write_text(json.dumps(plan))
    env = dict(os.environ, OMP_NUM_THREADS=str(plan["threads"]), PYTHONUNBUFFERED="1")
    if plan["phase"] in ("scale", "checkpointing"):
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # resident memory follows the live tensors (PeakMemory)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
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
    what = WHAT[plan["phase"]]
    print(f"running {what} in {world} process(es)...", flush=True)
    tick = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(f"  {time.perf_counter() - tick:.0f} s", flush=True)
    if proc.returncode != 0:
        sys.exit(
            f"bench_fsdp: the {world}-process worker failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return json.loads(out.read_text())


WHAT = {
    "pair": "DDP and FSDP",
    "compile": "compile on/off",
    "scale": "FSDP and DDP state, and the model's build",
    "checkpointing": "activation checkpointing none/selective/full",
}


def scale_rows(result: dict[str, Any], cuda: bool, world: int) -> list[dict[str, Any]]:
    """Per-rank state under DDP and FSDP on `world` processes, and the peak memory of building the model
    in full on every rank against on meta on every rank but rank 0 (the largest rank but rank 0)."""
    rows = []
    totals = {}
    for strategy in STRATEGIES:
        ranks = [r[strategy] for r in result["state"]]
        per_rank = [r["params"] + r["grads"] + r["optimizer"] for r in ranks]
        totals[strategy] = max(per_rank)
        row: dict[str, Any] = {
            "table": "scale",
            "label": f"state {strategy} x{world}",
            "total": max(per_rank),
        }
        row |= {key: max(r[key] for r in ranks) for key in ("params", "grads", "optimizer")}
        row["per_rank_total"] = per_rank
        rows.append(row)
    rows.append(
        {
            "table": "scale",
            "label": f"state FSDP / DDP x{world}",
            "ratio": totals["fsdp"] / totals["ddp"],
            "ideal": 1 / world,
            "target": 0.30,
        }
    )
    peaks = {}
    for kind in BUILDS:
        ranks = [r[kind] for r in result["build"]]
        row = {"table": "scale", "label": f"build {kind} x{world}", "build": kind}
        row["rank0_peak"] = ranks[0]["peak"]
        row["peak"] = max(r["peak"] for r in ranks[1:])  # every rank but rank 0
        row["per_rank_peak"] = [r["peak"] for r in ranks]
        if cuda:
            row["host_peak"] = max(r["host_peak"] for r in ranks[1:])
        peaks[kind] = row["peak"]
        rows.append(row)
    ratio = {"table": "scale", "label": f"build meta / full x{world}", "ratio": peaks["meta"] / peaks["full"]}
    ratio["target"] = 0.40
    rows.append(ratio)
    return rows


def checkpointing_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    runs = result["checkpointing"]
    rows = []
    for mode in CHECKPOINTING:
        secs = [r["step_s"] for r in runs[mode]]
        rows.append(
            {
                "table": "checkpointing",
                "label": f"activation_checkpointing={mode}",
                "step_ms": statistics.median(secs) * 1e3,
                "spread": spread(secs),
                "step_peak": statistics.median(r["step_peak"] for r in runs[mode]),
                "repeats_ms": [s * 1e3 for s in secs],
            }
        )
    none = rows[0]
    for row in rows[1:]:
        row["peak_ratio"] = row["step_peak"] / none["step_peak"]
        pairs = [
            c["step_s"] / n["step_s"]
            for c, n in zip(runs[row["label"].split("=")[1]], runs["none"], strict=True)
        ]
        row["ratio"] = statistics.median(pairs)
    return rows


def memory_rows(result: dict[str, Any], cuda: bool, world: int) -> list[dict[str, Any]]:
    rows = []
    for strategy in STRATEGIES:
        ranks = [r[strategy] for r in result["ranks"]]
        # The largest rank: what each process must have room for.
        row: dict[str, Any] = {"table": "memory", "label": f"{strategy} x{world}", "strategy": strategy}
        for key in ("params", "grads", "optimizer"):
            row[key] = max(r[key] for r in ranks)
            row[f"{key}_per_rank"] = [r[key] for r in ranks]
        row["total"] = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks)
        row["per_rank_total"] = [r["params"] + r["grads"] + r["optimizer"] for r in ranks]
        if cuda:
            row["peak_allocated"] = max(r["peak_allocated"] for r in ranks)
        rows.append(row)
    ddp, fsdp = rows
    ratio = {"table": "memory", "label": "FSDP / DDP per-rank total", "ratio": fsdp["total"] / ddp["total"]}
    ratio["ideal"] = 1 / world
    if cuda:
        ratio["peak_ratio"] = fsdp["peak_allocated"] / ddp["peak_allocated"]
    return [*rows, ratio]


def step_rows(result: dict[str, Any], plan: dict[str, Any], world: int) -> list[dict[str, Any]]:
    rows = []
    runs = result["runs"]
    batch, block = plan["size"]["batch"], plan["size"]["block_size"]
    for strategy in STRATEGIES:
        secs = [r["step_s"] for r in runs[strategy]]
        step = statistics.median(secs)
        rows.append(
            {
                "table": "step",
                "label": f"{strategy} x{world}",
                "step_ms": step * 1e3,
                "spread": spread(secs),
                "tokens_per_s": batch * world * block / step,
                "repeats_ms": [s * 1e3 for s in secs],
            }
        )
    pairs = [f["step_s"] / d["step_s"] for f, d in zip(runs["fsdp"], runs["ddp"], strict=True)]
    rows.append({"table": "step", "label": "FSDP / DDP step time", "ratio": statistics.median(pairs)})
    return rows


def snapshot_rows(result: dict[str, Any], world: int) -> list[dict[str, Any]]:
    rows = []
    for strategy in STRATEGIES:
        snap = result["snapshot"][strategy]
        s, size = snap["seconds"], snap["bytes"]
        kind = "sharded, DCP" if strategy == "fsdp" else "rank 0, full state"
        snapshot_ms = statistics.median(s["snapshot"]) * 1e3
        bare_ms = statistics.median(s["torch_save"]) * 1e3
        gather_ms = statistics.median(s["gather"]) * 1e3
        rows.append(
            {
                "table": "snapshot",
                "label": f"{strategy} x{world} ({kind})",
                "strategy": strategy,
                "snapshot_ms": snapshot_ms,
                "committed_ms": statistics.median(s["committed"]) * 1e3,
                "snapshot_bytes": size.get("snapshot", 0),
                "gather_ms": gather_ms,
                "torch_save_ms": bare_ms,
                "torch_save_bytes": size.get("torch_save", 0),
                "ratio": snapshot_ms / (gather_ms + bare_ms),
                "repeats": len(s["snapshot"]),
            }
        )
    return rows


def compile_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    runs = result["compile"]
    rows = []
    for kind in ("eager", "compiled"):
        secs = [r["step_s"] for r in runs[kind]]
        rows.append(
            {
                "table": "compile",
                "label": f"trainer.compile={'true' if kind == 'compiled' else 'false'}",
                "step_ms": statistics.median(secs) * 1e3,
                "spread": spread(secs),
                "first_step_s": max(r["first_step_s"] for r in runs[kind]),
                "repeats_ms": [s * 1e3 for s in secs],
            }
        )
    pairs = [c["step_s"] / e["step_s"] for c, e in zip(runs["compiled"], runs["eager"], strict=True)]
    rows.append(
        {"table": "compile", "label": "compiled / eager step time", "ratio": statistics.median(pairs)}
    )
    return rows


def print_tables(rows: list[dict[str, Any]], notes: list[str], cuda: bool) -> None:
    def chosen(table: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["table"] == table]

    if chosen("memory"):
        print(
            "\n## memory: per-rank MB of parameters, gradients and AdamW state (numel × element size;"
            " DTensors by their local shards; the largest rank)"
            + ("; peak = torch.cuda.max_memory_allocated" if cuda else "")
        )
        print(
            f"{'row':<28} {'params':>9} {'grads':>9} {'optim':>9} {'total':>9}"
            + (f" {'peak':>9}" if cuda else "")
        )
        for r in chosen("memory"):
            if "ratio" in r:
                extra = f", peak {r['peak_ratio']:.3f}" if cuda else ""
                print(f"{r['label']:<28} ratio {r['ratio']:.3f} (ideal {r['ideal']:.3f}){extra}")
                continue
            line = f"{r['label']:<28} " + " ".join(
                f"{r[k] / MB:>9.3f}" for k in ("params", "grads", "optimizer", "total")
            )
            print(line + (f" {r['peak_allocated'] / MB:>9.1f}" if cuda else ""))
    if chosen("scale"):
        print(
            "\n## scale: per rank on several processes: MB of parameters + gradients + AdamW state (tensor"
            " sizes) under DDP and FSDP, and the peak memory added while the model is built and sharded"
            " into a Trainer (strategy=fsdp; the largest rank but rank 0; "
            + ("torch.cuda.max_memory_allocated" if cuda else "peak RSS, VmHWM above VmRSS")
            + ")"
        )
        for r in chosen("scale"):
            if "ratio" in r:
                ideal = f", ideal {r['ideal']:.3f}" if "ideal" in r else ""
                print(f"{r['label']:<28} ratio {r['ratio']:.3f} (target <= {r['target']:.2f}{ideal})")
            elif "build" in r:
                host = f"  host {r['host_peak'] / MB:.1f} MB" if "host_peak" in r else ""
                peaks = f"peak {r['peak'] / MB:>9.1f} MB  rank 0 {r['rank0_peak'] / MB:.1f} MB"
                print(f"{r['label']:<28} {peaks}{host}")
            else:
                print(f"{r['label']:<28} total {r['total'] / MB:>9.3f} MB")
    if chosen("checkpointing"):
        print(
            "\n## checkpointing: one process, the memory a step's forward + backward adds to what it starts"
            " with (activations and gradients; "
            + ("torch.cuda.max_memory_allocated" if cuda else "peak RSS, VmHWM above VmRSS")
            + "), median step time of interleaved repeats; ratios against none"
        )
        for r in chosen("checkpointing"):
            ratios = f"  peak x{r['peak_ratio']:.3f}  time x{r['ratio']:.3f}" if "ratio" in r else ""
            print(
                f"{r['label']:<34} peak {r['step_peak'] / MB:>8.2f} MB  {r['step_ms']:>9.2f} ms"
                f"  spread {r['spread']:>6.1%}{ratios}"
            )
    sections = {
        "step": (
            "step time, same GPT, data and global batch (median of interleaved repeats; ratio = median of"
            " FSDP / DDP over the pairs)",
            lambda r: (
                f"{r['step_ms']:>9.2f} ms  spread {r['spread']:>6.1%}  {r['tokens_per_s']:>10,.0f} tokens/s"
            ),
        ),
        "snapshot": (
            "snapshot: what the training loop waits for (slowest rank), against a bare torch.save of the"
            " full state on rank 0 (FSDP: after gathering it); ratio = snapshot / (gather + torch.save)",
            lambda r: (
                f"snapshot {r['snapshot_ms']:>7.2f} ms ({r['snapshot_bytes'] / MB:.2f} MB, committed"
                f" {r['committed_ms']:.2f} ms)  gather {r['gather_ms']:.2f} ms + torch.save"
                f" {r['torch_save_ms']:.2f} ms ({r['torch_save_bytes'] / MB:.2f} MB)"
            ),
        ),
        "compile": (
            "trainer.compile, one process (median of interleaved repeats; first step = compile, slowest"
            " repeat)",
            lambda r: (
                f"{r['step_ms']:>9.2f} ms  spread {r['spread']:>6.1%}  first step {r['first_step_s']:>6.2f} s"
            ),
        ),
    }
    for table, (title, body) in sections.items():
        if not chosen(table):
            continue
        print(f"\n## {table}: {title}")
        for r in chosen(table):
            if "step_ms" not in r and "snapshot_ms" not in r:
                print(f"{r['label']:<28} ratio {r['ratio']:.3f}")
                continue
            ratio = f"  ratio {r['ratio']:.3f}" if r.get("ratio") is not None else ""
            print(f"{r['label']:<28} {body(r)}{ratio}")
    for note in notes:
        print(f"note: {note}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default=None, help="default: fp32 (cpu), bf16 (cuda)"
    )
    p.add_argument("--nproc", type=int, default=2, help="processes for DDP and FSDP (default 2)")
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat (default 20, 3 with --quick)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, 1 with --quick)")
    p.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats of DDP and FSDP (default 5)"
    )
    p.add_argument(
        "--snapshot-repeats", type=int, default=None, help="snapshots timed per strategy (default 9)"
    )
    p.add_argument(
        "--compile-repeats", type=int, default=None, help="interleaved compile on/off repeats (default 3)"
    )
    p.add_argument(
        "--scale-nproc", type=int, default=4, help="processes for the scale table (default 4; 0: none)"
    )
    p.add_argument(
        "--only",
        default=",".join(TABLES),
        help=f"the tables to run, comma-separated (default {','.join(TABLES)})",
    )
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument(
        "--quick", action="store_true", help="a toy GPT: every row in seconds, figures meaningless"
    )
    p.add_argument("--json", type=Path, default=None, help="write every row and the settings here")
    args = p.parse_args(argv)
    quick = args.quick
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    args.steps = args.steps or (3 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.repeats = args.repeats or (2 if quick else 5)
    args.snapshot_repeats = args.snapshot_repeats or (2 if quick else 9)
    args.compile_repeats = args.compile_repeats or (1 if quick else 3)
    args.only = [t for t in args.only.split(",") if t]
    if unknown := [t for t in args.only if t not in TABLES]:
        p.error(f"--only {','.join(unknown)}: the tables are {', '.join(TABLES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(Path(argv[1]), Path(argv[2]))
        return 0
    args = parse_args(argv)
    import torch

    from disttrain.strategy import compiler_missing

    cuda = args.device == "cuda"
    notes: list[str] = []
    world = args.nproc
    if cuda:
        if not torch.cuda.is_available():
            sys.exit("bench_fsdp: --device cuda but torch sees no GPU")
        if torch.cuda.device_count() < world:
            notes.append(
                f"{torch.cuda.device_count()} GPU: memory, step and snapshot rows skipped (DDP and FSDP need"
                f" {world} GPUs: NCCL takes one GPU per process)"
            )
            world = 0
    scale_world = args.scale_nproc if "scale" in args.only else 0
    if cuda and scale_world and torch.cuda.device_count() < scale_world:
        notes.append(
            f"{torch.cuda.device_count()} GPU: scale rows skipped (they need {scale_world} GPUs: NCCL takes"
            " one GPU per process)"
        )
        scale_world = 0
    if not {"memory", "step", "snapshot"} & set(args.only):
        world = 0
    size = dict(SIZES["quick" if args.quick else args.device])
    plan = {
        "device_type": args.device,
        "size": size,
        "precision": args.precision,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "snapshot_repeats": args.snapshot_repeats,
        "compile_repeats": args.compile_repeats,
        "threads": args.threads,
        "build_size": BUILD_SIZES["quick" if args.quick else args.device],
    }
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    device_name = None
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-fsdp-") as tmp:
        scratch = Path(tmp)
        plan["scratch"] = str(scratch)
        if world > 1:
            result = run_worker({**plan, "phase": "pair"}, scratch, world)
            device_name = result["device_name"]
            rows += memory_rows(result, cuda, world) if "memory" in args.only else []
            rows += step_rows(result, plan, world) if "step" in args.only else []
            rows += snapshot_rows(result, world) if "snapshot" in args.only else []
        if "compile" not in args.only:
            pass
        elif (missing := compiler_missing()) is not None:
            notes.append(f"compile rows skipped: {missing}")
        else:
            result = run_worker({**plan, "phase": "compile"}, scratch, 1)
            device_name = result["device_name"]
            rows += compile_rows(result)
        if scale_world > 1:
            result = run_worker({**plan, "phase": "scale"}, scratch, scale_world)
            device_name = result["device_name"]
            rows += scale_rows(result, cuda, scale_world)
        if "checkpointing" in args.only:
            job = {"size": QUICK_CHECKPOINTING_SIZE} if args.quick else {}
            result = run_worker({**plan, "phase": "checkpointing", **job}, scratch, 1)
            device_name = result["device_name"]
            rows += checkpointing_rows(result)
    load_after = os.getloadavg()[0]
    params = sum(p.numel() for p in build_model(size).parameters())
    notes.append(
        f"GPT {size['n_layer']} layers, width {size['n_embd']}, block {size['block_size']}, vocab"
        f" {size['vocab_size']}: {params / 1e6:.2f}M parameters; batch {size['batch']} per process,"
        f" {args.precision}, AdamW; warm-up {args.warmup}, {args.steps} timed steps, {args.repeats}"
        f" interleaved repeats ({args.compile_repeats} for compile), {args.snapshot_repeats} snapshots"
    )
    if scale_world > 1:
        build = plan["build_size"]
        built = sum(p.numel() for p in build_model(build).parameters())
        notes.append(
            f"scale: {scale_world} processes; the build rows build a GPT of {build['n_layer']} layers, width"
            f" {build['n_embd']}: {built / 1e6:.1f}M parameters, {4 * built / MB:.0f} MB in fp32"
        )
    notes.append(
        f"load average {load_before:.1f} at the start, {load_after:.1f} at the end, on {os.cpu_count()}"
        f" cores; {args.threads} intra-op thread(s) per process"
    )
    print_tables(rows, notes, cuda)
    meta = {
        "command": " ".join(["python", "scripts/bench_fsdp.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "nproc": world,
        "load_average": [load_before, load_after],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {**size, "params": params},
        "seconds": time.perf_counter() - started,
    }
    print(f"\nbench_fsdp took {meta['seconds']:.0f} s: {meta['command']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "notes": notes}, indent=1))
        print(f"wrote {args.json}")
    return 0 if all(finite(r) for r in rows) else 1


def build_model(size: dict[str, Any]) -> Any:
    from disttrain.models import CharGPT

    return CharGPT(**{k: v for k, v in size.items() if k != "batch"})


def finite(row: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
