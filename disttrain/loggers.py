"""Loggers: callbacks that send rank 0's metrics lines (`on_log`) somewhere else: TensorBoard, a CSV file,
MLflow and wandb, any number at once, each written against the public callback API only.

Every logger gets the same records, the lines of metrics.jsonl (loss, lr, grad norm, throughput, the
step's own `train_*` metrics, validation lines); a nested value (grad_flow) becomes one metric per entry,
`grad_flow/<module>`, and a step's value of a key counts once (a validation line's `epoch` does not
repeat its step line's). Only rank 0 writes. `on_log` only keeps the record: the records go to the
logger in batches, once a second (`Logger.FLUSH_SECONDS`) and at the end, on a thread of the logger's
own, so a logger's writes stay off the step's path.

After a kill and a resume each step appears once: metrics.jsonl, already cut back to the snapshot's step
when `on_fit_start` runs, is the source of truth, and each logger knows what it already holds (see each
class). TensorBoard, MLflow and wandb are imported only by a run that uses them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from disttrain.callbacks import Callback, RunView, named_callbacks
from disttrain.config import WANDB_MODES, ConfigError, LoggerConfig
from disttrain.metrics import read_metrics
from disttrain.snapshot import atomic_write

log = logging.getLogger("disttrain")


def logged(run: RunView) -> list[dict[str, Any]]:
    """The records of metrics.jsonl at fit start: on a resume, every line up to the snapshot's step."""
    path = run.run_dir / "metrics.jsonl"
    return read_metrics(run.run_dir) if run.step > 0 and path.exists() else []


def flatten(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers by metric name, without `step`: a nested mapping becomes `key/sub`, a bool 0/1;
    anything else that is not a number is left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float)):
                    out[f"{key}/{sub}"] = float(v)
        elif isinstance(value, (int, float)):  # bool included
            out[key] = float(value)
    return out


class Logger(Callback):
    """A base for loggers: rank 0's `on_log` records, handed to `write(records)` in batches on a thread of
    the logger's own, in order. Override `open(run)` (rank 0, at fit start: create or reopen the run,
    replay what it lacks), `write(records)` and `close(status)` (`finished`, `failed` or `killed`: a stop
    signal, so a requeued job will continue it). `flush()` waits until every record kept so far is
    written; a write that raised stops the run at the next event, naming the logger.

    A subclass's `state_dict()` is taken at each snapshot after every record up to the snapshot's step
    has reached `on_log`: flushing there makes the snapshot's promise "everything up to here is written"."""

    FLUSH_SECONDS = 1.0
    #: (module, extra): the package the logger imports and the extra that installs it; checked before a
    #: job starts (`disttrain.compose.check_callback_classes`).
    REQUIRES: tuple[str, str] | None = None

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._flush_at = 0.0
        self._queue: queue.SimpleQueue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- what a logger implements -------------------------------------------------------------------------
    def open(self, run: RunView) -> None: ...
    def write(self, records: list[dict[str, Any]]) -> None: ...
    def close(self, status: str) -> None: ...

    # -- the events ---------------------------------------------------------------------------------------
    def on_fit_start(self, run: RunView) -> None:
        if not run.is_main:
            return
        self.open(run)
        self._queue = queue.SimpleQueue()
        name = f"disttrain-{type(self).__name__}"
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def on_log(self, run: RunView, record: dict[str, Any]) -> None:
        self._records.append(record)
        if (now := time.monotonic()) >= self._flush_at:
            self._hand_over()
            self._flush_at = now + self.FLUSH_SECONDS

    def on_fit_end(self, run: RunView, summary: dict[str, Any]) -> None:
        if self._thread is None:
            return
        self.flush()
        self._stop()
        stopped = str(summary.get("stopped", ""))
        if stopped.startswith("stopped by signal"):
            self.close("killed")
        else:
            self.close("failed" if stopped == "diverged" else "finished")

    def on_exception(self, run: RunView, error: BaseException) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            self.flush()
        self._stop()
        self.close("failed")

    # -- the thread ---------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every record kept so far, and wait for it."""
        if self._queue is None:
            return
        self._hand_over()
        done = threading.Event()
        self._queue.put(done)
        while not done.wait(0.1):
            if self._thread is None or not self._thread.is_alive():
                break
        self._raise()

    def _hand_over(self) -> None:
        self._raise()
        if self._records and self._queue is not None:
            batch, self._records = self._records, []
            self._queue.put(batch)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _stop(self) -> None:
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        self._queue = self._thread = None

    def _work(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
            elif self._error is None:
                try:
                    self.write(item)
                except BaseException as e:  # raised on the training thread, at its next event
                    self._error = e


class _Firsts:
    """Which (metric, step) a logger holds already: a metric's first value at a step wins (a
    validation line's `epoch` repeats its step line's), and a resumed logger skips what it had."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def new(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        last = self.last
        fresh = {k: v for k, v in metrics.items() if last.get(k, 0) < step}
        for k in fresh:
            last[k] = step
        return fresh


# ==== TensorBoard =========================================================================================
class TensorBoard(Logger):
    """TensorBoard event files in `RUN_DIR/tensorboard` (or `log_dir`): one scalar per metric, at its step
    (`pip install 'disttrain[tensorboard]'`).

    Resume: every snapshot's state flushes the writer first, so once a snapshot of step S is committed the
    files hold every step up to S; the resumed writer opens with `purge_step=S+1`, and TensorBoard drops
    the killed attempt's events from S+1 on, which the resumed run writes again. A logger with no state in
    the snapshot (added on a resume) replays metrics.jsonl instead, purging everything before it."""

    REQUIRES = ("tensorboard", "tensorboard")

    def __init__(self, log_dir: str = "") -> None:
        super().__init__()
        self.log_dir = log_dir
        self._writer: Any = None
        self._firsts = _Firsts()
        self._resumed = False

    def open(self, run: RunView) -> None:
        from torch.utils.tensorboard import SummaryWriter  # here: tensorboard costs its import only here

        step = run.step
        replay = [] if self._resumed else logged(run)
        directory = Path(self.log_dir) if self.log_dir else run.run_dir / "tensorboard"
        # purge_step drops earlier events from that step on: those a killed attempt wrote past the snapshot
        self._writer = SummaryWriter(str(directory), purge_step=step + 1 if self._resumed else 1)
        self.write(replay)

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            step = record["step"]
            for key, value in self._firsts.new(step, flatten(record)).items():
                self._writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        self._writer.close()

    def state_dict(self) -> dict[str, Any]:
        if self._writer is not None:
            self.flush()
            self._writer.flush()
        return {"resumable": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed = bool(state.get("resumable"))


# ==== CSV =================================================================================================
class CSV(Logger):
    """`RUN_DIR/metrics.csv` (or `path`): one row per line of metrics.jsonl, columns `step` then every key
    in the order first seen (a nested value as `key/sub`); a row lacks the keys its line lacks (a
    validation row holds step, epoch and the val_ keys).

    A key first seen mid-run adds a column: the file is rewritten with the wider header (old rows get an
    empty cell), as Lightning's CSVLogger does; that happens once per new key. On a resume the file is
    rebuilt from metrics.jsonl (already cut back to the snapshot's step), so rows past it are gone."""

    def __init__(self, path: str = "") -> None:
        super().__init__()
        self.path_arg = path
        self.path = Path(path)
        self.columns: list[str] = []
        self._known: set[str] = set()
        self._rows: list[dict[str, Any]] = []

    def open(self, run: RunView) -> None:
        self.path = Path(self.path_arg) if self.path_arg else run.run_dir / "metrics.csv"
        self.columns, self._rows = [], []
        self._rewrite(logged(run))

    def write(self, records: list[dict[str, Any]]) -> None:
        rows = [self._row(r) for r in records]
        if any(k not in self._known for row in rows for k in row):
            self._rewrite(records)
            return
        self._rows.extend(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="").writerows(rows)

    def close(self, status: str) -> None: ...

    @staticmethod
    def _row(record: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for key, value in record.items():
            if isinstance(value, dict):
                row.update({f"{key}/{sub}": v for sub, v in value.items()})
            else:
                row[key] = value
        return row

    def _rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        self._rows.extend(self._row(r) for r in records)
        columns = dict.fromkeys(["step", *self.columns])
        for row in self._rows:
            columns.update(dict.fromkeys(row))
        self.columns = list(columns)
        self._known = set(self.columns)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.columns, restval="")
        writer.writeheader()
        writer.writerows(self._rows)
        data = text.getvalue().encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda f: f.write(data))


# ==== MLflow ==============================================================================================
class MLflow(Logger):
    """An MLflow run (`pip install 'disttrain[mlflow]'`, mlflow-skinny): each metric at its step, the
    config as params, the run's status at the end.

    `tracking_uri` empty (the default): a local file store in `RUN_DIR/mlruns` (`mlflow ui
    --backend-store-uri RUN_DIR/mlruns`); mlflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is
    true, so the logger sets that for this default store only (and MLflow's telemetry off, unless
    MLFLOW_DISABLE_TELEMETRY is set). A server's URI (`http://host:5000`) or any
    other URI MLflow takes is used as given (MLFLOW_TRACKING_URI too, when `tracking_uri` is empty and it
    is set).

    One run per run dir: its id is written to `RUN_DIR/mlflow_run_id` when the run is created and kept in
    every snapshot (which wins on resume). MLflow's metrics are append-only, so a resumed logger first
    asks the run how far each metric got (its history's last step: the killed attempt may have written
    past the snapshot, or not reached it), replays metrics.jsonl from there, and skips any later record
    of a step a metric already has: every step's metrics appear once. A step reaches MLflow about a
    second after its line (the batching), and a resume pays one history read per metric."""

    ID_FILE = "mlflow_run_id"
    REQUIRES = ("mlflow", "mlflow")

    def __init__(self, tracking_uri: str = "", experiment: str = "disttrain", run_name: str = "") -> None:
        super().__init__()
        if not isinstance(experiment, str) or not experiment.strip():
            raise ConfigError(f"callbacks.mlflow.experiment={experiment!r}: must name an experiment")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.run_id = ""
        self._client: Any = None
        self._firsts = _Firsts()

    def uri(self, run_dir: Path) -> str:
        """The tracking URI this logger uses for a run dir."""
        if self.tracking_uri:
            return self.tracking_uri
        return os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").absolute().as_uri()

    def open(self, run: RunView) -> None:
        # MLflow 3 sends usage data to its makers unless told not to: a training job sends nothing
        # anywhere it was not pointed at (MLFLOW_DISABLE_TELEMETRY=false in the environment wins).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient  # here: mlflow costs its import only to runs that use it

        uri = self.uri(run.run_dir)
        if uri == (run.run_dir / "mlruns").absolute().as_uri():
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self._client = client = MlflowClient(tracking_uri=uri)
        id_file = run.run_dir / self.ID_FILE
        if not self.run_id and id_file.exists():
            self.run_id = id_file.read_text().strip()
        if self.run_id:
            try:
                client.get_run(self.run_id)
            except Exception as e:
                log.warning("MLflow run %s not found at %s (%s): starting a new run", self.run_id, uri, e)
                self.run_id = ""
        if self.run_id:
            for key in client.get_run(self.run_id).data.metrics:
                history = client.get_metric_history(self.run_id, key)
                self._firsts.last[key] = max((m.step for m in history), default=0)
            client.update_run(self.run_id, status="RUNNING")
        else:
            found = client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
            name = self.run_name or run.run_dir.name
            self.run_id = client.create_run(experiment_id, run_name=name).info.run_id
            run.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(id_file, lambda f: f.write(self.run_id.encode()))
            self._log_params(run.config)
        self.write(logged(run))

    def _log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in _flat_config(config).items()]  # MLflow's limit
        try:
            self._client.log_batch(self.run_id, params=params)
        except Exception as e:  # a key MLflow will not take: the metrics matter more than the record
            log.warning("MLflow: the config was not logged as params (%s)", e)

    def write(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, record["step"])
            for record in records
            for key, value in self._firsts.new(record["step"], flatten(record)).items()
        ]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)  # the client splits it as MLflow needs

    def close(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status=status.upper())

    def on_fit_end(self, run: RunView, summary: dict[str, Any]) -> None:
        super().on_fit_end(run, summary)
        if self.run_id and run.is_main:
            summary["mlflow_run_id"] = self.run_id

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = str(state.get("run_id") or "")


def _flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def with_config_loggers(callbacks: Any, cfg: LoggerConfig) -> Any:
    """The Trainer's callbacks plus the wandb logger `logger=wandb` (`logger.name`) asks for, unless a
    Wandb callback is there already."""
    if cfg.name != "wandb":
        return callbacks
    named = callbacks if isinstance(callbacks, Mapping) else named_callbacks(callbacks or [])
    if any(isinstance(cb, Wandb) for cb in named.values()):
        return named
    return {**named, "wandb": Wandb(cfg.project, cfg.mode)}


# ==== wandb ===============================================================================================
class Wandb(Logger):
    """Rank 0's wandb run (`logger=wandb`, or this callback itself; `pip install 'disttrain[wandb]'`).

    One run per run dir, also across kills, restarts and SLURM requeues: its id is written to
    `RUN_DIR/wandb_run_id` when the run is created (so a job killed before its first snapshot still
    continues it) and kept in every snapshot (which wins on resume); wandb is opened with that id and
    `resume="allow"`.

    The history stays contiguous across a SIGKILL: wandb writes its log lazily (seen: a run killed at
    step 150 had 108 steps in its offline file), so steps logged before the snapshot the job resumes
    from may never have reached wandb. On start the run therefore replays metrics.jsonl (already cut back
    to the snapshot's step) from the first step wandb does not have (`run.starting_step`: the server's
    next step online, 0 offline, where every attempt writes a file of its own), and drops any later
    record of a step it already holds. So every step appears once, from one attempt or the other, with
    the same values (resume is exact).

    Records go to wandb as they come (wandb batches them on its own, in its core process). Files go to
    `RUN_DIR/wandb/` unless WANDB_DIR says otherwise. A run stopped by a signal is marked
    preempting (shown as preempted, not failed, until the requeued job resumes it)."""

    ID_FILE = "wandb_run_id"
    REQUIRES = ("wandb", "wandb")

    def __init__(self, project: str = "disttrain", mode: str = "offline") -> None:
        super().__init__()
        if mode not in WANDB_MODES:
            raise ConfigError(f"callbacks.wandb.mode={mode!r}: must be one of {', '.join(WANDB_MODES)}")
        self.project, self.mode = project, mode
        self.run_id = ""
        self._run: Any = None
        self._first_step = 0

    def open(self, run: RunView) -> None:
        import wandb  # here, not at the top: wandb costs its import only to runs that log to it

        id_file = run.run_dir / self.ID_FILE
        if not self.run_id and id_file.exists():
            self.run_id = id_file.read_text().strip()
        if not self.run_id:
            self.run_id = secrets.token_hex(6)
            run.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(id_file, lambda f: f.write(self.run_id.encode()))
        self._run = wandb.init(
            project=self.project,
            mode=self.mode,  # type: ignore[arg-type]
            id=self.run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or str(run.run_dir),
            config=run.config,
        )
        self._first_step = self._run.starting_step
        self.write(logged(run))

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            step = record["step"]
            if step >= self._first_step:
                self._run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def on_log(self, run: RunView, record: dict[str, Any]) -> None:
        # Straight to wandb, which batches on its own (its core process writes the file or uploads).
        if self._run is not None:
            self.write([record])

    def close(self, status: str) -> None:
        if status == "killed":
            self._run.mark_preempting()  # shown as preempted, not failed, until the requeued job resumes it
        self._run.finish(exit_code=1 if status == "failed" else 0)

    def on_fit_end(self, run: RunView, summary: dict[str, Any]) -> None:
        super().on_fit_end(run, summary)
        if self.run_id and run.is_main:
            summary["wandb_run_id"] = self.run_id

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = str(state.get("run_id") or "")
