"""`disttrain`: a Hydra app over `conf/train.yaml`.

    disttrain [OVERRIDE ...]           train where `launcher=` says (local by default)
    disttrain --cfg [OVERRIDE ...]     print the composed, resolved config and exit
    disttrain check [OVERRIDE ...]     compare one step's gradients under every strategy
    disttrain plot RUN_DIR ... [-o F]  plot loss, grad norm and throughput of runs

Examples:
    disttrain                                                    # one process, gloo on CPU
    disttrain launcher=torchrun launcher.nproc_per_node=2        # DDP, torchrun started for you
    torchrun --nproc-per-node=2 -m disttrain strategy=ddp        # DDP, torchrun started by you
    disttrain experiment=regression trainer.precision=bf16

The config is composed with Hydra's compose API rather than `@hydra.main`: the app decides where the
run dir is (rank 0's, shared with every worker), writes Hydra's record of the run (`.hydra/`) once, never
changes the working directory, and turns every composition error into one line (exit 2).
"""

from __future__ import annotations

import difflib
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from disttrain.config import ConfigError, TrainConfig, load_config, to_dict, validate, world_size_of
from disttrain.dist import placement
from disttrain.metrics import check_log
from disttrain.runlock import check_free
from disttrain.snapshot import SnapshotError, latest_manifest

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The start time, and a random suffix: two jobs started in the same second must not share a run dir.
_START = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{secrets.token_hex(3)}"


def run_id() -> str:
    """A name for this run that every process of one job agrees on, also after a restart or requeue:
    the SLURM job id (array task included), else torchrun's rendezvous id, else the start time with a
    random suffix (the launcher's: workers read the frozen config, and rank 0's is broadcast)."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    return _START


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_id", run_id, replace=True)


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _composition_error(e: Exception, overrides: list[str]) -> ConfigError:
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, option = e.missing_cfg_file.rsplit("/", 1)
        choices = ", ".join(e.options or _group_options(group))
        return ConfigError(f"{group}={option!r}: no such option in conf/{group}/; choose one of {choices}")
    cause = e.__cause__
    key = getattr(cause, "full_key", None)
    if key and "not in struct" in str(cause):
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "")
        parent, _, leaf = key.rpartition(".")
        known = _known_keys(parent, [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key])
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
        if parent in ("model", "data"):
            hint += f" (to pass a new argument to the {parent} use +{key}={value})"
        return ConfigError(f"{key}={value!r}: unknown key{hint}")
    return ConfigError(" ".join(str(e).split("\n")[0:1]) or type(e).__name__)


def _known_keys(parent: str, other_overrides: list[str]) -> list[str]:
    """The keys that exist under `parent` once the other overrides are applied (for a spelling hint)."""
    try:
        node: Any = compose(other_overrides)
    except ConfigError:
        node = to_dict(TrainConfig())
    for part in parent.split(".") if parent else []:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return list(node) if isinstance(node, dict) else []


def compose(overrides: list[str]) -> dict[str, Any]:
    """Compose conf/train.yaml with the user's overrides and resolve it: a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = hydra_compose("train", overrides=overrides)
        return OmegaConf.to_container(composed, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except HydraException as e:
        raise _composition_error(e, overrides) from None
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key}: required, and has no value (set {e.full_key}=...)") from None
    except Exception as e:  # omegaconf's own errors: a bad interpolation, a type clash
        raise ConfigError(str(e).split("\n")[0]) from None


def prepare(overrides: list[str]) -> TrainConfig:
    """Everything that can fail because of the user, checked before anything starts: the config's
    values, the job's shape, the run dir, and whether an existing snapshot belongs to this run."""
    cfg = load_config(compose(overrides))
    world_size = world_size_of(cfg)
    validate(cfg, world_size)
    check_run_dir(cfg, world_size)
    return cfg


def check_run_dir(cfg: TrainConfig, world_size: int) -> None:
    from disttrain.trainer import resume_mismatch

    run_dir = Path(cfg.run_dir)
    # Probe the nearest existing ancestor: a dry run or a refused job must not leave directories behind.
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".disttrain-write-test"):
            pass
    except OSError as e:
        raise ConfigError(f"run_dir={cfg.run_dir!r}: not writable ({e.strerror})") from None
    if placement().rank == 0:  # the rank that takes the lock and writes the run files
        if cfg.launcher.node_rank == 0:  # multinode: node 0's launcher holds it for every node
            check_free(run_dir)  # another job there comes first
        check_log(run_dir)
    manifest = latest_manifest(run_dir)
    if manifest is not None:
        mismatch = resume_mismatch(manifest, cfg, world_size)
        if mismatch:
            raise ConfigError(f"run_dir={cfg.run_dir!r}: cannot resume: {mismatch}")


def freeze_config(cfg: TrainConfig, path: Path) -> Path:
    """Write the resolved config that workers read (atomically: a worker never reads half of it)."""
    from disttrain.snapshot import atomic_write

    text = OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def write_run_files(cfg: TrainConfig, overrides: list[str]) -> Path:
    """Rank 0's record of the run: the frozen config, and Hydra's `.hydra/` (config and overrides)."""
    from disttrain.snapshot import atomic_write

    hydra_dir = Path(cfg.run_dir) / ".hydra"
    freeze_config(cfg, hydra_dir / "config.yaml")
    atomic_write(hydra_dir / "overrides.yaml", lambda f: f.write(OmegaConf.to_yaml(overrides).encode()))
    return freeze_config(cfg, Path(cfg.run_dir) / "config.yaml")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        for group in ("strategy", "launcher", "model", "data", "logger", "experiment"):
            print(f"  {group}: {', '.join(_group_options(group))}")
        return 0
    if args and args[0] == "check":
        from disttrain.check import main as check_main

        return check_main(args[1:])
    if args and args[0] == "plot":
        from disttrain.plot import main as plot_main

        return plot_main(args[1:])
    from disttrain.runlock import acquire
    from disttrain.worker import BuildError, configure_logging

    where = placement()
    configure_logging(where.rank)
    try:
        if args and args[0] == "--cfg":
            print(OmegaConf.to_yaml(to_dict(load_config(compose(args[1:])))), end="")
            return 0
        cfg = prepare(args)
        if where.launched_by != "python":
            # Started by torchrun or srun: this process is one rank; rank 0 records the run.
            if where.rank == 0:
                acquire(cfg.run_dir)  # this job's run dir until the process exits
                write_run_files(cfg, args)
            from disttrain.worker import finish, train

            return finish(train(cfg))
        from disttrain.launch import launch

        return launch(cfg, args)
    except (ConfigError, SnapshotError, BuildError) as e:
        print(f"disttrain: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt as e:  # Ctrl-C before training started, or a second one (worker.StopNow)
        message = str(e) or "interrupted by SIGINT; run the same command to resume"
        print(f"disttrain: {message}", file=sys.stderr)
        return 130
