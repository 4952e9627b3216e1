"""The entry every launched training process runs: `python -m disttrain.worker RUN_DIR/config.yaml`.

Workers read the config the launcher froze; they never compose Hydra configs themselves, so nothing is
resolved twice and no worker writes Hydra output or changes directory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import Dataset, IterableDataset

from disttrain import runlock
from disttrain.callbacks import CallbackError
from disttrain.config import (
    ConfigError,
    TrainConfig,
    describe_exception,
    load_config,
    plain_dict,
    to_dict,
)
from disttrain.data import one_sample_micro_batches, training_splits
from disttrain.dist import distributed, placement
from disttrain.snapshot import SnapshotError, freeze_config, latest_manifest, newest_snapshot
from disttrain.strategy import build_model
from disttrain.streams import check_reshard
from disttrain.trainer import Trainer, check_model, check_tail_for_batchnorm, make_optimizer

log = logging.getLogger("disttrain")

#: Signals that mean "stop soon": SIGTERM (torchrun, SLURM at the time limit, preemption) and the
#: warning signal the sbatch script asks for (USR2 by default; USR1 too, for clusters configured so).
#: SIGINT (Ctrl-C) too; a second one, in a process that owns its terminal, means "stop now" (StopNow).
#: SIGHUP too: the terminal closed or the ssh session dropped, the commonest way an interactive run ends.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

#: Set by `disttrain launcher=torchrun|multinode` for its workers: its pid. A worker then dies with its
#: torchrun, which dies with the launcher (PR_SET_PDEATHSIG): a launcher killed with SIGKILL leaves no
#: worker training on as an orphan in a run dir whose lock went with the launcher.
LAUNCHER_PID_ENV = "DISTTRAIN_LAUNCHER_PID"

#: The exit code of a run that stopped because it no longer trained (summary `stopped: diverged`): not 0,
#: since it is not done, and not 1 or 2, so that a script can tell it from a crash or a refused config.
DIVERGED_EXIT = 3


def read_config(path: Path) -> TrainConfig:
    """Load a frozen config; interpolations left in it (a SLURM run's `${run_id:}`) resolve here."""
    return load_config(plain_dict(OmegaConf.load(path)))


class BuildError(RuntimeError):
    """A `_target_` that imported and took its arguments, but raised when built: one line, exit 1 (the
    job had started: this is the user's code failing, not a config the checks could refuse)."""


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, without the snapshot the first one asked for (the newest one on
    disk stays whole: writes are atomic). A KeyboardInterrupt, so that no `except Exception` on its way
    out swallows it; the message is the one line to print."""


def build(key: str, spec: dict[str, Any]) -> Any:
    """`instantiate(spec)`, with a failure of the user's code in one line naming the `_target_`, the
    exception and where it was raised (hydra's own message spans lines and repeats the config)."""
    try:
        with warnings.catch_warnings():
            # A layer of width 0 warns while it is built; check_model then refuses it in one line.
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            return instantiate(spec)
    except Exception as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
        if isinstance(cause, ConfigError):  # the class refused its own arguments: its line says why
            raise cause from None
        target = spec.get("_target_")
        why = describe_exception(cause)
        raise BuildError(f"{key}._target_={target!r}: building it raised {why}") from None


def build_callbacks(cfg: TrainConfig) -> dict[str, Any]:
    """The config's callbacks by name. A constructor that refuses its arguments (a TypeError or a
    ValueError: a missing argument, a value out of range) is the config's mistake, refused in one line
    naming the callback's key (ConfigError, exit 2); every launcher builds them once to check this before
    any process or process group starts (disttrain.compose.check_job)."""
    callbacks = {}
    for name, spec in cfg.callbacks.items():
        if not spec:
            continue
        key = f"callbacks.{name}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a warning is the real build's to show, not the check's
                callbacks[name] = instantiate(spec)
        except Exception as e:
            cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
            if isinstance(cause, ConfigError):
                raise cause from None
            if isinstance(cause, (TypeError, ValueError)):
                message = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
                raise ConfigError(f"{key}: {message or type(cause).__name__}") from None
            why = describe_exception(cause)
            raise BuildError(f"{key}._target_={spec.get('_target_')!r}: building it raised {why}") from None
    return callbacks


def build_dataset(cfg: TrainConfig, world_size: int) -> Dataset:
    """The config's dataset, refused in one line (ConfigError) when it is too small for a job of
    `world_size` processes: what a launcher checks before any process or run file exists."""
    dataset = build("data", cfg.data)
    train_split, _ = training_splits(dataset, None, cfg.trainer, world_size)
    streaming = isinstance(train_split, IterableDataset)  # (its tail is known only as it runs)
    if streaming:
        check_stream_resume(train_split, cfg, world_size)
    if not streaming and one_sample_micro_batches(len(train_split), cfg.trainer, world_size):  # type: ignore[arg-type]
        # Rare enough to build the model for (on the meta device: no memory, no weights) to look for
        # a BatchNorm, which could not train on that micro-batch.
        with torch.device("meta"):
            model = build("model", cfg.model)
        check_tail_for_batchnorm(model, len(train_split), cfg.trainer, world_size)  # type: ignore[arg-type]
    return dataset


def check_stream_resume(dataset: Dataset, cfg: TrainConfig, world_size: int) -> None:
    """A stream stopped mid-epoch, resumed on a shape it cannot continue on: refused here, before any
    process starts (each worker would refuse it, in torchrun's many-line report)."""
    manifest = latest_manifest(Path(cfg.run_dir))
    if manifest is None or not manifest.get("samples_in_epoch"):
        return
    then = (int(manifest["world_size"]), int(manifest["config"]["trainer"].get("num_workers", 0)))
    check_reshard(dataset, then, (world_size, cfg.trainer.num_workers))


def check_blocks(cfg: TrainConfig, world_size: int = 1) -> None:
    """strategy=fsdp or activation checkpointing: the blocks strategy.fsdp_blocks names exist (and some
    block exists, to checkpoint), checked on a model built on the meta device (no memory, no weights:
    cheap whatever the model's size) before any process starts. Under strategy=fsdp on several processes
    (strategy.meta_init) that build is also the one every rank but rank 0 makes: a model that cannot be
    built so is refused here; otherwise such a model's blocks are found where it is built in full."""
    from disttrain.strategy import check_meta_build, checkpoint_blocks, find_blocks, meta_init

    key = f"model._target_={cfg.model.get('_target_')!r}"
    with torch.device("meta"):
        try:
            model = build("model", cfg.model)
        except BuildError as e:
            if not meta_init(cfg, world_size):
                return  # each worker's strategy finds the blocks of the model it built in full
            why = str(e).split(": building it raised ", 1)[-1]
            raise ConfigError(
                f"{key}: cannot be built on the meta device for strategy=fsdp (every rank but rank 0 builds "
                f"it there): it raised {why}; set strategy.meta_init=false to build it in full on every rank"
            ) from None
    if meta_init(cfg, world_size):
        check_meta_build(model, key)
    find_blocks(model, cfg.strategy.fsdp_blocks)
    checkpoint_blocks(model, cfg.strategy)


def build_trainer(cfg: TrainConfig, env: Any, dataset: Dataset | None = None) -> Trainer:
    """Model, data and optimizer from the config's `_target_`s; every rank initialises from one seed."""
    dataset = build("data", cfg.data) if dataset is None else dataset
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(lambda: build("model", cfg.model), cfg, env)
    check_model(model, f"model._target_={cfg.model.get('_target_')!r}")
    step = instantiate(cfg.step, _partial_=True) if cfg.step else None
    callbacks = build_callbacks(cfg)
    optimizer = make_optimizer(cfg.optim, model)
    return Trainer(model, optimizer, dataset, cfg, step=step, env=env, callbacks=callbacks)


class StopSignals:
    """This process's stop signals, from before the process group and the trainer exist (a signal during
    start-up is kept, and stops the run at its first step boundary) until training ends.

    The first signal asks the trainer to stop at the next step boundary and snapshot; later ones change
    nothing, except a SIGINT in a process that owns its terminal (`interactive`: not a torchrun or srun
    worker, whose launcher decides what a second Ctrl-C does), which raises StopNow."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.signum = 0
        self.trainer: Trainer | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (*STOP_SIGNALS, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_: Any) -> None:
        # The handlers hold the trainer, whose DDP reducer holds the process group: a group still alive
        # at interpreter exit is freed there, and gloo then aborts the process.
        self.trainer = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def attach(self, trainer: Trainer | None) -> None:
        self.trainer = trainer
        if trainer is not None and self.signum:
            trainer.request_stop(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum and self.interactive:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third Ctrl-C must not cut the way out short
            raise StopNow()
        self.signum = self.signum or signum
        if self.trainer is not None:
            self.trainer.request_stop(signum)


def train(cfg: TrainConfig, dataset: Dataset | None = None) -> dict[str, Any]:
    """Train in this process, as one rank of the job its environment describes (on `dataset` when the
    caller built it already, see build_dataset)."""
    with StopSignals(interactive=placement().launched_by == "python") as stops:
        try:
            with distributed(cfg.trainer.device, cfg.trainer.timeout_s) as env:
                if env.world_size > 1:
                    # Every rank composed or read its own config; rank 0's is the run's (its run_dir).
                    box = [to_dict(cfg)]
                    dist.broadcast_object_list(box, src=0)
                    cfg = load_config(box[0])
                trainer = build_trainer(cfg, env, dataset)
                stops.attach(trainer)
                try:
                    return trainer.fit()
                finally:
                    stops.attach(None)
                    del trainer
        except StopNow:
            # fit() has let its last commit finish: the newest snapshot on disk is the one to resume from.
            raise StopNow(stopped_now_line(Path(cfg.run_dir))) from None


def stopped_now_line(run_dir: Path) -> str:
    newest = newest_snapshot(run_dir)
    kept = f"the newest snapshot is {newest}" if newest else "no snapshot was written yet"
    return f"stopped now by a second SIGINT: {kept}; run the same command to resume"


def diverged(summary: dict[str, Any]) -> bool:
    """Whether the run stopped because it no longer trained (health.max_skipped_steps, or parameters
    that are not finite): the trainer has said why in one line."""
    return summary.get("stopped") == "diverged"


def stopped_by(summary: dict[str, Any]) -> signal.Signals | None:
    """The signal that stopped a run, from its summary; None if it ended otherwise."""
    reason = str(summary.get("stopped", ""))
    if not reason.startswith("stopped by signal "):
        return None
    return signal.Signals[reason.rsplit(" ", 1)[1]]


def stop_line(summary: dict[str, Any]) -> str:
    """The last line of a run a signal stopped (it is not done, and must not look done)."""
    return (
        f"disttrain: {summary['stopped']} at step {summary['steps']}: snapshot {summary['snapshot']} "
        "written; run the same command to resume"
    )


def slurm_job_to_requeue(environ: Any = os.environ) -> str | None:
    """The id `scontrol requeue` takes for this job: an array job's own task only, never the array."""
    if "SLURM_ARRAY_JOB_ID" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def finish(summary: dict[str, Any]) -> int:
    """What a rank does once fit() returned: inside a SLURM job that a signal stopped, rank 0 puts the
    job back in the queue; its next attempt resumes from the snapshot the stop just wrote. Elsewhere a
    stopped run's rank 0 says so in the last line (`stop_line`); the exit code is 128 + the signal,
    except under torchrun (0: see below).

    Exit code 0 after a successful requeue: SLURM ends this attempt itself, and a non-zero exit would make
    a torchrun with max_restarts restart the group inside an allocation that is going away. A requeue
    that cannot happen (no scontrol, a job that is not requeueable) is exit 1 with one line: the run is
    not done, and must not look done.
    """
    where = placement()
    if diverged(summary):
        # Under `disttrain launcher=torchrun` the launcher reads it from summary.json, as it reads a stop
        # (a failed worker would make torchrun restart a group that diverges again). Inside a SLURM job
        # nothing reads it: the job itself must end not done.
        if where.launched_by == "torchrun" and slurm_job_to_requeue() is None:
            return 0
        return DIVERGED_EXIT
    stopped = stopped_by(summary)
    if stopped is None:
        return 0
    job = slurm_job_to_requeue()
    if job is None:
        if where.rank == 0:
            print(stop_line(summary), file=sys.stderr, flush=True)
        # Under torchrun a worker's non-zero exit is a failure: torchrun restarts the group (max_restarts)
        # or reports a crash. Its launcher reads the stop from summary.json (launch.supervise).
        return 0 if where.launched_by == "torchrun" else 128 + stopped
    if where.rank != 0:
        return 0
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        print(
            f"disttrain: error: {summary['stopped']} at step {summary['steps']}, but cannot requeue "
            f"SLURM job {job}: scontrol not found on PATH",
            file=sys.stderr,
        )
        return 1
    # Said before the requeue: SLURM cancels this attempt's processes as soon as it takes effect.
    print(
        f"disttrain: {summary['stopped']} at step {summary['steps']}: snapshot written, "
        f"requeueing SLURM job {job}",
        file=sys.stderr,
        flush=True,
    )
    res = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if res.returncode != 0:
        print(
            f"disttrain: error: {summary['stopped']} at step {summary['steps']}, but "
            f"`scontrol requeue {job}` failed: {res.stderr.strip() or res.stdout.strip()}",
            file=sys.stderr,
        )
        return 1
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
        die_with_launcher()
        cfg = read_config(Path(args[0]))
        if where.rank == 0:
            runlock.acquire(cfg.run_dir)  # held until this process exits (a no-op if the launcher holds it)
            record_run(cfg, Path(args[0]))
        summary = train(cfg)
    except (ConfigError, SnapshotError, BuildError, CallbackError) as e:
        print(f"disttrain: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    if where.local_rank == 0 and stopped_by(summary) is None and not diverged(summary):
        # One line per node: each machine's log shows it finished, and with which parameters.
        steps, sha = summary["steps"], summary["params_sha256"]
        print(f"disttrain: rank {where.rank} done: {steps} steps, params_sha256 {sha}", flush=True)
    return finish(summary)


def die_with_launcher() -> None:
    """Under `disttrain launcher=torchrun|multinode` (LAUNCHER_PID_ENV): die when this worker's torchrun
    dies. torchrun starts each worker in a session of its own, so nothing else would stop a worker whose
    launcher and torchrun were killed: it would train on, as an orphan, in a run dir no lock guards."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    # torchrun may have died before that call: then this worker's parent is no longer the launcher's child.
    try:
        stat = Path(f"/proc/{os.getppid()}/stat").read_text()
        grandparent = int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return
    if grandparent != int(launcher):
        print(f"disttrain: error: the launcher (pid {launcher}) of this worker is gone", file=sys.stderr)
        sys.exit(1)


def record_run(cfg: TrainConfig, config_path: Path) -> None:
    """A config staged outside the run dir (sbatch's, whose run dir needs the job id) is recorded in the run
    dir once the job knows it, so every run dir holds the config that trained it."""
    run_config = Path(cfg.run_dir) / "config.yaml"
    if run_config.resolve() != config_path.resolve():
        freeze_config(cfg, run_config)


if __name__ == "__main__":
    sys.exit(main())
