"""launcher=local: train in this very process (world size 1, gloo on CPU or the one visible GPU).

It also holds the device probes every launcher that runs on this machine shares (local, torchrun,
multinode): whether CUDA, enough GPUs and bf16 are there."""

from __future__ import annotations

import shlex
import sys

from disttrain.compose import write_run_files
from disttrain.config import MAX_THREADS, THREADS_WHY, ConfigError, TrainConfig, TrainerConfig


def device_preflight(trainer: TrainerConfig, processes: int) -> None:
    """CUDA, GPUs for `processes` workers on this node, and bf16, as the config asks for them; CPU workers
    no more than the cores take."""
    import torch

    have = torch.cuda.device_count() if trainer.device != "cpu" else 0
    if not have and processes > MAX_THREADS:
        raise ConfigError(
            f"launcher.nproc_per_node={processes}: CPU workers must be at most {MAX_THREADS} ({THREADS_WHY})"
        )
    if trainer.device == "cpu":
        return  # bf16 and fp16 autocast both run on CPU; only a GPU can lack them
    if trainer.device == "cuda" and not have:
        raise ConfigError(f"trainer.device={trainer.device!r}: CUDA is not available on this machine")
    if have and processes > have:
        key = "launcher.nproc_per_node"
        raise ConfigError(f"{key}={processes}: this node has {have} GPU{'s' if have != 1 else ''}")
    if have and trainer.precision == "bf16" and not torch.cuda.is_bf16_supported():
        rule = "this GPU does not support bf16; use fp16"
        raise ConfigError(f"trainer.precision={trainer.precision!r}: {rule}")


def run_local(cfg: TrainConfig, overrides: list[str]) -> int:
    from disttrain.runlock import hold
    from disttrain.worker import DIVERGED_EXIT, build_dataset, diverged, stop_line, stopped_by, train

    if cfg.launcher.dry_run:
        print(shlex.join([sys.executable, "-m", "disttrain", *overrides]))
        return 0
    dataset = build_dataset(cfg, 1)  # refused before the run dir holds anything
    with hold(cfg.run_dir):  # before the first run file: a second job here is refused, touching nothing
        write_run_files(cfg, overrides)
        summary = train(cfg, dataset)
    if (signum := stopped_by(summary)) is not None:
        print(stop_line(summary), file=sys.stderr, flush=True)
        return 128 + signum
    if diverged(summary):  # the trainer's line has said why; it is not done
        return DIVERGED_EXIT
    print(
        f"done: {summary['steps']} steps ({summary['stopped']}), final loss {summary['final_loss']:.4f}, "
        f"run dir {cfg.run_dir}"
    )
    return 0
