"""Launchers decide where the training processes run. Each takes the validated config and the user's
overrides, writes the frozen config workers read, and starts (or, with `launcher.dry_run=true`, prints)
the real engine's command: this process, torchrun, or sbatch.

Before anything starts, `preflight` asks the machine what the values cannot say: whether CUDA and the
GPUs asked for are there, and for SLURM whether sbatch exists and the partition's nodes have the GPUs
(a dry run probes nothing on a cluster); for torchrun, whether the dataset fits the job."""

from __future__ import annotations

from disttrain.config import ConfigError, TrainConfig


def preflight(cfg: TrainConfig) -> None:
    """Machine probes for the launcher `cfg` names; ConfigError in one line when the machine cannot run
    the job as configured."""
    name = cfg.launcher.name
    if cfg.trainer.compile:
        from disttrain.strategy import compiler_missing

        if (missing := compiler_missing()) is not None:
            raise ConfigError(f"trainer.compile=True: {missing}")
    if cfg.strategy.name == "fsdp" or cfg.strategy.activation_checkpointing != "none":
        from disttrain.config import world_size_of
        from disttrain.worker import check_blocks

        check_blocks(cfg, world_size_of(cfg))
    if name == "slurm":
        from disttrain.launch.slurm import preflight as slurm_preflight

        slurm_preflight(cfg.launcher)
        return
    from disttrain.launch.local import device_preflight

    device_preflight(cfg.trainer, cfg.launcher.nproc_per_node if name != "local" else 1)
    if name != "local" and not cfg.launcher.dry_run:
        # Workers would each refuse a dataset too small for the job, in torchrun's many-line report.
        from disttrain.config import world_size_of
        from disttrain.worker import build_dataset

        build_dataset(cfg, world_size_of(cfg))


def launch(cfg: TrainConfig, overrides: list[str]) -> int:
    """Start the job `cfg` describes (after `preflight`)."""
    name = cfg.launcher.name
    if name == "local":
        from disttrain.launch.local import run_local

        return run_local(cfg, overrides)
    if name in ("torchrun", "multinode"):
        from disttrain.launch.torchrun import run_torchrun

        return run_torchrun(cfg, overrides)
    from disttrain.launch.slurm import run_slurm

    return run_slurm(cfg, overrides)
