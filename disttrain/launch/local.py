"""launcher=local: train in this very process (world size 1, gloo on CPU or the one visible GPU)."""

from __future__ import annotations

import shlex
import sys

from disttrain.config import TrainConfig


def run_local(cfg: TrainConfig, overrides: list[str]) -> int:
    from disttrain.cli import write_run_files
    from disttrain.runlock import hold
    from disttrain.worker import stop_line, stopped_by, train

    if cfg.launcher.dry_run:
        print(shlex.join([sys.executable, "-m", "disttrain", *overrides]))
        return 0
    with hold(cfg.run_dir):  # before the first run file: a second job here is refused, touching nothing
        write_run_files(cfg, overrides)
        summary = train(cfg)
    if (signum := stopped_by(summary)) is not None:
        print(stop_line(summary), file=sys.stderr, flush=True)
        return 128 + signum
    print(
        f"done: {summary['steps']} steps ({summary['stopped']}), final loss {summary['final_loss']:.4f}, "
        f"run dir {cfg.run_dir}"
    )
    return 0
