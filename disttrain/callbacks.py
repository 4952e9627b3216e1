"""Callbacks: the public events of a run, and the small view of the run a callback sees.

A callback is any object with some of these methods (subclassing `Callback` is optional: it documents
the signatures and makes every event a no-op until overridden):

    on_setup(run)                        the run is built, before a resume loads its snapshot: make
                                         state shaped like the model here (it is then loaded into)
    on_fit_start(run)                    training starts (after a resume: at the snapshot's step)
    on_epoch_start(run)                  an epoch starts (mid-epoch after a resume)
    on_before_optimizer_step(run)        the step's gradients are final (summed over ranks, unscaled,
                                         clipped); the optimizer steps next
    on_step_end(run)                     an optimizer step ended (run.step counts it)
    on_log(run, record)                  rank 0 only: a line of metrics.jsonl (a step's or a validation's)
    on_validation_start(run)             a validation starts (the model is in eval mode next)
    on_validation_end(run, metrics)      a validation ended: {"val_loss": ..., "val_<metric>": ...}
    on_before_snapshot(run, step)        the snapshot of `step` is taken next (every rank)
    on_snapshot(run, step)               the snapshot of `step` was written (rank 0 commits it on its
                                         own thread; a failed commit stops the run)
    on_epoch_end(run)                    an epoch ended (after its validation and snapshot)
    on_fit_end(run, summary)             training ended; summary["stopped"] says why (a callback may
                                         add entries: summary.json is written after this event)
    on_exception(run, error)             fit() is raising `error` (on the ranks where it does; also
                                         before on_fit_start): close what the callback opened

Every event but `on_log` is called on every rank, in the same order, with callbacks in the order they
were given. `run` (`RunView`) reads the run's step, epoch, rank, world size, model, optimizer, run dir
and latest metrics, and `run.request_stop(reason)` stops the run: the ranks agree on it as on a stop
signal, so every rank stops at the same step, with a snapshot, whichever rank asked.

A callback with `state_dict()` and `load_state_dict(state)` is part of the snapshot (rank 0's state,
under the callback's name) and resumes with it, also on another number of processes: its state must
then be the same on every rank, as it is for a callback that decides from values the ranks agree on.
DTensors in a callback's state (shards, under FSDP) are every rank's own: they go into the snapshot's
sharded part (DCP, with the model's shards) and are loaded, resharded, into the tensors its state_dict()
returns on resume (make them in `on_setup`). A
method named `on_...` that is not one of the events is refused in one line (a typo would never be
called); a callback that raises stops the run in one line naming the callback and the event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disttrain.config import ConfigError, describe_exception, to_dict

if TYPE_CHECKING:
    import torch
    from torch import nn

EVENTS = (
    "on_setup",
    "on_fit_start",
    "on_epoch_start",
    "on_before_optimizer_step",
    "on_step_end",
    "on_log",
    "on_validation_start",
    "on_validation_end",
    "on_before_snapshot",
    "on_snapshot",
    "on_epoch_end",
    "on_fit_end",
    "on_exception",
)


class Callback:
    """A base class for callbacks whose every event does nothing; override the ones you need."""

    def on_setup(self, run: RunView) -> None: ...
    def on_fit_start(self, run: RunView) -> None: ...
    def on_epoch_start(self, run: RunView) -> None: ...
    def on_before_optimizer_step(self, run: RunView) -> None: ...
    def on_step_end(self, run: RunView) -> None: ...
    def on_log(self, run: RunView, record: dict[str, Any]) -> None: ...
    def on_validation_start(self, run: RunView) -> None: ...
    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None: ...
    def on_before_snapshot(self, run: RunView, step: int) -> None: ...
    def on_snapshot(self, run: RunView, step: int) -> None: ...
    def on_epoch_end(self, run: RunView) -> None: ...
    def on_fit_end(self, run: RunView, summary: dict[str, Any]) -> None: ...
    def on_exception(self, run: RunView, error: BaseException) -> None: ...


class CallbackError(RuntimeError):
    """A callback raised: the run stops, with this one line naming the callback and the event."""


class RunView:
    """What a callback sees of the run: read-only numbers and the objects it may use, and a way to stop.

    `model` is your module (unwrapped: its state_dict keys are yours; under FSDP its parameters are
    DTensor shards), `optimizer` the one the Trainer steps. `metrics` holds the latest loss, validation
    loss, best validation loss and gradient norm."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer

    @property
    def step(self) -> int:
        return int(self._trainer.counters.step)

    @property
    def epoch(self) -> int:
        return int(self._trainer.counters.epoch)

    @property
    def rank(self) -> int:
        return int(self._trainer.env.rank)

    @property
    def world_size(self) -> int:
        return int(self._trainer.env.world_size)

    @property
    def is_main(self) -> bool:
        return bool(self._trainer.env.is_main)

    @property
    def model(self) -> nn.Module:
        return self._trainer.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._trainer.optimizer

    @property
    def run_dir(self) -> Path:
        return Path(self._trainer.run_dir)

    @property
    def max_steps(self) -> int:
        """The step the run ends at unless something stops it sooner."""
        return int(self._trainer.total_steps)

    @property
    def config(self) -> dict[str, Any]:
        """The run's config as a plain dict (a copy): what a logger records as its parameters."""
        return to_dict(self._trainer.cfg)

    @property
    def metrics(self) -> dict[str, float]:
        """The latest loss (a step's, once the ranks have summed it), validation loss, best validation
        loss, and the gradient norm of the latest step (before clipping)."""
        c = self._trainer.counters
        return {
            "loss": c.last_loss,
            "val_loss": c.last_val_loss,
            "best_val_loss": c.best_val_loss,
            "grad_norm": self._trainer.grad_norm,
        }

    def keep_snapshots(self, steps: Iterable[int]) -> None:
        """Retention keeps the snapshots of these steps besides the `snapshot.keep_last` newest ones
        (each call replaces the set; disttrain.best_snapshots uses it). A step with no snapshot is
        ignored; a snapshot that fails verification is deleted all the same."""
        self._trainer.snapshots.protect(steps)

    def wait_for_snapshots(self) -> None:
        """Return once every snapshot written so far is committed on disk (rank 0 commits on its own
        thread; `on_snapshot` comes before that). Collective: every rank calls it at the same event."""
        self._trainer.snapshots.wait()

    def request_stop(self, reason: str = "", all_ranks: bool = False) -> None:
        """Stop the run at a step boundary soon (every rank at the same step), with a snapshot.

        `all_ranks=True` promises that every rank asks at this same event (a decision made from values
        the ranks agree on, such as a validation's metrics): the run then stops at this step, without
        waiting for the ranks' agreement. A rank that does not ask would wait for the others forever."""
        self._trainer.request_callback_stop(self._trainer.callbacks.current, reason, all_ranks)


class Callbacks:
    """The run's callbacks by name, and the events each one has: calling an event costs nothing for
    callbacks that lack it (each event's handlers are found once, here)."""

    def __init__(self, callbacks: Mapping[str, Any] | Sequence[Any] | None) -> None:
        if callbacks is None:
            callbacks = {}
        if not isinstance(callbacks, Mapping):
            callbacks = named_callbacks(callbacks)
        self.named: dict[str, Any] = {str(k): v for k, v in callbacks.items() if v is not None}
        #: The name of the callback whose event is running (request_stop says who asked).
        self.current = ""
        self.handlers: dict[str, list[tuple[str, Callable[..., Any]]]] = {event: [] for event in EVENTS}
        for name, callback in self.named.items():
            check_events(name, callback)
            for event in EVENTS:
                method = getattr(callback, event, None)
                if method is not None and getattr(type(callback), event, None) is not getattr(
                    Callback, event
                ):
                    self.handlers[event].append((name, method))

    def __bool__(self) -> bool:
        return bool(self.named)

    def fire(self, event: str, *args: Any) -> None:
        for name, method in self.handlers[event]:
            self.current = name
            try:
                method(*args)
            except Exception as e:
                raise CallbackError(f"callback {name} raised in {event}: {describe_exception(e)}") from e
            finally:
                self.current = ""

    def index(self, name: str) -> int:
        return list(self.named).index(name)

    def name_at(self, index: int) -> str:
        return list(self.named)[index]

    def state_dict(self) -> dict[str, Any]:
        return {name: cb.state_dict() for name, cb in self.named.items() if hasattr(cb, "state_dict")}

    def split_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(every callback's state without its DTensors, {sharded key: DTensor}): the first goes into
        shared.pt (rank 0's), the second into the sharded part of the snapshot (every rank's shards)."""
        plain: dict[str, Any] = {}
        shards: dict[str, Any] = {}
        for name, state in self.state_dict().items():
            plain[name] = _split(state, f"{SHARDED_PREFIX}{name}", shards)
        return plain, shards

    def tensor_templates(self) -> dict[str, tuple[str, tuple[str, ...], Any]]:
        """{sharded key: (callback name, path in its state, tensor)} of every tensor in the callbacks'
        state now: what a sharded snapshot's callback tensors load into (resharded to this job)."""
        found: dict[str, tuple[str, tuple[str, ...], Any]] = {}
        for name, state in self.state_dict().items():
            _tensors(state, f"{SHARDED_PREFIX}{name}", (), name, found)
        return found

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, callback in self.named.items():
            if name in state and hasattr(callback, "load_state_dict"):
                try:
                    callback.load_state_dict(state[name])
                except Exception as e:
                    why = describe_exception(e)
                    raise CallbackError(f"callback {name} raised in load_state_dict: {why}") from e


#: Keys of callback tensors in a sharded snapshot: `callbacks.NAME.PATH` (PATH joins the state's keys).
SHARDED_PREFIX = "callbacks."


def _is_dtensor(value: Any) -> bool:
    return hasattr(value, "placements") and hasattr(value, "to_local")


def _split(state: Any, key: str, shards: dict[str, Any]) -> Any:
    """`state` without its DTensors (nested dicts walked), which go into `shards` under their keys."""
    if isinstance(state, Mapping):
        out = {}
        for k, v in state.items():
            if _is_dtensor(v):
                shards[f"{key}.{k}"] = v
            else:
                out[k] = _split(v, f"{key}.{k}", shards)
        return out
    return state


def _tensors(
    state: Any, key: str, path: tuple[str, ...], name: str, found: dict[str, tuple[str, tuple[str, ...], Any]]
) -> None:
    if isinstance(state, Mapping):
        for k, v in state.items():
            _tensors(v, f"{key}.{k}", (*path, str(k)), name, found)
    elif hasattr(state, "is_floating_point") and path:  # a tensor (or DTensor)
        found[key] = (name, path, state)


def set_path(state: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """state[path[0]][path[1]]... = value, making the dicts on the way."""
    for k in path[:-1]:
        state = state.setdefault(k, {})
    state[path[-1]] = value


def named_callbacks(callbacks: Sequence[Any]) -> dict[str, Any]:
    """A list of callbacks named by their classes (a second of one class gets `_2`, and so on)."""
    named: dict[str, Any] = {}
    for callback in callbacks:
        base = type(callback).__name__
        name, n = base, 1
        while name in named:
            n += 1
            name = f"{base}_{n}"
        named[name] = callback
    return named


def check_events(name: str, callback: Any) -> None:
    """A method named like an event that is none (`on_step_ned`) would never be called: refused. Takes
    a callback or its class."""
    cls = callback if isinstance(callback, type) else type(callback)
    for attr in dir(callback):
        if attr.startswith("on_") and attr not in EVENTS and callable(getattr(callback, attr, None)):
            raise ConfigError(
                f"callbacks.{name}: {cls.__name__}.{attr} is not an event; the events are "
                + ", ".join(EVENTS)
            )
