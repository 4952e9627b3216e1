"""The entry every launched training process runs: `python -m disttrain.worker RUN_DIR/config.yaml`.

Workers read the config the launcher froze; they never compose Hydra configs themselves, so nothing is
resolved twice and no worker writes Hydra output or changes directory.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf

from disttrain.config import ConfigError, TrainConfig, load_config, to_dict
from disttrain.dist import distributed
from disttrain.snapshot import SnapshotError
from disttrain.trainer import Trainer, make_optimizer

log = logging.getLogger("disttrain")

#: Signals that mean "stop soon": SIGTERM (torchrun, SLURM at the time limit, preemption) and the
#: warning signal the sbatch script asks for (USR2 by default; USR1 too, for clusters configured so).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def read_config(path: Path) -> TrainConfig:
    """Load a frozen config; interpolations left in it (a SLURM run's `${run_id:}`) resolve here."""
    from disttrain.cli import register_resolvers

    register_resolvers()
    return load_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]


def build_trainer(cfg: TrainConfig, env: Any) -> Trainer:
    """Model, data and optimizer from the config's `_target_`s; every rank initialises from one seed."""
    dataset = instantiate(cfg.data)
    torch.manual_seed(cfg.trainer.seed)
    model = instantiate(cfg.model)
    return Trainer(model, make_optimizer(cfg.optim, model), dataset, cfg, env=env)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train in this process, as one rank of the job its environment describes."""
    with distributed(cfg.trainer.device, cfg.trainer.timeout_s) as env:
        if env.world_size > 1:
            # Every rank composed or read its own config; rank 0's is the run's (its run_dir above all).
            box = [to_dict(cfg)]
            dist.broadcast_object_list(box, src=0)
            cfg = load_config(box[0])
        trainer = build_trainer(cfg, env)
        for sig in STOP_SIGNALS:
            signal.signal(sig, trainer.request_stop)
        return trainer.fit()


def configure_logging(rank: int) -> None:
    logging.basicConfig(
        format="disttrain: %(message)s" if rank == 0 else f"disttrain[rank {rank}]: %(message)s",
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    from disttrain.dist import placement

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m disttrain.worker RUN_DIR/config.yaml", file=sys.stderr)
        return 2
    configure_logging(placement().rank)
    try:
        train(read_config(Path(args[0])))
    except (ConfigError, SnapshotError) as e:
        print(f"disttrain: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
