"""The loggers (TensorBoard, CSV, MLflow; wandb is in test_observability): read back with each tool's own
reader after a SIGKILL on 2 processes and a resume on one, and in one process after a resume from an older
snapshot than the loggers had reached; CSV columns, tracking URIs, and the config's one-line errors."""

from __future__ import annotations

import csv
import os
import platform
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from disttrain.callbacks import CallbackError
from disttrain.cli import main
from disttrain.compose import compose
from disttrain.loggers import CSV, MLflow, TensorBoard, flatten
from disttrain.metrics import read_metrics
from tests.callbacks import Raises, StopAt, regression_trainer
from tests.support import SMALL, disttrain, kill_at_step, start, summary

# mlflow's import calls platform.platform(), which runs `uname -p` once per interpreter (platform caches
# it): done here, as the module is collected, so the in-process tests below start no process.
platform.platform()
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows, by tag: (step, value), read by tensorboard's EventAccumulator
    (which applies the purge a resumed writer asks for)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_runs(run_dir: Path) -> tuple[Any, list[Any]]:
    """The MLflow client on the run dir's default store, and every run in it."""
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").absolute().as_uri())
    experiments = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in experiments])


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def f32(value: float) -> float:
    import numpy as np

    return float(np.float32(value))


def check_every_step_once(run_dir: Path) -> None:
    """TensorBoard, the CSV and MLflow hold each step's metrics once, with metrics.jsonl's values."""
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    n = summary(run_dir)["steps"]
    assert [r["step"] for r in steps] == list(range(1, n + 1))
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]

    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert scalars["loss"] == [(r["step"], f32(r["loss"])) for r in steps]
    assert scalars["lr"] == [(r["step"], f32(r["lr"])) for r in steps]
    assert [s for s, _ in scalars["samples_per_s"]] == list(range(1, n + 1))
    assert scalars["val_loss"] == [(s, f32(v)) for s, v in vals]
    assert [s for s, _ in scalars["epoch"]] == list(range(1, n + 1))  # a validation's epoch: not again

    table = csv_rows(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in table] == [r["step"] for r in rows]  # metrics.jsonl, row for row
    assert [float(r["loss"]) for r in table if r["loss"]] == [r["loss"] for r in steps]
    assert [(int(r["step"]), float(r["val_loss"])) for r in table if r["val_loss"]] == vals

    client, runs = mlflow_runs(run_dir)
    (run,) = runs
    assert run.info.run_id == (run_dir / "mlflow_run_id").read_text() == summary(run_dir)["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    history = {k: client.get_metric_history(run.info.run_id, k) for k in ("loss", "grad_norm", "val_loss")}
    assert [(m.step, m.value) for m in history["loss"]] == [(r["step"], r["loss"]) for r in steps]
    assert [m.step for m in history["grad_norm"]] == list(range(1, n + 1))
    assert [(m.step, m.value) for m in history["val_loss"]] == vals
    assert run.data.params["trainer.max_epochs"] == "2"  # the config, as params


@pytest.mark.slow
def test_loggers_and_a_callbacks_state_hold_every_step_once_after_a_sigkill_on_2_processes_resumed_on_1(
    tmp_path,
) -> None:
    """wandb's kill and resume is test_observability's (one process): the base class that keeps every
    logger on rank 0 (disttrain.loggers.Logger) is wandb's too, and TensorBoard's files show it here. A
    user's callback rides along: its state (a step count) comes back from the snapshot on one process."""
    run_dir, count = tmp_path / "run", tmp_path / "count"
    job = [
        *SMALL, "trainer.global_batch_size=32", "trainer.max_steps=120", "snapshot.every_steps=20",
        "trainer.val_every_steps=25", "logger=[tensorboard,csv,mlflow]", f"run_dir={run_dir}",
        "+callbacks.count._target_=tests.callbacks.StepCounter", f"+callbacks.count.out={count}",
    ]  # fmt: skip
    kill_at_step(start(*job, "launcher=torchrun", "launcher.nproc_per_node=2"), run_dir, 50)
    first_files = sorted((run_dir / "tensorboard").iterdir())
    again = disttrain(*job)
    assert again.returncode == 0, again.stderr[-3000:]
    # (the newest snapshot the kill left: read from the resume's line, as a commit may finish at the kill)
    resumed = re.search(r"resumed from .*\(epoch 0, step (\d+), 2 -> 1 processes\)", again.stderr)
    assert resumed and 20 <= int(resumed.group(1)) < 120, again.stderr[-3000:]
    check_every_step_once(run_dir)
    # Only rank 0 wrote: one events file for each attempt, each from one process.
    files = sorted((run_dir / "tensorboard").iterdir())
    assert len(first_files) == 1 and len(files) == 2, files
    assert len({f.name.split(".")[-2] for f in files}) == 2  # events.out.tfevents.TIME.HOST.PID.N
    # The count the snapshot held, and one for each step after it: every step once.
    assert count.read_text() == str(summary(run_dir)["steps"]) == "120"


def test_a_resume_from_an_older_snapshot_than_the_loggers_reached_logs_every_step_once(tmp_path) -> None:
    """The first attempt's loggers hold steps 1-3; its snapshot of step 3 is gone (as a kill before the
    commit leaves it), so the run resumes from step 2 and trains step 3 again: each logger has it once."""
    run_dir = tmp_path / "run"

    def loggers() -> dict[str, Any]:
        return {"tensorboard": TensorBoard(), "csv": CSV(), "mlflow": MLflow()}

    first = regression_trainer(run_dir, {**loggers(), "stop": StopAt(3)}).fit()
    assert first["steps"] == 3
    _, (run,) = mlflow_runs(run_dir)
    assert run.info.status == "FINISHED"
    shutil.rmtree(run_dir / "snapshots" / "step_00000003")
    again = regression_trainer(run_dir, loggers()).fit()
    assert again["steps"] == 10
    check_every_step_once(run_dir)


def test_a_logger_added_on_a_resume_replays_the_run_so_far(tmp_path) -> None:
    run_dir = tmp_path / "run"
    regression_trainer(run_dir, {"stop": StopAt(4)}).fit()
    regression_trainer(run_dir, {"tensorboard": TensorBoard(), "csv": CSV(), "mlflow": MLflow()}).fit()
    check_every_step_once(run_dir)


def view(run_dir: Path, step: int = 0) -> Any:
    """What the CSV logger reads of a run (RunView's fields it uses)."""
    return SimpleNamespace(run_dir=run_dir, step=step, is_main=True, config={})


def test_csv_adds_a_column_for_a_key_first_seen_mid_run(tmp_path) -> None:
    logger = CSV()
    logger.on_fit_start(view(tmp_path))
    logger.on_log(None, {"step": 1, "loss": 2.0, "lr": 0.1})
    logger.flush()
    logger.on_log(None, {"step": 2, "loss": 1.5, "lr": 0.1})
    logger.on_log(None, {"step": 2, "val_loss": 1.7})
    logger.on_log(None, {"step": 3, "loss": 1.25, "lr": 0.1, "grad_flow": {"embed": 0.5, "out": 0.25}})
    logger.on_fit_end(None, {"stopped": "max_steps"})
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == [
        "step,loss,lr,val_loss,grad_flow/embed,grad_flow/out",
        "1,2.0,0.1,,,",
        "2,1.5,0.1,,,",
        "2,,,1.7,,",
        "3,1.25,0.1,,0.5,0.25",
    ]


def test_a_record_flattens_to_numbers_by_name() -> None:
    record = {"step": 7, "epoch": 0, "loss": 1.5, "skipped": True, "grad_flow": {"out": 0.5}, "note": "x"}
    assert flatten(record) == {"epoch": 0.0, "loss": 1.5, "skipped": 1.0, "grad_flow/out": 0.5}


def test_mlflow_tracks_under_the_run_dir_unless_told_otherwise(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert MLflow().uri(tmp_path) == (tmp_path / "mlruns").absolute().as_uri()
    assert MLflow(tracking_uri="http://127.0.0.1:5000").uri(tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert MLflow().uri(tmp_path) == "http://127.0.0.1:5001"


def test_logger_options_add_callbacks_and_combine() -> None:
    cfg = compose(["logger=[wandb,tensorboard,csv,mlflow]", "logger.mode=disabled"])
    assert cfg["logger"]["name"] == "wandb" and cfg["logger"]["mode"] == "disabled"
    assert {name: spec["_target_"] for name, spec in cfg["callbacks"].items()} == {
        "tensorboard": "disttrain.loggers.TensorBoard",
        "csv": "disttrain.loggers.CSV",
        "mlflow": "disttrain.loggers.MLflow",
    }
    assert compose(["logger=[tensorboard,csv]", "callbacks.csv=null"])["callbacks"]["csv"] is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["logger=mlflow", "+callbacks.mlflow.uri=http://127.0.0.1:5000"],
            "callbacks.mlflow.uri='http://127.0.0.1:5000': disttrain.loggers.MLflow takes no such argument",
        ),
        (
            ["logger=tensorbord"],
            "logger='tensorbord': no such option in conf/logger/; choose one of csv, mlflow, none, "
            "tensorboard, wandb",
        ),
    ],
)
def test_a_bad_logger_config_is_one_line(overrides: list[str], message: str, tmp_path, capsys) -> None:
    assert main([*overrides, f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"disttrain: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_a_logger_whose_package_is_missing_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(TensorBoard, "REQUIRES", ("disttrain_no_such_package", "tensorboard"))
    assert main(["logger=tensorboard", f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == (
        "disttrain: error: callbacks.tensorboard: TensorBoard needs the disttrain_no_such_package package: "
        "pip install 'disttrain[tensorboard]'\n"
    )


def test_a_run_that_raises_closes_its_loggers_as_failed(tmp_path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(CallbackError):
        regression_trainer(run_dir, {"mlflow": MLflow(), "csv": CSV(), "raises": Raises(step=3)}).fit()
    _, (run,) = mlflow_runs(run_dir)
    assert run.info.status == "FAILED"
    # What was kept before the error was written: the lines metrics.jsonl has (step 3's came before the
    # callback raised at its end).
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == [1, 2, 3]
    assert [int(r["step"]) for r in csv_rows(run_dir / "metrics.csv")] == steps
