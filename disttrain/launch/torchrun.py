"""launcher=torchrun (one node) and launcher=multinode (one torchrun agent per machine, c10d rendezvous).

The command is the one a user would type; `launcher.dry_run=true` prints it. Workers run
`python -m disttrain.worker RUN_DIR/config.yaml` and read the frozen config. The `disttrain` process
holds the run dir's lock (node 0's) and stays torchrun's parent until the job ends (launch.supervise:
signals passed on, nothing left behind).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from disttrain.compose import write_run_files
from disttrain.config import TrainConfig
from disttrain.snapshot import freeze_config


def torchrun_command(cfg: TrainConfig, config_path: Path) -> list[str]:
    launcher = cfg.launcher
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if launcher.name == "torchrun":
        cmd += ["--standalone", "--nnodes=1"]
    else:
        cmd += [
            f"--nnodes={launcher.nnodes}",
            f"--node-rank={launcher.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launcher.rdzv_endpoint}",
            f"--rdzv-id={launcher.rdzv_id}",
        ]
        if launcher.node_rank == 0:
            # Node 0 hosts the rendezvous store. torchrun guesses that only when the endpoint's host
            # is this machine's hostname, which it is not behind an IP address or an alias.
            cmd += ["--rdzv-conf", "is_host=1"]
        if launcher.local_addr:
            cmd += ["--local-addr", launcher.local_addr]
    cmd += [f"--nproc-per-node={launcher.nproc_per_node}", f"--max-restarts={launcher.max_restarts}"]
    return [*cmd, "-m", "disttrain.worker", str(config_path)]


def torchrun_env(cfg: TrainConfig) -> dict[str, str]:
    from disttrain.runlock import HELD_ENV, key_of

    # The run dir's lock is held by the launcher (node 0's): the workers must not take it themselves.
    env = dict(os.environ, **{HELD_ENV: str(key_of(cfg.run_dir))})
    if cfg.launcher.max_restarts:
        # Measured here: a restarted group that reuses the first attempt's TCPStore failed to connect
        # or hung in 7 of 9 restarts; a fresh store per attempt, 7 of 7 fine.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def run_torchrun(cfg: TrainConfig, overrides: list[str]) -> int:
    launcher = cfg.launcher
    name = "config.yaml" if launcher.node_rank == 0 else f".hydra/node{launcher.node_rank}.yaml"
    config_path = Path(cfg.run_dir) / name
    cmd = torchrun_command(cfg, config_path)
    if launcher.dry_run:
        print(shlex.join(cmd))
        return 0
    from disttrain.launch.supervise import supervise
    from disttrain.runlock import hold

    if launcher.node_rank == 0:
        with hold(cfg.run_dir):  # before the first run file: a second job here is refused, touching nothing
            write_run_files(cfg, overrides)
            return supervise(cmd, torchrun_env(cfg), Path(cfg.run_dir))
    freeze_config(cfg, config_path)  # the other nodes' workers need a config; rank 0 records the run
    return supervise(cmd, torchrun_env(cfg), Path(cfg.run_dir))
