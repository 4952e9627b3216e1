"""Single process, DistributedDataParallel and DataParallel behind one small interface.

wrap(model)       the module the training step calls
unwrap(model)     the user's module (what snapshots save and hashes cover)
no_sync(model)    context for the non-final micro-steps of an accumulation window
sampler(dataset)  which samples this process sees (a DistributedSampler in every case, so
                  `set_epoch` reshuffles the same way whatever the strategy)
"""

from __future__ import annotations

import contextlib
import logging
from typing import ClassVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from disttrain.config import StrategyConfig
from disttrain.data import EpochSampler
from disttrain.dist import DistEnv

log = logging.getLogger("disttrain")


class Strategy:
    name: ClassVar[str] = "single"

    def __init__(self, env: DistEnv, cfg: StrategyConfig | None = None) -> None:
        self.env = env
        self.cfg = cfg or StrategyConfig()

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def sampler(self, dataset: Dataset, shuffle: bool, seed: int) -> EpochSampler:
        # drop_last=False pads the last shard with repeats so every rank steps the same number of times.
        return EpochSampler(
            dataset,
            num_replicas=self.env.world_size,
            rank=self.env.rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
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
        return model.no_sync()


class DataParallelStrategy(Strategy):
    name = "dp"

    def wrap(self, model: nn.Module) -> nn.Module:
        if torch.cuda.device_count() < 2:
            log.info(
                "strategy=dp: %s, so DataParallel runs the module as is in this one process",
                "no GPU on this machine" if not torch.cuda.is_available() else "only one GPU",
            )
        return nn.DataParallel(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.DataParallel) else model


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Strategy, DDPStrategy, DataParallelStrategy)}


def make_strategy(name: str, env: DistEnv, cfg: StrategyConfig | None = None) -> Strategy:
    """`name` is a resolved strategy (single, ddp or dp), see `config.resolve_strategy`."""
    return STRATEGIES[name](env, cfg)
