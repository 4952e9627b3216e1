"""disttrain: train PyTorch models on one process, many GPUs or many machines, and resume bit-exactly."""

from disttrain.config import ConfigError, TrainConfig
from disttrain.dist import DistEnv, distributed, setup_distributed
from disttrain.trainer import Trainer

__all__ = ["ConfigError", "DistEnv", "TrainConfig", "Trainer", "distributed", "setup_distributed"]
__version__ = "0.1.0"
