"""Launchers decide where the training processes run. Each takes the validated config and the user's
overrides, writes the frozen config workers read, and starts (or, with `launcher.dry_run=true`, prints)
the real engine's command: this process, torchrun, or sbatch."""

from __future__ import annotations

from disttrain.config import TrainConfig


def launch(cfg: TrainConfig, overrides: list[str]) -> int:
    name = cfg.launcher.name
    if name == "local":
        from disttrain.launch.local import run_local

        return run_local(cfg, overrides)
    if name in ("torchrun", "multinode"):
        from disttrain.launch.torchrun import run_torchrun

        return run_torchrun(cfg, overrides)
    from disttrain.launch.slurm import submit

    return submit(cfg, overrides)
