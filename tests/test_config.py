"""The schema is the one source of defaults; every shipped option and experiment reaches the resolved
config; every number has a finite range; the Python API refuses what the CLI refuses."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
import yaml
from torch import nn

from disttrain import ConfigError, TrainConfig, Trainer
from disttrain.cli import main
from disttrain.compose import CONF_DIR, compose
from disttrain.config import Range, TrainerConfig
from disttrain.data import RandomRegression
from tests.support import NUMBERS, disttrain

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def flat(tree: dict, prefix: str = "") -> dict[str, typing.Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_value_an_experiment_sets_reaches_the_resolved_config(experiment: str) -> None:
    preset = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text())
    chosen = dict(next(iter(d.items())) for d in preset.pop("defaults", []) if isinstance(d, dict))
    resolved = flat(compose([f"experiment={experiment}"]))
    for key, value in flat(preset).items():
        assert resolved[key] == value, (experiment, key)
    for group_key, option in chosen.items():  # `override /model: gpt` picks model/gpt.yaml
        group = group_key.removeprefix("override /")
        option_values = flat(yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()), f"{group}.")
        assert resolved[f"{group}._target_"] == option_values[f"{group}._target_"]


def test_the_gpt_experiment_trains_what_it_says() -> None:
    # The bug this guards against: train.yaml's own values came after the experiment and won.
    cfg = compose(["experiment=gpt"])
    assert (cfg["name"], cfg["optim"]["name"], cfg["optim"]["lr"]) == ("gpt", "adamw", 0.001)
    assert (cfg["trainer"]["batch_size"], cfg["trainer"]["max_steps"]) == (16, 1000)


def schema_defaults(cls: type, prefix: str = "") -> dict[str, typing.Any]:
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(schema_defaults(type(default), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = default
    return out


@pytest.mark.parametrize("group", ["strategy", "launcher", "logger"])
def test_an_option_says_only_what_it_changes(group: str) -> None:
    defaults = schema_defaults(TrainConfig)
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        text = path.read_text()
        values = flat(yaml.safe_load(text) or {}, f"{group}.")
        if text.startswith("# @package _global_"):  # logger=csv and its kind: a callback, by name
            top = {f.name for f in dataclasses.fields(TrainConfig)}
            assert set(yaml.safe_load(text)) <= {"callbacks", *top}, f"{path.name} sets keys the schema lacks"
            continue
        repeated = {k: v for k, v in values.items() if k != f"{group}.name" and defaults.get(k) == v}
        assert not repeated, f"{path.name} repeats the schema's defaults: {repeated}"
        assert set(values) <= set(defaults), f"{path.name} sets keys the schema lacks"


def test_every_number_in_the_schema_has_a_range() -> None:
    assert len(NUMBERS) > 25
    missing = [key for key, f in NUMBERS if not isinstance(f.metadata.get("range"), Range)]
    assert not missing, f"numbers without a range: {missing}"


@pytest.mark.parametrize(("key", "field"), [(k, f) for k, f in NUMBERS if f.type == "float"], ids=lambda x: x)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_that_is_not_a_finite_number_is_refused(key, field, value, tmp_path, capsys) -> None:
    assert main([f"{key}={value}", f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"disttrain: error: {key}={float(value)!r}: must be a finite number\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("key", "field"), NUMBERS, ids=[k for k, _ in NUMBERS])
def test_a_number_below_its_range_is_refused(key, field, tmp_path, capsys) -> None:
    range_: Range = field.metadata["range"]
    if range_.low == -math.inf:
        pytest.fail(f"{key}: a number without a lower bound")
    below = range_.low if range_.open_low else range_.low - 1
    value = int(below) if field.type == "int" else float(below)
    assert main([f"{key}={value}", f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"disttrain: error: {key}={value!r}: {range_.rule()}\n"


@pytest.mark.slow
def test_nan_learning_rate_from_the_shell_is_one_line_and_trains_nothing(tmp_path) -> None:
    result = disttrain("optim.lr=nan", f"run_dir={tmp_path / 'run'}")
    assert (result.returncode, result.stderr) == (
        2,
        "disttrain: error: optim.lr=nan: must be a finite number\n",
    )
    assert not (tmp_path / "run").exists()


PYTHON_BAD = [
    ({"accumulate": 0}, "trainer.accumulate=0: must be at least 1"),
    ({"batch_size": "four"}, "trainer.batch_size='four': must be an integer"),
    ({"precision": "fp8"}, "trainer.precision='fp8': must be one of fp32, bf16, fp16"),
    ({"grad_clip_norm": math.nan}, "trainer.grad_clip_norm=nan: must be a finite number"),
]


@pytest.mark.parametrize(("values", "message"), PYTHON_BAD, ids=[m.split(":")[0] for _, m in PYTHON_BAD])
def test_python_api_refuses_what_the_cli_refuses_with_the_same_line(values, message, tmp_path) -> None:
    model = nn.Linear(20, 1)
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), trainer=TrainerConfig(**values))
    with pytest.raises(ConfigError) as e:
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), RandomRegression(size=64), cfg)
    assert str(e.value) == message
    assert not (tmp_path / "run").exists()


def test_python_api_converts_what_the_cli_would_convert(tmp_path) -> None:
    model = nn.Linear(20, 1)
    cfg = TrainConfig(
        run_dir=str(tmp_path), trainer=TrainerConfig(batch_size="8", val_fraction=0, max_steps=1)
    )
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), RandomRegression(size=64), cfg)
    assert trainer.cfg.trainer.batch_size == 8
    del trainer


def test_an_optimizer_over_another_models_parameters_is_refused(tmp_path) -> None:
    model, other = nn.Linear(20, 1), nn.Linear(20, 1)
    with pytest.raises(ConfigError) as e:
        Trainer(model, torch.optim.SGD(other.parameters(), lr=0.1), RandomRegression(size=64), TrainConfig())
    assert str(e.value) == (
        "optimizer: 2 of its 2 parameters are not the model's, so training would not change the model; "
        "build the optimizer from this model's parameters()"
    )


SMALL_DATA = [
    (["data.size=0"], "data: the dataset has no samples"),
    (
        ["data.size=20", "trainer.batch_size=32"],
        "data: the training split has 20 samples, fewer than one optimizer step takes "
        "(1 process × trainer.batch_size 32 × trainer.accumulate 1 = 32)",
    ),
    (
        ["data.size=5", "trainer.batch_size=1", "trainer.val_fraction=0.1"],
        "trainer.val_fraction=0.1: holds out no sample of the dataset's 5 (raise it, or set 0 to train "
        "without validation)",
    ),
    (
        ["data.size=12", "trainer.batch_size=8", "launcher=torchrun", "launcher.nproc_per_node=2"],
        "data: the training split has 12 samples, fewer than one optimizer step takes "
        "(2 processes × trainer.batch_size 8 × trainer.accumulate 1 = 16)",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), SMALL_DATA, ids=[o[0] + o[-1] for o, _ in SMALL_DATA])
def test_a_dataset_too_small_for_one_step_is_one_line_before_anything_starts(
    overrides, message, tmp_path, cli_here
):
    result = cli_here("experiment=regression", *overrides, f"run_dir={tmp_path / 'run'}")
    assert (result.returncode, result.stderr) == (2, f"disttrain: error: {message}\n")
    assert not (tmp_path / "run").exists()


def test_an_empty_dataset_from_python_is_refused(tmp_path) -> None:
    model = nn.Linear(20, 1)
    with pytest.raises(ConfigError, match=r"^data: the dataset has no samples$"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), RandomRegression(size=0), TrainConfig())
