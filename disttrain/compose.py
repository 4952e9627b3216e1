"""Hydra composition: disttrain's own config groups (`disttrain/conf/`, shipped inside the package) over
the schema (`disttrain.config`), plus the user's config directories, into one validated TrainConfig.

The user's directories join Hydra's search path after disttrain's own (`--config-dir DIR`, as Hydra's
`-cd`, or `hydra.searchpath=[file://DIR]`): their groups and options stand beside the built-in ones and
their `experiment=` can override any default. An option of theirs with the name of a built-in one would
lose to it silently (Hydra takes the first match on the search path), so that is refused instead.

The compose API is used rather than `@hydra.main`: the app decides where the run dir is (rank 0's,
shared with every worker), writes Hydra's record of the run (`.hydra/`) once, never changes the working
directory, and turns every composition error into one line (exit 2).
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from disttrain.config import (
    ConfigError,
    TrainConfig,
    omegaconf_error,
    plain_dict,
    register_resolvers,
    resume_mismatch,
    unknown_key,
    validate,
    world_size_of,
)

CONF_DIR = Path(__file__).resolve().parent / "conf"
PRIMARY = "train"
GROUPS = ("strategy", "launcher", "model", "data", "logger", "experiment")


def register_schema() -> None:
    """Put the schema in Hydra's ConfigStore as `disttrain_schema`, the first entry of train.yaml's
    defaults (and of a user's own primary config that starts from disttrain's)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="disttrain_schema", node=TrainConfig)


def search_path(overrides: Sequence[str], config_dirs: Sequence[str | Path]) -> list[Path]:
    """The user's config directories: `--config-dir`s, then `hydra.searchpath` entries (file:// ones)."""
    dirs = [Path(d) for d in config_dirs]
    for override in overrides:
        if override.split("=", 1)[0] == "hydra.searchpath":
            from hydra.core.override_parser.overrides_parser import OverridesParser

            value = OverridesParser.create().parse_override(override).value()
            for entry in value if isinstance(value, list) else [value]:
                if isinstance(entry, str) and entry.startswith("file://"):
                    dirs.append(Path(entry.removeprefix("file://")))
    return dirs


def check_config_dirs(dirs: Sequence[Path]) -> None:
    """Each user directory exists, and none of its options shadows a built-in one."""
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"--config-dir={str(d)!r}: no such directory")
        if (d / f"{PRIMARY}.yaml").exists():
            raise ConfigError(
                f"--config-dir={str(d)!r}: {PRIMARY}.yaml would shadow disttrain's own primary config; "
                f"rename it (your options go in group directories, e.g. {d}/experiment/NAME.yaml)"
            )
        for group in GROUPS:
            for option in sorted((d / group).glob("*.yaml")):
                if (CONF_DIR / group / option.name).exists():
                    raise ConfigError(
                        f"--config-dir={str(d)!r}: {group}/{option.name} has the name of disttrain's "
                        f"built-in {group}={option.stem}, which would win over it; rename yours"
                    )


def group_options(group: str, dirs: Sequence[Path] = ()) -> list[str]:
    return sorted({p.stem for d in (CONF_DIR, *dirs) for p in (d / group).glob("*.yaml")})


def compose(overrides: Sequence[str], config_dirs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Compose train.yaml with the user's directories and overrides and resolve it: a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    overrides = list(overrides)
    dirs = search_path(overrides, config_dirs)
    check_config_dirs(dirs)
    if config_dirs:
        overrides = [o for o in overrides if o.split("=", 1)[0] != "hydra.searchpath"]
        paths = ",".join(f"'file://{d.absolute()}'" for d in dirs)
        overrides.append(f"hydra.searchpath=[{paths}]")
    register_schema()
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = hydra_compose(PRIMARY, overrides=overrides)
        return plain_dict(composed, throw_on_missing=True)
    except HydraException as e:
        raise _composition_error(e, overrides, dirs) from None
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key}: required, and has no value (set {e.full_key}=...)") from None
    except OmegaConfBaseException as e:  # a bad interpolation, a type clash while resolving
        raise omegaconf_error(e) from None


def _override_value(overrides: Sequence[str], key: str) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "")


def _composition_error(e: Exception, overrides: Sequence[str], dirs: Sequence[Path]) -> ConfigError:
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, option = e.missing_cfg_file.rsplit("/", 1)
        choices = ", ".join(e.options or group_options(group, dirs))
        where = f"conf/{group}/" + (" or your config dirs" if dirs else "")
        return ConfigError(f"{group}={option!r}: no such option in {where}; choose one of {choices}")
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        value = _override_value(overrides, key)
        parent = key.rpartition(".")[0]
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) or "not in struct" in str(cause):
            if parent in ("model", "data"):
                error = unknown_key(key, value, _composed_keys(parent, overrides, key, dirs))
                return ConfigError(f"{error} (to pass a new argument to the {parent} use +{key}={value})")
            return unknown_key(key, value)
        return omegaconf_error(cause)
    return ConfigError(" ".join(str(e).split("\n")[0:1]) or type(e).__name__)


def _composed_keys(parent: str, overrides: Sequence[str], failed: str, dirs: Sequence[Path]) -> list[str]:
    """The keys under `parent` once the other overrides are applied (a model's or dataset's arguments
    depend on the option chosen, so the schema cannot tell them)."""
    others = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != failed]
    try:
        node: Any = compose(others, dirs)
    except ConfigError:
        return []
    for part in parent.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return list(node) if isinstance(node, dict) else []


def check_job(cfg: TrainConfig) -> None:
    """Everything about a composed job that can fail because of the user's values, checked before
    anything starts: the config, the job's shape, the run dir, and whether an existing snapshot belongs
    to this run. (What the machine has is the launchers' pre-flight.)"""
    world_size = world_size_of(cfg)
    validate(cfg, world_size)
    check_callback_classes(cfg)
    from disttrain.worker import build_callbacks

    build_callbacks(cfg)  # their constructors check their values: built once here, then in each process
    check_run_dir(cfg, world_size)


def check_callback_classes(cfg: TrainConfig) -> None:
    """A callback class with a method named like an event that is none (a typo) is refused before any
    process starts; one built by a function is checked once it is built (the Trainer)."""
    from disttrain.callbacks import check_events
    from disttrain.config import resolve_target

    for name, spec in cfg.callbacks.items():
        if spec:
            target, _ = resolve_target(f"callbacks.{name}", spec)
            if isinstance(target, type):
                check_events(name, target)
                requires = getattr(target, "REQUIRES", None)  # a logger's package (disttrain.loggers)
                if requires and importlib.util.find_spec(requires[0]) is None:
                    raise ConfigError(
                        f"callbacks.{name}: {target.__name__} needs the {requires[0]} package: "
                        f"pip install 'disttrain[{requires[1]}]'"
                    )


def check_run_dir(cfg: TrainConfig, world_size: int) -> None:
    from disttrain.dist import placement
    from disttrain.metrics import check_log
    from disttrain.runlock import check_free
    from disttrain.snapshot import latest_manifest

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


def write_run_files(cfg: TrainConfig, overrides: Sequence[str]) -> Path:
    """Rank 0's record of the run: the frozen config, and Hydra's `.hydra/` (config and overrides)."""
    from omegaconf import OmegaConf

    from disttrain.snapshot import atomic_write, freeze_config

    hydra_dir = Path(cfg.run_dir) / ".hydra"
    freeze_config(cfg, hydra_dir / "config.yaml")
    text = OmegaConf.to_yaml(list(overrides))
    atomic_write(hydra_dir / "overrides.yaml", lambda f: f.write(text.encode()))
    return freeze_config(cfg, Path(cfg.run_dir) / "config.yaml")
