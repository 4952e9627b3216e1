"""What a run leaves for its user: metrics.jsonl (one line per optimizer step), summary.json, and a
hash of the final weights. Only rank 0 writes.

A step's line holds: step, epoch, loss (the mean over the window's loss items on all ranks), lr (for the
next step), grad_norm (global, before clipping), skipped (no optimizer step: non-finite gradients, or an
explosion under health.on_explosion=skip), explosion, step_time_s (wall time of the step, data wait
included), data_time_s (waiting for the loader), samples_per_s (all ranks), and where they apply:
tokens_per_s (token datasets, those with a `vocab_size`: the targets' element count per second, so a GPT's
every position counts), peak_mem_gib (CUDA: the most memory the allocator held during the step), mfu
(model FLOPs utilisation, see `peak_samples_per_s`), grad_flow (every health.grad_flow_every steps: each
module's gradient norm).
Validation adds lines {step, epoch, val_loss}.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import time
import typing
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disttrain.snapshot import RunFileError, atomic_write, os_reason

#: Dense (no sparsity) peak TFLOP/s of one GPU, from the vendors' data sheets: (bf16/fp16 tensor cores,
#: fp32 without TF32). Matched against torch.cuda.get_device_name() in this order, so "H100 PCIe" is
#: found before "H100" and "A100" before "A10". Set trainer.peak_tflops for anything else.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("V100", 125.0, 15.7),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
)


def flops_per_sample(model: nn.Module) -> float | None:
    """The training FLOPs (forward + backward) of one sample the model declares, or None. Convention: an
    attribute `flops_per_sample` holding a number, or a method of that name taking no arguments (e.g.
    6 × parameters × tokens per sample for a transformer, as nanoGPT's estimate_mfu)."""
    value = getattr(model, "flops_per_sample", None)
    if callable(value):
        value = value()
    return float(value) if value else None


def peak_samples_per_s(
    model: nn.Module, device: torch.device, precision: str, configured_tflops: float, world_size: int
) -> float | None:
    """The samples/s the whole job would reach at its devices' peak FLOP/s, or None when that cannot be
    told (no declared FLOPs, or no peak: CPU or a GPU not in PEAK_TFLOPS, and trainer.peak_tflops unset).
    MFU = samples_per_s ÷ this = flops_per_sample × samples_per_s ÷ (peak per device × world size)."""
    flops = flops_per_sample(model)
    tflops = configured_tflops
    if not tflops and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        row = next((r for r in PEAK_TFLOPS if r[0] in name), None)
        tflops = (row[2] if precision == "fp32" else row[1]) if row else 0.0
    if flops is None or not tflops:
        return None
    return tflops * 1e12 * world_size / flops


def params_sha256(model: nn.Module) -> str:
    """sha256 over the names and bytes of every tensor in the state dict, in the module's own order:
    two runs that end on the same weights have the same hash. Sharded (FSDP) tensors are gathered one
    at a time, so every rank must call it (and hashes the full parameters)."""
    from torch.distributed.tensor import DTensor

    sha = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


class MetricsLog:
    """Appends one JSON object per optimizer step to `metrics.jsonl`.

    On resume the lines after the snapshot's step are dropped (a killed run logged steps it is about to
    redo), so the file holds every step exactly once, as if the run had never stopped.

    Records are kept and reach the file every FLUSH_SECONDS, and whenever the trainer snapshots (so a
    kill loses only lines that resume drops anyway): encoding and writing a line at every step would
    be a visible part of a small model's step (docs/benchmarks.md).
    A record must not be changed once written."""

    FLUSH_SECONDS = 1.0

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._file: io.FileIO | None = None
        self._records: list[dict[str, Any]] = []
        self._flush_at = 0.0

    def open(self, resume_step: int) -> None:
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in read_lines(self.path) if _step_of(line) <= resume_step]
            atomic_write(self.path, lambda f: f.write("".join(kept).encode()))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered: a write that fails leaves no buffer behind that Python would retry at exit.
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - open for the whole run
        except OSError as e:
            raise RunFileError(f"{self.path}: cannot be opened ({os_reason(e)})") from None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._records.append(record)
            if (now := time.monotonic()) >= self._flush_at:
                self.flush()
                self._flush_at = now + self.FLUSH_SECONDS

    def flush(self) -> None:
        if self._file is not None:
            data = memoryview("".join(json.dumps(r) + "\n" for r in self._records).encode())
            try:
                while data:  # one write() a flush; a full disk may take part of it first
                    data = data[self._file.write(data) :]
            except OSError as e:
                self._fail(e)
            self._records.clear()

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            try:
                os.fsync(self._file.fileno())
                self._file.close()
            except OSError as e:
                self._fail(e)
            self._file = None

    def _fail(self, e: OSError) -> typing.NoReturn:
        """A full disk or an I/O error: the lines written so far stay as they are (a torn last one is
        dropped by the next resume), the rest is given up, in one line, once."""
        file, self._file = self._file, None
        self._records.clear()
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
        raise RunFileError(f"{self.path}: not written ({os_reason(e)})") from None


def read_lines(path: Path) -> list[str]:
    """metrics.jsonl's lines. Bytes that are not UTF-8 are damage no kill leaves (json writes ASCII): the
    file is refused as it is rather than cut back around lines that cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunFileError(f"{path}: unreadable ({os_reason(e)})") from None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as e:
        raise RunFileError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): resuming would cut it "
            "back around lines it cannot read; repair it or move it away, then run the same command"
        ) from None


def check_log(run_dir: Path) -> None:
    """Raise the RunFileError that resuming would raise for the run's metrics.jsonl: the pre-flight
    look, before any run file is rewritten."""
    if (path := Path(run_dir) / "metrics.jsonl").exists():
        read_lines(path)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a kill: dropped


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_whole_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Every line of a metrics.jsonl that is a whole JSON record, and how many lines are not: a torn last
    line (a killed run's), or bytes that are not text. For reading a file as it is, as a plot does;
    resuming rewrites the file and refuses what a kill cannot leave (read_lines)."""
    rows, skipped = [], 0
    for raw in path.read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(run_dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))


class ItemMeans:
    """A step's extra metrics (each a mean over the step's loss items), summed on the device as
    metric × items until read: `read` averages them over the items on all ranks (collective: every rank
    calls it at the same step) with one all-reduce and one transfer to the host."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._items: torch.Tensor | float = 0.0

    def __bool__(self) -> bool:
        return bool(self._sums)

    def add(self, metrics: Any, items: Any) -> None:
        for name, value in metrics.items():
            term = torch.nan_to_num(value.detach().double()) * items
            self._sums[name] = self._sums[name] + term if name in self._sums else term
        self._items = self._items + items

    def read(self, world_size: int) -> dict[str, float]:
        if not self._sums:
            return {}
        names = sorted(self._sums)
        device = self._sums[names[0]].device
        items = torch.as_tensor(self._items, dtype=torch.float64, device=device)
        totals = torch.stack([*(self._sums[n] for n in names), items])
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
        *sums, items = totals.tolist()
        self._sums, self._items = {}, 0.0
        return {name: value / items if items else math.nan for name, value in zip(names, sums, strict=True)}
