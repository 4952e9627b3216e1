"""Sharded state through torch.distributed.checkpoint (DCP), read without unpickling code.

An FSDP job's model and optimizer state is written by every rank, each its own shards, with `dcp.save`
into the snapshot's staging directory (`dcp/`: `.metadata` and one `__R_0.distcp` per rank); no rank
ever holds the full state. It loads on any number of processes, as FSDP or as a plain model (DCP
reshards), and a plain snapshot's full state loads into FSDP (`load_full`).

DCP's own reader unpickles `.metadata` and loads non-tensor values with `weights_only=False`, i.e. it
would run code a tampered checkpoint carries. Here `.metadata` goes through an unpickler that allows
only DCP's own metadata classes, and every non-tensor value through `torch.load(weights_only=True)`:
disttrain never unpickles code (snapshot.py).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_METADATA = "torch.distributed.checkpoint.metadata"
#: What `.metadata` may name: DCP's own records, torch's sizes and dtypes, and plain containers.
_ALLOWED = {
    *(
        (_METADATA, name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
    ("torch", "strided"),
    ("torch", "contiguous_format"),
    # Every dtype torch has (float8 and complex ones included): names of data types, not code.
    *(("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)),
}


class RefusedCheckpoint(pickle.UnpicklingError):
    """A checkpoint that names something other than DCP's metadata classes: refused, nothing run."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise RefusedCheckpoint(f"its .metadata names {module}.{name}, which a checkpoint never holds")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file reader, with `.metadata` read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, with non-tensor values (an optimizer's param_groups) loaded weights-only."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class ShardedStateError(RuntimeError):
    """A sharded checkpoint that cannot be loaded into this job: one line."""


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save(
    model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, extra: dict[str, Any] | None = None
) -> None:
    """Collective: every rank writes its shards of the model and optimizer state into `path`, and of the
    tensors in `extra` ({key: DTensor}, a callback's: disttrain.callbacks.SHARDED_PREFIX)."""
    dcp.save({**_state(model, optimizer), **(extra or {})}, checkpoint_id=str(path))


def load_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Collective: those of `tensors` ({key: DTensor or tensor}) that the checkpoint in `path` holds,
    loaded in place (resharded to this job); the ones loaded, by key."""
    held = SafeReader(str(path)).read_metadata().state_dict_metadata
    state = {key: t for key, t in tensors.items() if isinstance(held.get(key), TensorStorageMetadata)}
    if state:
        try:
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ShardedStateError(first_failure(e)) from None
    return state


def read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every full tensor of a sharded checkpoint whose key starts with `prefix`, in this process, without
    a process group, by its key without the prefix."""
    reader = SafeReader(str(path))
    metadata = reader.read_metadata()
    state = {
        fqn: torch.empty(meta.size, dtype=meta.properties.dtype)
        for fqn, meta in metadata.state_dict_metadata.items()
        if fqn.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if state:
        dcp.load(state, storage_reader=reader, planner=SafePlanner(), no_dist=True)
    return {fqn.removeprefix(prefix): tensor for fqn, tensor in state.items()}


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Collective: the state in `path` into `model` and `optimizer`, resharded to this job (FSDP on any
    number of processes, or a plain module). ShardedStateError in one line when it does not fit."""
    state = _state(model, optimizer)
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())
    except BaseException as e:  # CheckpointException is a BaseException: it wraps every rank's failure
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ShardedStateError(first_failure(e)) from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def first_failure(e: BaseException) -> str:
    """One line for DCP's CheckpointException: the lowest failing rank's error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = min(failures.items())
        cause = failure[0] if isinstance(failure, tuple) else failure
        line = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), type(cause).__name__)
        return f"rank {rank}: {type(cause).__name__}: {line}"
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def load_full(
    model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any] | None, names: list[str]
) -> None:
    """Collective: a plain snapshot's full state (rank 0's `full`, {"model", "optimizer"} as torch's own
    state_dict()s; None elsewhere) into a sharded `model` and its `optimizer`, broadcast from rank 0.
    `names` are the optimizer's parameters' names in its param_groups order (what torch's integer keys
    stand for)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    model_state = full["model"] if full is not None else {}
    set_model_state_dict(model, model_state, options=options)
    optim_state = _named_optimizer_state(full["optimizer"], names) if full is not None else {}
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def _named_optimizer_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch's optimizer state_dict (parameters as integers) keyed by parameter names, as DCP's
    state-dict API takes it (integer keys would load into the wrong slots)."""
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """The full model state of a sharded checkpoint, in this process, without a model or a process
    group: every `model.*` tensor the metadata lists, allocated and loaded (for `disttrain export`)."""
    return read_tensors(path, "model.")
