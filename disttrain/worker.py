"""The entry every launched training process runs: `python -m disttrain.worker RUN_DIR/config.yaml`.

Workers read the config the launcher froze; they never compose Hydra configs themselves, so nothing is
resolved twice and no worker writes Hydra output or changes directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from disttrain.config import ConfigError, TrainConfig, load_config, register_resolvers, to_dict
from disttrain.data import training_splits
from disttrain.dist import distributed, placement
from disttrain.snapshot import SnapshotError, freeze_config
from disttrain.trainer import Trainer, make_optimizer

log = logging.getLogger("disttrain")

#: Signals that mean "stop soon": SIGTERM (torchrun, SLURM at the time limit, preemption) and the
#: warning signal the sbatch script asks for (USR2 by default; USR1 too, for clusters configured so).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def read_config(path: Path) -> TrainConfig:
    """Load a frozen config; interpolations left in it (a SLURM run's `${run_id:}`) resolve here."""
    register_resolvers()
    return load_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]


def build_dataset(cfg: TrainConfig, world_size: int) -> Dataset:
    """The config's dataset, refused in one line (ConfigError) when it is too small for a job of
    `world_size` processes: what a launcher checks before any process or run file exists."""
    dataset = instantiate(cfg.data)
    training_splits(dataset, None, cfg.trainer, world_size)
    return dataset


def build_trainer(cfg: TrainConfig, env: Any, dataset: Dataset | None = None) -> Trainer:
    """Model, data and optimizer from the config's `_target_`s; every rank initialises from one seed."""
    dataset = instantiate(cfg.data) if dataset is None else dataset
    torch.manual_seed(cfg.trainer.seed)
    model = instantiate(cfg.model)
    step = instantiate(cfg.step, _partial_=True) if cfg.step else None
    return Trainer(model, make_optimizer(cfg.optim, model), dataset, cfg, step=step, env=env)


def train(cfg: TrainConfig, dataset: Dataset | None = None) -> dict[str, Any]:
    """Train in this process, as one rank of the job its environment describes (on `dataset` when the
    caller built it already, see build_dataset)."""
    with distributed(cfg.trainer.device, cfg.trainer.timeout_s) as env:
        if env.world_size > 1:
            # Every rank composed or read its own config; rank 0's is the run's (its run_dir above all).
            box = [to_dict(cfg)]
            dist.broadcast_object_list(box, src=0)
            cfg = load_config(box[0])
        trainer = build_trainer(cfg, env, dataset)
        previous = {sig: signal.signal(sig, trainer.request_stop) for sig in STOP_SIGNALS}
        try:
            return trainer.fit()
        finally:
            # The handlers hold the trainer, whose DDP reducer holds the process group: a group still
            # alive at interpreter exit is freed there, and gloo then aborts the process.
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            del trainer


def slurm_job_to_requeue(environ: Any = os.environ) -> str | None:
    """The id `scontrol requeue` takes for this job: an array job's own task only, never the array."""
    if "SLURM_ARRAY_JOB_ID" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def finish(summary: dict[str, Any]) -> int:
    """What a rank does once fit() returned: inside a SLURM job that a signal stopped, rank 0 puts the
    job back in the queue; its next attempt resumes from the snapshot the stop just wrote.

    Exit code 0 after a successful requeue: SLURM ends this attempt itself, and a non-zero exit would make
    a torchrun with max_restarts restart the group inside an allocation that is going away. A requeue
    that cannot happen (no scontrol, a job that is not requeueable) is exit 1 with one line: the run is
    not done, and must not look done.
    """
    job = slurm_job_to_requeue()
    if not str(summary.get("stopped", "")).startswith("stopped by signal") or job is None:
        return 0
    if placement().rank != 0:
        return 0
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        print(
            f"disttrain: error: {summary['stopped']} at step {summary['steps']}, but cannot requeue "
            f"SLURM job {job}: scontrol not found on PATH",
            file=sys.stderr,
        )
        return 1
    res = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if res.returncode != 0:
        print(
            f"disttrain: error: {summary['stopped']} at step {summary['steps']}, but "
            f"`scontrol requeue {job}` failed: {res.stderr.strip() or res.stdout.strip()}",
            file=sys.stderr,
        )
        return 1
    print(
        f"disttrain: {summary['stopped']} at step {summary['steps']}: snapshot written, "
        f"SLURM job {job} requeued",
        file=sys.stderr,
        flush=True,
    )
    return 0


def configure_logging(rank: int) -> None:
    logging.basicConfig(
        format="disttrain: %(message)s" if rank == 0 else f"disttrain[rank {rank}]: %(message)s",
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m disttrain.worker RUN_DIR/config.yaml", file=sys.stderr)
        return 2
    where = placement()
    configure_logging(where.rank)
    try:
        cfg = read_config(Path(args[0]))
        if where.rank == 0:
            record_run(cfg, Path(args[0]))
        summary = train(cfg)
    except (ConfigError, SnapshotError) as e:
        print(f"disttrain: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    if where.local_rank == 0:
        # One line per node: each machine's log shows it finished, and with which parameters.
        steps, sha = summary["steps"], summary["params_sha256"]
        print(f"disttrain: rank {where.rank} done: {steps} steps, params_sha256 {sha}", flush=True)
    return finish(summary)


def record_run(cfg: TrainConfig, config_path: Path) -> None:
    """A config staged outside the run dir (sbatch's, whose run dir needs the job id) is recorded in the run
    dir once the job knows it, so every run dir holds the config that trained it."""
    run_config = Path(cfg.run_dir) / "config.yaml"
    if run_config.resolve() != config_path.resolve():
        freeze_config(cfg, run_config)


if __name__ == "__main__":
    sys.exit(main())
