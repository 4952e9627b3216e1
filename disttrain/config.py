"""Typed configuration: one dataclass per config group, every field documented where it is defined.

Hydra composes `conf/train.yaml` and its groups into a plain dict; `load_config` turns that dict into
these dataclasses, and `validate` checks every rule a user can break. Both raise `ConfigError` with one
line naming the key, the value and the rule, so the CLI can print it and exit 2 before any process group
starts and before any snapshot is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRATEGIES = ("auto", "single", "ddp", "dp")
PRECISIONS = ("fp32", "bf16", "fp16")
LAUNCHERS = ("local", "torchrun", "multinode", "slurm")
LOSSES = ("auto", "cross_entropy", "mse")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
ON_EXPLOSION = ("warn", "skip", "halve_lr")


class ConfigError(ValueError):
    """A user's mistake in the configuration: one line, no traceback, exit code 2."""


@dataclass
class StrategyConfig:
    #: auto | single | ddp | dp. auto picks ddp when the job has more than one process, else single.
    name: str = "auto"
    #: DDP: size of a gradient all-reduce bucket in MiB (torch's default is 25).
    bucket_cap_mb: float = 25.0
    #: DDP: let gradients be views into the all-reduce buckets (saves one copy and memory per step).
    gradient_as_bucket_view: bool = True
    #: DDP: the autograd graph is the same every step (lets DDP skip per-step graph bookkeeping).
    static_graph: bool = False
    #: DDP: search for parameters that got no gradient (needed only by models with unused branches).
    find_unused_parameters: bool = False


@dataclass
class LauncherConfig:
    #: local | torchrun | multinode | slurm: where the training processes run.
    name: str = "local"
    #: Print the exact command (or sbatch script) that would run, and start nothing.
    dry_run: bool = False
    #: torchrun/multinode/slurm: worker processes per node (GPUs per node on a GPU machine).
    nproc_per_node: int = 1
    #: multinode: number of machines in the job.
    nnodes: int = 1
    #: multinode: this machine's index, 0 .. nnodes-1 (node 0 hosts the rendezvous store).
    node_rank: int = 0
    #: multinode: HOST:PORT of the c10d rendezvous store, reachable from every node.
    rdzv_endpoint: str = ""
    #: multinode: a job id shared by all nodes of one job (keeps two jobs on one endpoint apart).
    rdzv_id: str = "disttrain"
    #: multinode: this node's own address as the other nodes reach it ("" lets torchrun use the hostname).
    local_addr: str = ""
    #: torchrun: how often torchrun restarts a failed worker group (each restart resumes from a snapshot).
    max_restarts: int = 0
    #: slurm: number of nodes to ask for (one srun task per node, each running torchrun).
    nodes: int = 1
    #: slurm: GPUs per node to ask for (0 on CPU clusters); also the number of workers per node when > 0.
    gpus_per_node: int = 0
    #: slurm: CPU cores per task (per node, since there is one task per node).
    cpus_per_task: int = 1
    #: slurm: partition to submit to ("" uses the cluster's default).
    partition: str = ""
    #: slurm: the job's time limit, as sbatch takes it (e.g. 01:00:00).
    time: str = "01:00:00"
    #: slurm: account to charge ("" leaves it to the cluster's default).
    account: str = ""
    #: slurm: signal sent before the time limit; the trainer snapshots and requeues on it.
    signal: str = "USR2"
    #: slurm: how many seconds before the time limit that signal comes.
    signal_seconds: int = 120
    #: slurm: block until the job ends and exit with its exit code.
    wait: bool = False
    #: slurm: further `#SBATCH` lines, e.g. ["--qos=high", "--constraint=a100"].
    sbatch_args: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    #: Passes over the training split. The run ends at max_epochs or max_steps, whichever comes first.
    max_epochs: int = 5
    #: Optimizer steps after which the run ends (0: no limit).
    max_steps: int = 0
    #: Samples per micro-batch on each process (the global batch is batch_size × accumulate × processes).
    batch_size: int = 64
    #: Micro-batches whose gradients add up into one optimizer step.
    accumulate: int = 1
    #: fp32 | bf16 | fp16. bf16 and fp16 run the forward under autocast; fp16 adds a GradScaler.
    precision: str = "fp32"
    #: Clip the global gradient norm to this value before each step (0: off; the norm is still logged).
    grad_clip_norm: float = 1.0
    #: Seed of model initialisation, data order and every RNG.
    seed: int = 2147483647
    #: auto | cross_entropy | mse. auto takes the dataset's `loss` attribute, else cross_entropy.
    loss: str = "auto"
    #: Share of the dataset held out for validation (the last samples; 0: no validation).
    val_fraction: float = 0.1
    #: Validate every N optimizer steps (0: only at the end of each epoch).
    val_every_steps: int = 0
    #: Stop after this many validations without improvement (0: never stop early).
    early_stop_patience: int = 0
    #: DataLoader worker processes per training process.
    num_workers: int = 0
    #: Intra-op CPU threads per process (0: leave torch's default). Fix it to compare runs bit for bit:
    #: torchrun sets OMP_NUM_THREADS=1 only when it starts more than one process on a node.
    num_threads: int = 0
    #: auto | cpu | cuda. auto takes the GPU of this process's local rank when CUDA is available.
    device: str = "auto"
    #: Seconds a collective may wait for the other ranks before the job fails (init_process_group timeout).
    timeout_s: float = 600.0
    #: Print a progress line every N optimizer steps when stdout is not a terminal (on a terminal rank 0
    #: draws a tqdm bar instead).
    log_every_steps: int = 200
    #: Peak dense TFLOP/s of one device at the run's precision, for MFU in metrics.jsonl (0: look the GPU
    #: up in disttrain.metrics.PEAK_TFLOPS; no MFU on CPU or an unknown GPU unless set here). MFU needs a
    #: model that declares `flops_per_sample` (a number, or a method with no arguments).
    peak_tflops: float = 0.0


@dataclass
class OptimConfig:
    #: sgd | adamw.
    name: str = "sgd"
    #: Peak learning rate.
    lr: float = 0.1
    #: sgd: momentum.
    momentum: float = 0.9
    #: Decoupled weight decay (adamw) or L2 penalty (sgd).
    weight_decay: float = 0.0
    #: adamw: the two beta coefficients.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    #: constant | cosine (cosine decays to min_lr_ratio × lr over the whole run).
    schedule: str = "constant"
    #: Optimizer steps of linear warm-up from 0 to lr.
    warmup_steps: int = 0
    #: cosine: the floor, as a fraction of lr.
    min_lr_ratio: float = 0.1


@dataclass
class SnapshotConfig:
    #: Write a snapshot every N optimizer steps (0: only at the end of each epoch and of the run).
    every_steps: int = 0
    #: How many verified snapshots to keep; older ones are deleted, the newest good one never.
    keep_last: int = 2


@dataclass
class HealthConfig:
    """What the global gradient norm (after the all-reduce, before clipping; the same on every rank)
    decides. Non-finite norms always skip the step and count in `skipped_steps` (fp16's GradScaler
    steps included)."""

    #: warn | skip | halve_lr: what an explosion does (a norm above explosion_factor ×
    #: trainer.grad_clip_norm; detection needs clipping on). warn: log it, clip and step as usual.
    #: skip: do not step. halve_lr: clip and step, and after `patience` explosions in a row halve the
    #: learning rate (its schedule's base) for the rest of the run.
    on_explosion: str = "warn"
    #: An explosion is a norm above this many times trainer.grad_clip_norm (the seed's SafeOptimizer: 10).
    explosion_factor: float = 10.0
    #: halve_lr: explosions in a row that halve the learning rate (the count then starts again).
    patience: int = 5
    #: Write each module's gradient norm into metrics.jsonl (`grad_flow`) every N steps (0: never).
    grad_flow_every: int = 0


@dataclass
class LoggerConfig:
    #: none | wandb. Only rank 0 logs. The wandb run id is kept in run_dir and in every snapshot, so a
    #: resumed, restarted or requeued job continues the same run.
    name: str = "none"
    #: wandb: project name.
    project: str = "disttrain"
    #: wandb: online | offline | disabled.
    mode: str = "offline"


@dataclass
class TrainConfig:
    #: Names the experiment; part of the default run_dir.
    name: str = "default"
    #: Where config, metrics, snapshots and summary go. Running again with the same run_dir resumes.
    run_dir: str = "runs/default"
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    #: `_target_` (a class or function returning an nn.Module) and its keyword arguments.
    model: dict[str, Any] = field(default_factory=lambda: {"_target_": "disttrain.models.MLPLanguageModel"})
    #: `_target_` (a class or function returning a map-style Dataset) and its keyword arguments.
    data: dict[str, Any] = field(default_factory=lambda: {"_target_": "disttrain.data.TokenCorpus"})


def _fail(key: str, value: Any, rule: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {rule}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            _fail(key, value, "must be a mapping")
        return _build(annotation, value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(key, value, "must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "must be an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            _fail(key, value, "must be a string")
        return str(value)
    if origin is list:
        if not isinstance(value, list):
            _fail(key, value, "must be a list")
        (item,) = typing.get_args(annotation)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, value, "must be a mapping")
        return dict(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{'.' if prefix else ''}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            _fail(full, value, f"unknown key{hint}")
        kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def load_config(data: dict[str, Any]) -> TrainConfig:
    """Turn a composed (and resolved) config dict into a TrainConfig; unknown keys and wrong types fail."""
    return _build(TrainConfig, data)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def resolve_target(key: str, spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Import `spec['_target_']` and check its keyword arguments against its signature."""
    target = spec.get("_target_")
    if not isinstance(target, str) or "." not in target:
        _fail(f"{key}._target_", target, "must name a class or function as module.name")
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        _fail(f"{key}._target_", target, f"cannot be imported ({e})")
    except Exception as e:  # the module itself fails while it is imported (a user's code, run here)
        _fail(f"{key}._target_", target, f"cannot be imported: importing it raised {describe_exception(e)}")
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return obj, kwargs
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for k, v in kwargs.items():
            if k not in params:
                close = difflib.get_close_matches(k, list(params), n=1)
                hint = f"; did you mean {key}.{close[0]}?" if close else ""
                _fail(f"{key}.{k}", v, f"{target} takes no such argument{hint}")
    return obj, kwargs


def describe_exception(e: BaseException) -> str:
    """One line for an exception raised by a user's code: `ValueError: width must be positive
    (mypkg/net.py:12)`, its type, the first line of its message, and where it was raised."""
    import traceback

    message = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    if isinstance(e, SyntaxError):
        where, message = f"{e.filename}:{e.lineno}", e.msg
    else:
        frames = traceback.extract_tb(e.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(e).__name__}{': ' + message if message else ''}{f' ({where})' if where else ''}"


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, f"must be one of {', '.join(choices)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        _fail(key, value, f"must be at least {low:g}")


def world_size_of(cfg: TrainConfig, environ: typing.Mapping[str, str] = os.environ) -> int:
    """Processes the job will have: from the environment inside a launched job, else from the launcher."""
    if "WORLD_SIZE" in environ:
        return int(environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in environ and "SLURM_STEP_ID" in environ:
        return int(environ["SLURM_NTASKS"])
    launcher = cfg.launcher
    if launcher.name == "torchrun":
        return launcher.nproc_per_node
    if launcher.name == "multinode":
        return launcher.nnodes * launcher.nproc_per_node
    if launcher.name == "slurm":
        return launcher.nodes * (launcher.gpus_per_node or launcher.nproc_per_node)
    return 1


def resolve_strategy(cfg: TrainConfig, world_size: int) -> str:
    """The strategy a job runs: `auto` becomes ddp on several processes, single on one."""
    name = cfg.strategy.name
    if name == "auto":
        return "ddp" if world_size > 1 else "single"
    return name


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Check every rule a user can break; raise ConfigError with one line on the first broken one."""
    world_size = world_size_of(cfg) if world_size is None else world_size
    t, o, s = cfg.trainer, cfg.optim, cfg.snapshot
    _one_of("strategy", cfg.strategy.name, STRATEGIES)
    _at_least("strategy.bucket_cap_mb", cfg.strategy.bucket_cap_mb, 0.001)
    _one_of("launcher", cfg.launcher.name, LAUNCHERS)
    _at_least("trainer.max_epochs", t.max_epochs, 1)
    _at_least("trainer.max_steps", t.max_steps, 0)
    _at_least("trainer.batch_size", t.batch_size, 1)
    _at_least("trainer.accumulate", t.accumulate, 1)
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _at_least("trainer.grad_clip_norm", t.grad_clip_norm, 0)
    _one_of("trainer.loss", t.loss, LOSSES)
    if not 0 <= t.val_fraction < 1:
        _fail("trainer.val_fraction", t.val_fraction, "must be in [0, 1)")
    _at_least("trainer.val_every_steps", t.val_every_steps, 0)
    _at_least("trainer.early_stop_patience", t.early_stop_patience, 0)
    if t.early_stop_patience and not t.val_fraction:
        _fail("trainer.early_stop_patience", t.early_stop_patience, "needs trainer.val_fraction > 0")
    _at_least("trainer.num_workers", t.num_workers, 0)
    _at_least("trainer.num_threads", t.num_threads, 0)
    _one_of("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _at_least("trainer.timeout_s", t.timeout_s, 1)
    _at_least("trainer.log_every_steps", t.log_every_steps, 1)
    _at_least("trainer.peak_tflops", t.peak_tflops, 0)
    _one_of("optim.name", o.name, OPTIMIZERS)
    if o.lr <= 0:
        _fail("optim.lr", o.lr, "must be positive")
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        _fail("optim.betas", o.betas, "must be two numbers in [0, 1)")
    _at_least("snapshot.every_steps", s.every_steps, 0)
    _at_least("snapshot.keep_last", s.keep_last, 1)
    _validate_health(cfg.health, t)
    _one_of("logger", cfg.logger.name, ("none", "wandb"))
    if cfg.logger.name == "wandb" and importlib.util.find_spec("wandb") is None:
        _fail("logger", "wandb", "needs the wandb package: pip install 'disttrain[wandb]'")
    _one_of("logger.mode", cfg.logger.mode, ("online", "offline", "disabled"))
    _validate_precision(t)
    _validate_world(cfg, world_size)
    _validate_launcher(cfg)
    resolve_target("model", cfg.model)
    _, data_kwargs = resolve_target("data", cfg.data)
    for key, value in data_kwargs.items():
        # Dataset arguments that name files are checked here, where the error is cheap and early.
        if (key == "path" or key.endswith(("_path", "_file"))) and not Path(str(value)).is_file():
            _fail(f"data.{key}", value, "no such file")


def _validate_health(h: HealthConfig, t: TrainerConfig) -> None:
    _one_of("health.on_explosion", h.on_explosion, ON_EXPLOSION)
    _at_least("health.explosion_factor", h.explosion_factor, 1)
    _at_least("health.patience", h.patience, 1)
    _at_least("health.grad_flow_every", h.grad_flow_every, 0)
    if h.on_explosion != "warn" and not t.grad_clip_norm:
        _fail(
            "health.on_explosion",
            h.on_explosion,
            "needs trainer.grad_clip_norm > 0 (an explosion is a norm above "
            "health.explosion_factor × trainer.grad_clip_norm)",
        )


def _validate_precision(t: TrainerConfig) -> None:
    if t.device == "cpu" or (t.device == "auto" and t.precision == "fp32"):
        return  # bf16 and fp16 autocast both run on CPU; only a GPU can lack them
    import torch

    if not torch.cuda.is_available():
        if t.device == "cuda":
            _fail("trainer.device", t.device, "CUDA is not available on this machine")
        return
    if t.precision == "bf16" and not torch.cuda.is_bf16_supported():
        _fail("trainer.precision", t.precision, "this GPU does not support bf16; use fp16")


def _validate_world(cfg: TrainConfig, world_size: int) -> None:
    name = cfg.strategy.name
    if name == "ddp" and world_size == 1:
        _fail(
            "strategy",
            name,
            "ddp needs more than one process; launch with torchrun "
            "(launcher=torchrun launcher.nproc_per_node=N) or use strategy=single",
        )
    if name in ("single", "dp") and world_size > 1:
        _fail("strategy", name, f"runs in one process but this job has {world_size}; use strategy=ddp")


def _validate_launcher(cfg: TrainConfig) -> None:
    """Launch rules, checked before anything starts: the job's shape, the rendezvous address, and for
    SLURM that sbatch exists and the nodes have the GPUs asked for (a dry run talks to no cluster)."""
    launcher = cfg.launcher
    _at_least("launcher.nproc_per_node", launcher.nproc_per_node, 1)
    _at_least("launcher.max_restarts", launcher.max_restarts, 0)
    if launcher.name == "multinode":
        _at_least("launcher.nnodes", launcher.nnodes, 1)
        if not 0 <= launcher.node_rank < launcher.nnodes:
            _fail("launcher.node_rank", launcher.node_rank, f"must be in 0..{launcher.nnodes - 1}")
        host, _, port = launcher.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            _fail("launcher.rdzv_endpoint", launcher.rdzv_endpoint, "must be HOST:PORT, e.g. node0:29400")
    if launcher.name in ("torchrun", "multinode") and cfg.trainer.device != "cpu":
        _validate_local_gpus("launcher.nproc_per_node", launcher.nproc_per_node, cfg.trainer.device)
    if launcher.name == "slurm":
        _validate_slurm(launcher)


def _validate_local_gpus(key: str, wanted: int, device: str) -> None:
    import torch

    have = torch.cuda.device_count()
    if (have or device == "cuda") and wanted > have:
        _fail(key, wanted, f"this node has {have} GPU{'s' if have != 1 else ''}")


def _validate_slurm(launcher: LauncherConfig) -> None:
    import signal

    _at_least("launcher.nodes", launcher.nodes, 1)
    _at_least("launcher.gpus_per_node", launcher.gpus_per_node, 0)
    _at_least("launcher.cpus_per_task", launcher.cpus_per_task, 1)
    _at_least("launcher.signal_seconds", launcher.signal_seconds, 0)
    if f"SIG{launcher.signal}" not in signal.Signals.__members__:
        _fail("launcher.signal", launcher.signal, "must be a signal name without SIG, e.g. USR2")
    if launcher.dry_run:
        return
    from disttrain.launch.slurm import partition_gpus, sbatch_missing

    missing = sbatch_missing()
    if missing:
        _fail("launcher", "slurm", missing)
    if launcher.gpus_per_node:
        have = partition_gpus(launcher.partition)
        if have is not None and launcher.gpus_per_node > have:
            where = f"partition {launcher.partition!r}" if launcher.partition else "the default partition"
            rule = f"nodes of {where} have at most {have} (sinfo)"
            _fail("launcher.gpus_per_node", launcher.gpus_per_node, rule)
