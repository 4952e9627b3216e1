"""`disttrain`: the command line over Hydra's composition of disttrain's configs (and yours).

    disttrain [OVERRIDE ...]               train where `launcher=` says (local by default)
    disttrain -m OVERRIDE=A,B ...          a sweep: one job per combination, one after the other
                                           (launcher=slurm: one SLURM job each), then one table
    disttrain --cfg [OVERRIDE ...]         print the composed, resolved config and exit
    disttrain -cd DIR ... | --config-dir DIR
                                           add your own config groups and options (DIR/model/*.yaml,
                                           DIR/experiment/*.yaml, ...) beside the built-in ones
    disttrain check [OVERRIDE ...]         compare one step's gradients under every strategy
    disttrain plot RUN_DIR ... [-o F]      plot loss, grad norm and throughput of runs
    disttrain export RUN_DIR [-o F]        the newest snapshot's model as one torch.save file
    disttrain tokenize TEXT ... -o F.bin   text into a flat token file for data=token_file

Examples:
    disttrain                                                    # one process, gloo on CPU
    disttrain launcher=torchrun launcher.nproc_per_node=2        # DDP, torchrun started for you
    torchrun --nproc-per-node=2 -m disttrain strategy=ddp        # DDP, torchrun started by you
    disttrain experiment=regression trainer.precision=bf16
    disttrain -m optim.lr=0.1,0.03 trainer.seed=1,2              # 4 jobs
    disttrain --config-dir conf experiment=big                   # your conf/experiment/big.yaml
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from disttrain.compose import GROUPS, check_job, compose, group_options, write_run_files
from disttrain.config import ConfigError, TrainConfig, load_config, plain_dict, to_yaml
from disttrain.snapshot import SnapshotError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, like every other bad input
        raise ConfigError(message)


def _parse(args: Sequence[str]) -> argparse.Namespace:
    parser = _Parser(prog="disttrain", add_help=False)
    parser.add_argument("--cfg", action="store_true")
    parser.add_argument("-m", "--multirun", action="store_true")
    parser.add_argument("-cd", "--config-dir", action="append", default=[])
    parser.add_argument("overrides", nargs="*")
    return parser.parse_intermixed_args(args)


def run(cfg: Any, overrides: Sequence[str] = ()) -> int:
    """Run the job a composed config describes, as the command line does: where `launcher=` says, or as
    one rank when this process was started by torchrun or srun. `cfg` is a TrainConfig, a plain dict or
    the DictConfig a user's own `@hydra.main` app receives (docs/configuration.md). Returns the exit code."""
    from disttrain.dist import placement

    if not isinstance(cfg, TrainConfig):
        cfg = load_config({k: v for k, v in plain_dict(cfg).items() if k != "hydra"})
    check_job(cfg)
    where = placement()
    if where.launched_by != "python":
        # Started by torchrun or srun: this process is one rank; rank 0 records the run.
        from disttrain.runlock import acquire
        from disttrain.worker import build_dataset, finish, train

        dataset = build_dataset(cfg, where.world_size)
        if where.rank == 0:
            acquire(cfg.run_dir)  # this job's run dir until the process exits
            write_run_files(cfg, overrides)
        return finish(train(cfg, dataset))
    from disttrain.launch import launch, preflight

    preflight(cfg)
    return launch(cfg, list(overrides))


def print_help() -> None:
    print(__doc__.strip())
    for group in GROUPS:
        print(f"  {group}: {', '.join(group_options(group))}")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print_help()
        return 0
    if args and args[0] == "check":
        from disttrain.check import main as check_main

        return check_main(args[1:])
    if args and args[0] == "plot":
        from disttrain.plot import main as plot_main

        return plot_main(args[1:])
    if args and args[0] == "export":
        from disttrain.export import main as export_main

        return export_main(args[1:])
    if args and args[0] == "tokenize":
        from disttrain.tokenize import main as tokenize_main

        return tokenize_main(args[1:])
    from disttrain.dist import placement
    from disttrain.worker import BuildError, configure_logging

    configure_logging(placement().rank)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        # The `disttrain` command finds the user's own `_target_`s in the directory it runs from, as
        # `python -m disttrain` and torchrun's workers do (last, so nothing installed is shadowed).
        sys.path.append(str(Path.cwd()))
    try:
        opts = _parse(args)
        dirs = [Path(d) for d in opts.config_dir]
        if opts.cfg:
            print(to_yaml(load_config(compose(opts.overrides, dirs))), end="")
            return 0
        if opts.multirun:
            from disttrain.sweep import run_sweep

            return run_sweep(opts.overrides, dirs)
        return run(load_config(compose(opts.overrides, dirs)), opts.overrides)
    except (ConfigError, SnapshotError, BuildError) as e:
        print(f"disttrain: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt as e:  # Ctrl-C before training started, or a second one (worker.StopNow)
        message = str(e) or "interrupted by SIGINT; run the same command to resume"
        print(f"disttrain: {message}", file=sys.stderr)
        return 130
