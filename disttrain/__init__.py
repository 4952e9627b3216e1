"""disttrain: train PyTorch models on one process, many GPUs or many machines, and resume bit-exactly.

The names below are imported on first use, so `disttrain` on the command line (composition, launch)
starts without importing torch where it need not."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Callback": "disttrain.callbacks",
    "CallbackError": "disttrain.callbacks",
    "RunView": "disttrain.callbacks",
    "ConfigError": "disttrain.config",
    "TrainConfig": "disttrain.config",
    "DistEnv": "disttrain.dist",
    "distributed": "disttrain.dist",
    "setup_distributed": "disttrain.dist",
    "Trainer": "disttrain.trainer",
    "build_model": "disttrain.strategy",
    "seed_everything": "disttrain.run_state",
    "StepOutput": "disttrain.step",
    "run": "disttrain.cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'disttrain' has no attribute {name!r}")
