"""Single process, DistributedDataParallel, DataParallel and FSDP2 behind one small interface.

wrap(model)       the module the training step calls
unwrap(model)     the user's module (what snapshots save and hashes cover)
no_sync(model)    context for the non-final micro-steps of an accumulation window
sampler(dataset)  which samples this process sees (an EpochSampler in every case, so
                  `set_epoch` reshuffles the same way whatever the strategy)
autocast_dtype()  the dtype the forward runs under autocast in (None: no autocast)
make_scaler()     the gradient scaler (enabled for fp16 only)
shards_parameters the parameters are sharded (FSDP): the optimizer is rebound to them, and snapshots
                  go through torch.distributed.checkpoint
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from disttrain.config import ConfigError, StrategyConfig, TrainConfig, resolve_strategy
from disttrain.data import EpochSampler
from disttrain.dist import DistEnv, placement

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

log = logging.getLogger("disttrain")


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Strategy:
    name: ClassVar[str] = "single"
    shards_parameters: ClassVar[bool] = False

    def __init__(self, env: DistEnv, cfg: StrategyConfig | None = None, precision: str = "fp32") -> None:
        self.env = env
        self.cfg = cfg or StrategyConfig()
        self.precision = precision

    def wrap(self, model: nn.Module) -> nn.Module:
        checkpoint_blocks(model, self.cfg)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST.get(self.precision)

    def make_scaler(self) -> Any:
        return torch.amp.GradScaler(self.env.device.type, enabled=self.precision == "fp16")

    def sampler(
        self, dataset: Dataset, shuffle: bool, seed: int, pad: bool = False, length: int | None = None
    ) -> EpochSampler:
        """Rank r's share, perm[r::world], of one order of the whole dataset (EpochSampler)."""
        world, rank = self.env.world_size, self.env.rank
        return EpochSampler(dataset, world, rank, shuffle=shuffle, seed=seed, pad=pad, length=length)


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        checkpoint_blocks(model, self.cfg)
        cuda = self.env.device.type == "cuda"
        return DistributedDataParallel(
            model,
            device_ids=[self.env.device.index] if cuda else None,
            bucket_cap_mb=self.cfg.bucket_cap_mb,
            gradient_as_bucket_view=self.cfg.gradient_as_bucket_view,
            static_graph=self.cfg.static_graph,
            find_unused_parameters=self.cfg.find_unused_parameters,
        )

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        assert isinstance(model, DistributedDataParallel), "no_sync takes the model wrap returned"
        return model.no_sync()


class DataParallelStrategy(Strategy):
    name = "dp"

    def wrap(self, model: nn.Module) -> nn.Module:
        checkpoint_blocks(model, self.cfg)
        if torch.cuda.device_count() < 2:
            log.info(
                "strategy=dp: %s, so DataParallel runs the module as is in this one process",
                "no GPU on this machine" if not torch.cuda.is_available() else "only one GPU",
            )
        return nn.DataParallel(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.DataParallel) else model


class FSDPStrategy(Strategy):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): each block's parameters, gradients and optimizer
    state live in shards across the job's processes; a block's parameters are gathered for its forward
    and backward. The blocks are `strategy.fsdp_blocks` (class or module names, fnmatch patterns), by
    default the children of every nn.ModuleList (a transformer's layers); the root holds the rest
    (embeddings and a tied output layer stay together there). bf16/fp16 become FSDP2's
    MixedPrecisionPolicy (parameters in that dtype for compute, gradients reduced in fp32) instead of
    autocast; fp16 adds FSDP's ShardedGradScaler.

    Accumulation communicates once per optimizer step: on non-final micro-steps no reduce-scatter
    (set_requires_gradient_sync(False)) and no all-gather (parameters stay gathered between micro-steps:
    set_reshard_after_backward(False), and the blocks' set_reshard_after_forward(False)); the final
    micro-step reshards as `strategy.reshard_after_forward` says and reduce-scatters once.

    `strategy.replicate=R` (HSDP): a 2-D mesh of R replica groups × (processes ÷ R) shards; each group
    holds a whole copy of the model in shards, and gradients are reduce-scattered inside a group then
    all-reduced across groups."""

    name = "fsdp"
    shards_parameters = True

    def __init__(self, env: DistEnv, cfg: StrategyConfig | None = None, precision: str = "fp32") -> None:
        super().__init__(env, cfg, precision)
        self._blocks: list[FSDPModule] = []
        self._buffers: list[torch.Tensor] = []
        self._syncing = True  # False inside no_sync: the micro-steps before the window's last

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        checkpoint_blocks(model, self.cfg)  # (inside each block's forward: FSDP's gathers stay outside)
        full_state = rank0_full_state(model, self.env)
        replicas = self.cfg.replicate
        if replicas > 1:  # HSDP: fully_shard shards over the inner dimension and replicates over the outer
            shape = (replicas, self.env.world_size // replicas)
            mesh = init_device_mesh(self.env.device.type, shape, mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        dtype = _AUTOCAST.get(self.precision)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        self._blocks = [
            fully_shard(
                block, mesh=mesh, reshard_after_forward=self.cfg.reshard_after_forward, mp_policy=policy
            )
            for block in find_blocks(model, self.cfg.fsdp_blocks)
        ]
        # The root, which FSDP keeps gathered. fully_shard changes the module's class in place and returns
        # it: `model` is now both the nn.Module and the FSDPModule.
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if self.env.world_size > 1:
            fill_from_rank0(model, full_state, self.env)
        persistent = set(model.state_dict())
        self._buffers = [b for name, b in model.named_buffers() if name in persistent]
        if self._buffers:
            model.register_forward_pre_hook(self._sync_before_forward)
        return model

    def sync_buffers(self) -> None:
        """Every rank gets rank 0's buffers (BatchNorm's running statistics): FSDP shards parameters
        only, and leaves buffers to each rank. As DDP's broadcast_buffers does, before each forward
        that synchronises gradients; and before a snapshot, whose DCP write would otherwise keep any
        one rank's copy of a buffer (equal keys of plain tensors count as replicated)."""
        for buffer in self._buffers:
            dist.broadcast(buffer, src=0)

    def _sync_before_forward(self, module: nn.Module, _: Any) -> None:
        if self._syncing and module.training and torch.is_grad_enabled():
            self.sync_buffers()

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(model, FSDPModule), "no_sync takes the model wrap returned"
        self._syncing = False
        model.set_requires_gradient_sync(False)
        model.set_reshard_after_backward(False)
        for block in self._blocks:
            block.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            self._syncing = True
            model.set_requires_gradient_sync(True)
            model.set_reshard_after_backward(True)
            for block in self._blocks:
                block.set_reshard_after_forward(self.cfg.reshard_after_forward, recurse=False)

    def autocast_dtype(self) -> torch.dtype | None:
        return None  # FSDP2's MixedPrecisionPolicy casts the parameters instead

    def make_scaler(self) -> Any:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(self.env.device.type, enabled=self.precision == "fp16")


def on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def build_model(factory: Callable[[], nn.Module], cfg: TrainConfig, env: DistEnv | None = None) -> nn.Module:
    """`factory()` as this process of the job should build it: in full on rank 0 (the model's __init__
    initialises the weights, as in one process), and under strategy=fsdp (with strategy.meta_init) on
    the meta device on every other rank, where it takes no memory: the FSDP strategy shards it, then
    fills every rank's shards with rank 0's weights (`fill_from_rank0`). Seed before calling it, as
    for one process. ConfigError naming the module when the meta build leaves a tensor that rank 0's
    weights cannot reach (`check_meta_build`)."""
    where = env or placement()
    world_size, rank = where.world_size, where.rank
    if rank == 0 or not meta_init(cfg, world_size):
        return factory()
    with torch.device("meta"):
        model = factory()
    check_meta_build(model, f"model {type(model).__name__}")
    return model


def check_built(model: nn.Module, strategy: str, rank: int) -> None:
    """A model with tensors on the meta device (shapes, no values) trains only where rank 0's weights
    fill it: strategy=fsdp, on a rank other than 0. ConfigError otherwise, before any process group."""
    if not on_meta(model):
        return
    if strategy != "fsdp":
        rule = f"only strategy=fsdp fills such a model with rank 0's weights (this job's is {strategy})"
    elif rank == 0:
        rule = "rank 0 builds it in full: its weights are the ones every other rank gets"
    else:
        return
    raise ConfigError(
        f"model: {type(model).__name__} has tensors on the meta device (no values), and {rule}; "
        "build it with disttrain.build_model"
    )


def meta_init(cfg: TrainConfig, world_size: int) -> bool:
    """Whether a job builds its model on the meta device on every rank but rank 0 (see build_model)."""
    return resolve_strategy(cfg, world_size) == "fsdp" and cfg.strategy.meta_init and world_size > 1


def check_meta_build(model: nn.Module, key: str) -> None:
    """A model built on the meta device that rank 0's weights can fill: every tensor it holds is a
    parameter or a buffer (those are filled). A plain tensor attribute (`self.table = torch.arange(...)`
    in __init__) would stay on meta, without values: ConfigError naming its module."""
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                where = f"{name or 'the root'} ({type(module).__name__})"
                raise ConfigError(
                    f"{key}: cannot be built on the meta device for strategy=fsdp: {where} holds tensor "
                    f"{attr!r} that is neither a parameter nor a buffer, so rank 0 cannot send it; register "
                    "it with register_buffer, or set strategy.meta_init=false"
                )


def rank0_full_state(model: nn.Module, env: DistEnv) -> dict[str, Any]:
    """Rank 0's full state dict (references to its tensors, no copy), before the sharding replaces its
    parameters: what `fill_from_rank0` sends (rank 0's model is never on meta: `check_built`). Empty
    elsewhere."""
    if env.rank != 0 or env.world_size == 1:
        return {}
    return model.state_dict()


def fill_from_rank0(model: nn.Module, full_state: dict[str, Any], env: DistEnv) -> None:
    """Every rank's shards and buffers become rank 0's weights (`full_state`, rank 0's full state dict;
    empty elsewhere). A rank that built the model on meta first allocates its shards (uninitialised).
    torch's set_model_state_dict(broadcast_from_rank0) sends one tensor at a time, and each rank keeps
    its own shard of it: no rank but 0 ever holds the whole model. Buffers left out of the state dict
    (persistent=False: a rotary table computed in __init__) are broadcast too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if on_meta(model):
        model.to_empty(device=env.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in persistent:
            dist.broadcast(buffer, src=0)


def _is_layer_list(module: nn.Module) -> TypeGuard[nn.ModuleList | nn.Sequential]:
    """A list of a model's layers: an nn.ModuleList, or an nn.Sequential of 2+ modules of one class."""
    if isinstance(module, nn.ModuleList):
        return True
    children = list(module.children())
    return isinstance(module, nn.Sequential) and len(children) > 1 and len({type(c) for c in children}) == 1


def find_blocks(model: nn.Module, patterns: list[str]) -> list[nn.Module]:
    """The modules FSDP shards one by one: those whose class name or module name matches one of
    `patterns` (fnmatch), outermost only; with no patterns, the children of every nn.ModuleList.
    ConfigError naming a pattern that matches no module."""
    if not patterns:
        return [child for m in model.modules() if _is_layer_list(m) for child in m]
    found: list[tuple[str, nn.Module]] = []
    for pattern in patterns:
        matches = [
            (name, m)
            for name, m in model.named_modules()
            if name and (fnmatch.fnmatchcase(type(m).__name__, pattern) or fnmatch.fnmatchcase(name, pattern))
        ]
        if not matches:
            classes = ", ".join(sorted({type(m).__name__ for m in model.modules()}))
            rule = f"matches no module of {type(model).__name__} (its classes: {classes})"
            raise ConfigError(f"strategy.fsdp_blocks={pattern!r}: {rule}")
        found += matches
    names = sorted({name for name, _ in found})
    outermost = [n for n in names if not any(n.startswith(f"{o}.") for o in names if o != n)]
    modules = dict(model.named_modules())
    return [modules[n] for n in outermost]


def checkpoint_blocks(model: nn.Module, cfg: StrategyConfig) -> list[nn.Module]:
    """strategy.activation_checkpointing: the blocks (find_blocks) whose forward now runs under
    torch.utils.checkpoint, every one (full) or every other one (selective). The block's own forward is
    replaced on the instance, so its module path, parameter names and state-dict keys stay what they
    were (snapshots and gradients compare across settings), and hooks on the block (FSDP's all-gather)
    stay outside the recomputed region. ConfigError when the model has no blocks."""
    mode = cfg.activation_checkpointing
    if mode == "none":
        return []
    blocks = find_blocks(model, cfg.fsdp_blocks)
    if not blocks:
        rule = (
            f"finds no blocks in {type(model).__name__} (no nn.ModuleList, no nn.Sequential of 2+ modules "
            "of one class); name them with strategy.fsdp_blocks (class or module names)"
        )
        raise ConfigError(f"strategy.activation_checkpointing={mode!r}: {rule}")
    chosen = blocks if mode == "full" else blocks[::2]
    for block in chosen:
        if not isinstance(block.forward, functools.partial):  # (not twice: a model wrapped again)
            block.forward = functools.partial(_checkpointed, block.forward)
    return chosen


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def compiler_missing() -> str | None:
    """None when torch.compile can build its kernels here (a C++ compiler: g++, or $CXX), else why not."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler):
        return None
    return (
        f"torch.compile needs a C++ compiler and {compiler!r} is not on PATH "
        "(apt-get install g++, or set CXX)"
    )


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (Strategy, DDPStrategy, DataParallelStrategy, FSDPStrategy)
}


def make_strategy(
    name: str, env: DistEnv, cfg: StrategyConfig | None = None, precision: str = "fp32"
) -> Strategy:
    """`name` is a resolved strategy (single, ddp, dp or fsdp), see `config.resolve_strategy`."""
    return STRATEGIES[name](env, cfg, precision)
