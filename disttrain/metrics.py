"""What a run leaves for its user: metrics.jsonl (one line per optimizer step), summary.json, and a
hash of the final weights. Only rank 0 writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disttrain.snapshot import atomic_write


def params_sha256(model: nn.Module) -> str:
    """sha256 over the names and bytes of every tensor in the state dict, in the module's own order:
    two runs that end on the same weights have the same hash."""
    sha = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


class MetricsLog:
    """Appends one JSON object per optimizer step to `metrics.jsonl`.

    On resume the lines after the snapshot's step are dropped (a killed run logged steps it is about to
    redo), so the file holds every step exactly once, as if the run had never stopped."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._file = None

    def open(self, resume_step: int) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines(keepends=True)
                if _step_of(line) <= resume_step
            ]
            atomic_write(self.path, lambda f: f.write("".join(kept).encode()))
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - stays open for the whole run

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a kill: dropped


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(run_dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
