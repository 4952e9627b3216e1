"""The schema: one dataclass per config group, every field documented where it is defined.

These dataclasses are the one source of defaults. Hydra composes the YAML options (`disttrain/conf/`,
each saying only what it changes) over them as a structured config, so OmegaConf checks types and
unknown keys while composing; `load_config` does the same for a plain dict (a frozen config a worker
reads), and `validate` checks every rule a user can break. All of them raise `ConfigError` with one
line naming the key, the value and the rule, so the CLI prints it and exits 2 before any process group
starts and before any snapshot is touched, and the Python API refuses what the CLI refuses.

Every number carries its range in the field's metadata (`_range`), so no number escapes a rule, NaN and
infinity included, and every integer an upper bound: a C int, or what the machine takes (threads, a
process group's timeout), with the reason in the rule's words. Machine probes (sbatch, sinfo, GPUs)
are not here: they belong to the launchers.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib
import importlib.util
import inspect
import math
import os
import secrets
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRATEGIES = ("auto", "single", "ddp", "dp", "fsdp")
CHECKPOINTING = ("none", "full", "selective")
PRECISIONS = ("fp32", "bf16", "fp16")
LAUNCHERS = ("local", "torchrun", "multinode", "slurm")
LOSSES = ("auto", "cross_entropy", "mse")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
ON_EXPLOSION = ("warn", "skip", "halve_lr")
DEVICES = ("auto", "cpu", "cuda")
LOGGERS = ("none", "wandb")
WANDB_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """A user's mistake in the configuration: one line, no traceback, exit code 2."""


@dataclass(frozen=True)
class Range:
    """The values a number may take: finite, and within [low, high] (`open_low`: low itself excluded).
    `why` says what the upper bound means, in the rule's words."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    why: str = ""

    def rule(self, value: float | None = None) -> str:
        """The rule, as the value `value` breaks it: a cap with a `why` says what it means when `value` is
        above it, and is left out of the rule of a value below the range."""
        if self.why and value is not None and value > self.high:
            return f"must be at most {_plain(self.high)} ({self.why})"
        if self.high == math.inf or self.why:
            if self.open_low:
                return "must be positive" if self.low == 0 else f"must be above {self.low:g}"
            return f"must be at least {self.low:g}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"must be in {left}{_plain(self.low)}, {_plain(self.high)}{right}"

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below


def _plain(x: float) -> str:
    """A bound as a user types it: 2147483647, not 2.14748e+09."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


#: The largest count any integer field takes: torch, the OS and the C libraries under them take counts
#: (threads, processes, steps, sizes) as C ints, and a larger one fails deep inside them.
INT_MAX = 2**31 - 1
INT_WHY = "a count must fit a C int"
#: CPU threads or processes per training process: more than this many per core only thrashes, and tens
#: of thousands exhaust the machine's threads before a step runs.
CORES = os.cpu_count() or 1
THREADS_PER_CORE = 4
MAX_THREADS = THREADS_PER_CORE * CORES
THREADS_WHY = f"at most {THREADS_PER_CORE} × the {CORES} CPU cores of this machine"
#: A collective that waits longer than this for the other ranks is a hung job, not a slow one; the
#: process group needs a finite timeout it can turn into a deadline.
MAX_TIMEOUT_S = 30 * 24 * 3600.0
TIMEOUT_WHY = "30 days; a longer wait for the other ranks is a hung job"


def _number(default: float, **range_: Any) -> Any:
    if isinstance(default, int) and "high" not in range_:
        range_ |= {"high": INT_MAX, "why": INT_WHY}
    return field(default=default, metadata={"range": Range(**range_)})


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class StrategyConfig:
    #: auto | single | ddp | dp | fsdp. auto picks ddp when the job has more than one process, else single.
    name: str = _choice("auto", STRATEGIES)
    #: DDP: size of a gradient all-reduce bucket in MiB (torch's default is 25).
    bucket_cap_mb: float = _number(25.0, low=0, open_low=True)
    #: DDP: let gradients be views into the all-reduce buckets (saves one copy and memory per step).
    gradient_as_bucket_view: bool = True
    #: DDP: the autograd graph is the same every step (lets DDP skip per-step graph bookkeeping).
    static_graph: bool = False
    #: DDP: search for parameters that got no gradient (needed only by models with unused branches).
    find_unused_parameters: bool = False
    #: FSDP: the modules sharded one by one, before the root: class names (GPT2Block) or module names
    #: (transformer.h.0), fnmatch patterns allowed (transformer.h.*). Empty: the children of every
    #: nn.ModuleList, and of every nn.Sequential of two or more modules of one class (a model's layers).
    fsdp_blocks: list[str] = field(default_factory=list)
    #: FSDP: free a block's gathered parameters after its forward and gather them again for backward
    #: (less memory, one more all-gather per block and step). Between the micro-steps of an accumulation
    #: window the parameters stay gathered either way: accumulation adds no communication.
    reshard_after_forward: bool = True
    #: FSDP: replica groups (HSDP). 1 shards over every process; R > 1 makes a 2-D mesh of R replicas ×
    #: (processes ÷ R) shards: parameters are sharded inside a group and gradients all-reduced across the
    #: groups. Across nodes use one replica per node (R = the number of nodes): the all-gathers of every
    #: block stay inside a node, and only one gradient all-reduce per step crosses the network.
    replicate: int = _number(1, low=1)
    #: none | full | selective: recompute blocks' activations in backward instead of keeping them from
    #: the forward (torch.utils.checkpoint, non-reentrant, with the RNG state kept so dropout recomputes
    #: the same numbers). full: every block; selective: every other block (the first, third, ...), half
    #: the memory saved for half the recompute. The blocks are strategy.fsdp_blocks' (under any strategy).
    activation_checkpointing: str = _choice("none", CHECKPOINTING)
    #: FSDP: build the model on the meta device (no memory, no weights) on every process but rank 0, which
    #: builds it as the model's __init__ says; once sharded, every rank's shards (and buffers) get rank
    #: 0's weights. false: every process builds it in full (a model that cannot be built on meta).
    meta_init: bool = True


@dataclass
class LauncherConfig:
    #: local | torchrun | multinode | slurm: where the training processes run.
    name: str = _choice("local", LAUNCHERS)
    #: Print the exact command (or sbatch script) that would run, and start nothing.
    dry_run: bool = False
    #: torchrun/multinode/slurm: worker processes per node (GPUs per node on a GPU machine).
    nproc_per_node: int = _number(1, low=1)
    #: multinode: number of machines in the job.
    nnodes: int = _number(1, low=1)
    #: multinode: this machine's index, 0 .. nnodes-1 (node 0 hosts the rendezvous store).
    node_rank: int = _number(0, low=0)
    #: multinode: HOST:PORT of the c10d rendezvous store, reachable from every node.
    rdzv_endpoint: str = ""
    #: multinode: a job id shared by all nodes of one job (keeps two jobs on one endpoint apart).
    rdzv_id: str = "disttrain"
    #: multinode: this node's own address as the other nodes reach it ("" lets torchrun use the hostname).
    local_addr: str = ""
    #: torchrun: how often torchrun restarts a failed worker group (each restart resumes from a snapshot).
    max_restarts: int = _number(0, low=0)
    #: slurm: number of nodes to ask for (one srun task per node, each running torchrun).
    nodes: int = _number(1, low=1)
    #: slurm: GPUs per node to ask for (0 on CPU clusters); also the number of workers per node when > 0.
    gpus_per_node: int = _number(0, low=0)
    #: slurm: CPU cores per task (per node, since there is one task per node).
    cpus_per_task: int = _number(1, low=1)
    #: slurm: partition to submit to ("" uses the cluster's default).
    partition: str = ""
    #: slurm: the job's time limit, as sbatch takes it (e.g. 01:00:00).
    time: str = "01:00:00"
    #: slurm: account to charge ("" leaves it to the cluster's default).
    account: str = ""
    #: slurm: signal sent before the time limit; the trainer snapshots and requeues on it.
    signal: str = "USR2"
    #: slurm: how many seconds before the time limit that signal comes.
    signal_seconds: int = _number(120, low=0)
    #: slurm: block until the job ends and exit with its exit code.
    wait: bool = False
    #: slurm: further `#SBATCH` lines, e.g. ["--qos=high", "--constraint=a100"].
    sbatch_args: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    #: Passes over the training split. The run ends at max_epochs or max_steps, whichever comes first.
    max_epochs: int = _number(5, low=1)
    #: Optimizer steps after which the run ends (0: no limit).
    max_steps: int = _number(0, low=0)
    #: Samples per micro-batch on each process (the global batch is batch_size × accumulate × processes).
    batch_size: int = _number(64, low=1)
    #: Micro-batches whose gradients add up into one optimizer step.
    accumulate: int = _number(1, low=1)
    #: Samples per optimizer step on all processes together (0: batch_size × accumulate × processes). Set
    #: it to keep the global batch when the number of processes changes, e.g. on a resume: accumulate
    #: then follows, global_batch_size ÷ (processes × batch_size), which must be a whole number.
    global_batch_size: int = _number(0, low=0)
    #: Draw each epoch's order from (seed, epoch); false: the dataset's own order in every epoch (a corpus
    #: shuffled once beforehand, a curriculum).
    shuffle: bool = True
    #: Leave out the epoch's last optimizer step when fewer samples than a global batch are left for it.
    #: Off, that step takes exactly the samples that are left (never repeats), weighted by their items.
    drop_last: bool = False
    #: fp32 | bf16 | fp16. bf16 and fp16 run the forward under autocast; fp16 adds a GradScaler.
    precision: str = _choice("fp32", PRECISIONS)
    #: Clip the global gradient norm to this value before each step (0: off; the norm is still logged).
    grad_clip_norm: float = _number(1.0, low=0)
    #: Seed of model initialisation, data order and every RNG.
    seed: int = _number(2147483647, low=0, high=2**63 - 1)
    #: auto | cross_entropy | mse. auto takes the dataset's `loss` attribute, else cross_entropy.
    loss: str = _choice("auto", LOSSES)
    #: Share of the dataset held out for validation (the last samples; 0: no validation).
    val_fraction: float = _number(0.1, low=0, high=1, open_high=True)
    #: Validate every N optimizer steps (0: only at the end of each epoch).
    val_every_steps: int = _number(0, low=0)
    #: Stop after this many validations without improvement (0: never stop early).
    early_stop_patience: int = _number(0, low=0)
    #: DataLoader worker processes per training process.
    num_workers: int = _number(0, low=0, high=MAX_THREADS, why=THREADS_WHY)
    #: Intra-op CPU threads per process (0: leave torch's default). Fix it to compare runs bit for bit:
    #: torchrun sets OMP_NUM_THREADS=1 only when it starts more than one process on a node.
    num_threads: int = _number(0, low=0, high=MAX_THREADS, why=THREADS_WHY)
    #: auto | cpu | cuda. auto takes the GPU of this process's local rank when CUDA is available.
    device: str = _choice("auto", DEVICES)
    #: Seconds a collective may wait for the other ranks before the job fails (init_process_group timeout).
    timeout_s: float = _number(600.0, low=1, high=MAX_TIMEOUT_S, why=TIMEOUT_WHY)
    #: Print a progress line every N optimizer steps when stdout is not a terminal (on a terminal rank 0
    #: draws a tqdm bar instead).
    log_every_steps: int = _number(200, low=1)
    #: Compile the model with torch.compile (any strategy; nn.Module.compile, so state-dict keys do not
    #: change). Needs a C++ compiler (g++, or $CXX). The compile cache is TORCHINDUCTOR_CACHE_DIR,
    #: ~/.cache/disttrain/inductor unless set: a second run of the same model starts in seconds.
    compile: bool = False
    #: Peak dense TFLOP/s of one device at the run's precision, for MFU in metrics.jsonl (0: look the GPU
    #: up in disttrain.metrics.PEAK_TFLOPS; no MFU on CPU or an unknown GPU unless set here). MFU needs a
    #: model that declares `flops_per_sample` (a number, or a method with no arguments).
    peak_tflops: float = _number(0.0, low=0)


@dataclass
class OptimConfig:
    #: sgd | adamw.
    name: str = _choice("sgd", OPTIMIZERS)
    #: Peak learning rate.
    lr: float = _number(0.1, low=0, open_low=True)
    #: sgd: momentum.
    momentum: float = _number(0.9, low=0, high=1, open_high=True)
    #: Decoupled weight decay (adamw) or L2 penalty (sgd).
    weight_decay: float = _number(0.0, low=0)
    #: adamw: the two beta coefficients, each in [0, 1).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    #: constant | cosine (cosine decays to min_lr_ratio × lr over the whole run).
    schedule: str = _choice("constant", SCHEDULES)
    #: Optimizer steps of linear warm-up from 0 to lr.
    warmup_steps: int = _number(0, low=0)
    #: cosine: the floor, as a fraction of lr.
    min_lr_ratio: float = _number(0.1, low=0, high=1)


@dataclass
class SnapshotConfig:
    #: Write a snapshot every N optimizer steps (0: only at the end of each epoch and of the run).
    every_steps: int = _number(0, low=0)
    #: How many verified snapshots to keep; older ones are deleted, the newest good one never.
    keep_last: int = _number(2, low=1)


@dataclass
class HealthConfig:
    """What the global gradient norm (after the all-reduce, before clipping; the same on every rank)
    decides. Non-finite norms always skip the step and count in `skipped_steps` (fp16's GradScaler
    steps included)."""

    #: warn | skip | halve_lr: what an explosion does (a norm above explosion_factor ×
    #: trainer.grad_clip_norm; detection needs clipping on). warn: log it, clip and step as usual.
    #: skip: do not step. halve_lr: clip and step, and after `patience` explosions in a row halve the
    #: learning rate (its schedule's base) for the rest of the run.
    on_explosion: str = _choice("warn", ON_EXPLOSION)
    #: An explosion is a norm above this many times trainer.grad_clip_norm (the seed's SafeOptimizer: 10).
    explosion_factor: float = _number(10.0, low=1)
    #: halve_lr: explosions in a row that halve the learning rate (the count then starts again).
    patience: int = _number(5, low=1)
    #: Write each module's gradient norm into metrics.jsonl (`grad_flow`) every N steps (0: never).
    grad_flow_every: int = _number(0, low=0)
    #: Optimizer steps skipped in a row (non-finite gradients, explosions under on_explosion=skip, windows
    #: without loss items) after which the run stops as diverged (summary `stopped: diverged`, exit 3)
    #: with a snapshot of its last finite weights, instead of running on without training (0: never
    #: stop). Under fp16 each skip also halves GradScaler's scale: 10 in a row is a scale 1024 times
    #: smaller that still overflows.
    max_skipped_steps: int = _number(10, low=0)


@dataclass
class LoggerConfig:
    #: none | wandb: wandb adds the wandb logger (disttrain.loggers.Wandb), in Python too. Only rank 0
    #: logs. The wandb run id is kept in run_dir and in every snapshot, so a resumed, restarted or
    #: requeued job continues the same run. The other loggers are callbacks: `logger=tensorboard`,
    #: `csv`, `mlflow`, or several, `logger=[tensorboard,csv,mlflow,wandb]`.
    name: str = _choice("none", LOGGERS)
    #: wandb: project name.
    project: str = "disttrain"
    #: wandb: online | offline | disabled.
    mode: str = _choice("offline", WANDB_MODES)


@dataclass
class TrainConfig:
    #: Names the experiment; part of the default run_dir.
    name: str = "default"
    #: Where config, metrics, snapshots and summary go. Running again with the same run_dir resumes.
    #: `${run_id:}` is one value for every process of a job (see `run_id`), the same after a requeue.
    run_dir: str = "runs/${name}/${run_id:}"
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    #: `_target_` (a class or function returning an nn.Module) and its keyword arguments. Empty when the
    #: model is built in Python and handed to the Trainer.
    model: dict[str, Any] = field(default_factory=dict)
    #: `_target_` (a class or function returning a map-style Dataset) and its keyword arguments. Empty
    #: when the dataset is built in Python.
    data: dict[str, Any] = field(default_factory=dict)
    #: `_target_` of a step function `step(model, batch, **kwargs) -> loss | StepOutput` and its keyword
    #: arguments (disttrain.step has the contract). Empty: the default step calls the model as the batch
    #: says.
    step: dict[str, Any] = field(default_factory=dict)
    #: Callbacks by name, each `_target_` (a class or function returning the callback) and its keyword
    #: arguments (disttrain.callbacks has the events); null turns one off, such as an experiment's.
    callbacks: dict[str, Any] = field(default_factory=dict)


# ==== run ids =============================================================================================

_JOB_ID = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{secrets.token_hex(3)}"


def run_id(environ: typing.Mapping[str, str] = os.environ) -> str:
    """A name for this run that every process of one job agrees on, also after a restart or requeue:
    the SLURM job id (array task included), else torchrun's rendezvous id, else the start time with a
    random suffix (jobs started in the same second never share a run dir)."""
    if "SLURM_ARRAY_JOB_ID" in environ:
        return f"slurm-{environ['SLURM_ARRAY_JOB_ID']}_{environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    if "SLURM_JOB_ID" in environ:
        return f"slurm-{environ['SLURM_JOB_ID']}"
    if environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{environ['TORCHELASTIC_RUN_ID']}"
    return _JOB_ID


def register_resolvers() -> None:
    """`${run_id:}` in configs (run_dir's default): Hydra composition and frozen configs alike."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("run_id", run_id, replace=True)


# ==== loading: types and unknown keys ====================================================================


def _fail(key: str, value: Any, rule: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {rule}")


def _field_type(key: str) -> Any:
    """The annotation of the dotted `key` in TrainConfig, or None when it is not a schema field."""
    cls: Any = TrainConfig
    annotation: Any = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        annotation = cls = hints[part]
    return annotation


_TYPE_RULES = {int: "must be an integer", float: "must be a number", bool: "must be true or false"}


def type_rule(key: str) -> str:
    """What a value of the schema field `key` must be, in words."""
    annotation = _field_type(key)
    if annotation in _TYPE_RULES:
        return _TYPE_RULES[annotation]
    if dataclasses.is_dataclass(annotation) or typing.get_origin(annotation) is dict:
        return "must be a mapping"
    if typing.get_origin(annotation) is list:
        return "must be a list"
    return "must be a string"


def known_keys(parent: str) -> list[str]:
    """The schema's keys under `parent` (for a spelling hint)."""
    annotation = _field_type(parent) if parent else TrainConfig
    return [f.name for f in dataclasses.fields(annotation)] if dataclasses.is_dataclass(annotation) else []


def unknown_key(key: str, value: Any, candidates: list[str] | None = None) -> ConfigError:
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, known_keys(parent) if candidates is None else candidates, n=1)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
    return ConfigError(f"{key}={value!r}: unknown key{hint}")


def _lookup(data: Any, key: str, missing: Any = None) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return missing
        data = data[part]
    return data


def omegaconf_error(e: Exception, data: Any = None) -> ConfigError:
    """OmegaConf's own type or key error as one of disttrain's lines."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    key = str(getattr(e, "full_key", "") or "")
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and "not in" in str(e):
        leaf = str(getattr(e, "key", "")) or key.rpartition(".")[2]
        key = key if key.endswith(leaf) else f"{key}.{leaf}".lstrip(".")
        return unknown_key(key, _lookup(data, key))
    if isinstance(e, ValidationError) and key:
        value = getattr(e, "value", None)
        return ConfigError(f"{key}={value!r}: {type_rule(key)}")
    return ConfigError(str(e).split("\n")[0])


def plain_dict(cfg: Any, throw_on_missing: bool = False) -> dict[str, Any]:
    """A config as plain dicts and lists: a DictConfig resolved (resolvers registered first), a dict as it
    is. ConfigError for anything that is no mapping (a YAML file that holds a list, say)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        register_resolvers()
        cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=throw_on_missing)
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, not a {type(cfg).__name__}")
    # A config's keys are names (to_container's type allows any DictConfig key: ints, enums...).
    return typing.cast(dict[str, Any], cfg)


def load_config(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a plain dict (a composed or frozen config): types are checked and converted by
    OmegaConf against the schema; unknown keys and wrong types fail in one line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()  # run_dir's default holds ${run_id:}
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), data))
        assert isinstance(cfg, TrainConfig)  # to_object of a structured config: its dataclass
        return cfg
    except OmegaConfBaseException as e:
        raise omegaconf_error(e, data) from None


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def checked(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """`cfg` as the CLI would have built it: a config built in Python gets the same type checks and
    conversions (a string "4" for an int field, say), then the same rules for its values and for a job
    of `world_size` processes (the Python API builds its own model and data: no `_target_`s)."""
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"cfg={type(cfg).__name__}: must be a disttrain.TrainConfig")
    cfg = load_config(to_dict(cfg))
    validate_values(cfg)
    _validate_world(cfg, world_size)
    return cfg


# ==== the rules ===========================================================================================


def _check_fields(obj: Any, prefix: str) -> None:
    """Every number within its range, every choice among its options, recursively."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{key}.")
        elif (range_ := f.metadata.get("range")) is not None and not range_.holds(value):
            _fail(key, value, range_.rule(value) if math.isfinite(value) else "must be a finite number")
        elif (choices := f.metadata.get("choices")) is not None and value not in choices:
            _fail(key, value, f"must be one of {', '.join(choices)}")


def validate_values(cfg: TrainConfig) -> None:
    """The rules the values themselves say (no job shape, no imports, no machine): shared by the CLI and
    the Python API."""
    _check_fields(cfg, "")
    t, o, h = cfg.trainer, cfg.optim, cfg.health
    if not str(cfg.run_dir).strip():
        _fail("run_dir", cfg.run_dir, "must name a directory (empty would write the run into this one)")
    if len(o.betas) != 2 or not all(Range(0, 1, open_high=True).holds(b) for b in o.betas):
        _fail("optim.betas", o.betas, "must be two numbers in [0, 1)")
    if t.early_stop_patience and not t.val_fraction:
        _fail("trainer.early_stop_patience", t.early_stop_patience, "needs trainer.val_fraction > 0")
    if h.on_explosion != "warn" and not t.grad_clip_norm:
        _fail(
            "health.on_explosion",
            h.on_explosion,
            "needs trainer.grad_clip_norm > 0 (an explosion is a norm above "
            "health.explosion_factor × trainer.grad_clip_norm)",
        )
    if cfg.logger.name == "wandb" and importlib.util.find_spec("wandb") is None:
        _fail("logger", "wandb", "needs the wandb package: pip install 'disttrain[wandb]'")


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Every rule of a job the CLI launches: the values, the job's shape, and the model's and data's
    `_target_`s with their arguments. Raises ConfigError with one line on the first broken rule."""
    world_size = world_size_of(cfg) if world_size is None else world_size
    validate_values(cfg)
    _validate_world(cfg, world_size)
    _validate_launcher(cfg.launcher)
    for group in ("model", "data"):
        if not getattr(cfg, group):
            _fail(group, {}, f"needs a _target_ (choose an option: {group}=NAME, or set {group}._target_)")
    resolve_target("model", cfg.model)
    if cfg.step:
        resolve_target("step", cfg.step)
    for name, spec in cfg.callbacks.items():
        if spec is None:
            continue
        if not isinstance(spec, dict):
            _fail(f"callbacks.{name}", spec, "must be a mapping with a _target_, or null to turn it off")
        resolve_target(f"callbacks.{name}", spec)
    _, data_kwargs = resolve_target("data", cfg.data)
    for key, value in data_kwargs.items():
        # Dataset arguments that name a file are checked here, where the error is cheap and early (a
        # glob or a list of files is the dataset's to check).
        names_file = key == "path" or key.endswith(("_path", "_file"))
        if names_file and isinstance(value, str) and not glob.has_magic(value) and not Path(value).is_file():
            _fail(f"data.{key}", value, "no such file")


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


def accumulate_for(trainer: TrainerConfig, world_size: int) -> int:
    """Micro-batches per optimizer step for a job of `world_size` processes: trainer.accumulate, or what
    trainer.global_batch_size leaves for it (see TrainerConfig; validate_world checks that it divides)."""
    if trainer.global_batch_size:
        return trainer.global_batch_size // (world_size * trainer.batch_size)
    return trainer.accumulate


def global_batch(trainer: TrainerConfig, world_size: int) -> int:
    """Samples per optimizer step on all processes."""
    return world_size * trainer.batch_size * accumulate_for(trainer, world_size)


def _validate_world(cfg: TrainConfig, world_size: int) -> None:
    t = cfg.trainer
    if t.global_batch_size:
        if t.accumulate != 1:
            _fail(
                "trainer.accumulate",
                t.accumulate,
                "set either trainer.accumulate or trainer.global_batch_size (which derives accumulate)",
            )
        per_micro_batch = world_size * t.batch_size
        if t.global_batch_size % per_micro_batch:
            rule = f"{_processes(world_size)} × trainer.batch_size {t.batch_size} = {per_micro_batch}"
            _fail("trainer.global_batch_size", t.global_batch_size, f"must be a multiple of {rule}")
    name = cfg.strategy.name
    if name == "ddp" and world_size == 1:
        _fail(
            "strategy",
            name,
            "ddp needs more than one process; launch with torchrun "
            "(launcher=torchrun launcher.nproc_per_node=N) or use strategy=single",
        )
    if name == "fsdp" and world_size == 1:
        _fail(
            "strategy",
            name,
            "shards the model over the job's processes, and this job has 1; launch with torchrun "
            "(launcher=torchrun launcher.nproc_per_node=N)",
        )
    replicate = cfg.strategy.replicate
    if replicate > 1 and name != "fsdp":
        _fail("strategy.replicate", replicate, f"needs strategy=fsdp (it is {name}): replicas of FSDP shards")
    if name == "fsdp" and world_size % replicate:
        _fail("strategy.replicate", replicate, f"must divide the job's {_processes(world_size)}")
    if name in ("single", "dp") and world_size > 1:
        _fail("strategy", name, f"runs in one process but this job has {world_size}; use strategy=ddp")


def _validate_launcher(launcher: LauncherConfig) -> None:
    """The job's shape and addresses as the values say them (what the machine has is the launchers'
    pre-flight, `disttrain.launch.preflight`)."""
    import signal

    if launcher.name == "multinode":
        if launcher.node_rank >= launcher.nnodes:
            _fail("launcher.node_rank", launcher.node_rank, f"must be in 0..{launcher.nnodes - 1}")
        host, _, port = launcher.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            _fail("launcher.rdzv_endpoint", launcher.rdzv_endpoint, "must be HOST:PORT, e.g. node0:29400")
    if launcher.name == "slurm" and f"SIG{launcher.signal}" not in signal.Signals.__members__:
        _fail("launcher.signal", launcher.signal, "must be a signal name without SIG, e.g. USR2")


# ==== resuming ============================================================================================

#: Config keys a resumed run must share with the run that wrote the snapshot: change any of them and
#: the snapshot no longer describes this run (shapes, data order, or the meaning of a step differ). The
#: number of processes, the micro-batch size and accumulation may change, as long as the global batch
#: (samples per optimizer step) stays: the data position is global (docs/design.md, contract 3).
RESUME_KEYS = (
    "model",
    "data",
    "step",
    "trainer.seed",
    "trainer.val_fraction",
    "trainer.drop_last",
    "trainer.shuffle",
    "trainer.precision",
    "trainer.loss",
    "optim.name",
)


def resume_mismatch(saved: dict[str, Any], cfg: TrainConfig, world_size: int) -> str | None:
    """One line naming what differs between a snapshot's manifest and this run, or None."""
    now, defaults = to_dict(cfg), to_dict(TrainConfig())
    saved_cfg = saved.get("config", {})
    before_world = int(saved.get("world_size", world_size))
    saved_trainer = load_config({"trainer": saved_cfg.get("trainer", {})}).trainer
    batch_then, batch_now = global_batch(saved_trainer, before_world), global_batch(cfg.trainer, world_size)
    if batch_then != batch_now:
        then, now_shape = _batch_shape(saved_trainer, before_world), _batch_shape(cfg.trainer, world_size)
        return (
            f"its optimizer steps took {batch_then} samples ({then}) and this job's take {batch_now} "
            f"({now_shape}); set trainer.global_batch_size={batch_then} to keep the global batch on "
            f"{_processes(world_size)}"
        )
    for key in RESUME_KEYS:
        if key in ("model", "data", "step") and not now[key]:
            continue  # built in Python: the objects are compared on load (a model's shapes)
        # A key the snapshot's config lacks is one added since it was written: its default then.
        before, after = _lookup(saved_cfg, key, _lookup(defaults, key)), _lookup(now, key)
        if isinstance(before, dict) and isinstance(after, dict):
            for sub in sorted(set(before) | set(after)):
                if before.get(sub) != after.get(sub):
                    key, before, after = f"{key}.{sub}", before.get(sub), after.get(sub)
                    break
        if before != after:
            return f"{key} was {before!r} when the snapshot was written and is {after!r} now"
    return None


def _processes(n: int) -> str:
    return f"{n} process{'es' if n > 1 else ''}"


def _batch_shape(trainer: TrainerConfig, world_size: int) -> str:
    accumulate = accumulate_for(trainer, world_size)
    return f"{_processes(world_size)} × batch {trainer.batch_size} × accumulate {accumulate}"
