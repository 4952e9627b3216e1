"""`disttrain export RUN_DIR [-o OUT]`: the model of a run's newest good snapshot as one plain file.

    disttrain export runs/gpt/torchrun-xyz                 # writes runs/gpt/torchrun-xyz/model.pt
    disttrain export runs/gpt/torchrun-xyz -o gpt.pt

The file is the model's full `state_dict()` written by `torch.save`, so `model.load_state_dict(
torch.load("model.pt", weights_only=True))` loads it into the model the run trained, for inference or
fine-tuning elsewhere. A sharded (FSDP) snapshot is put together from every rank's shards here, in one
process, with no process group; a plain one is copied out of its shared state. Checksums are verified
first and nothing is unpickled but tensors and plain data (disttrain.snapshot, disttrain.sharded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from disttrain.sharded import read_model
from disttrain.snapshot import DCP_DIR, SnapshotError, atomic_write, list_snapshots


def exported_state(run_dir: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(the snapshot's name, its model's full state) of the newest snapshot that verifies."""
    errors = []
    for snap in list_snapshots(run_dir / "snapshots"):
        try:
            snap.verify()
            if snap.sharded:
                return snap.path.name, read_model(snap.path / DCP_DIR)
            return snap.path.name, snap.load_shared()["model"]
        except SnapshotError as e:
            errors.append(str(e))
    if errors:
        raise SnapshotError(f"{run_dir}: no snapshot verifies (newest: {errors[0]})")
    raise SnapshotError(f"{run_dir}: no snapshot to export (not a run dir, or no snapshot written yet)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disttrain export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="the file to write (default RUN_DIR/model.pt)")
    args = parser.parse_args(argv)
    out = args.output or args.run_dir / "model.pt"
    try:
        name, state = exported_state(args.run_dir)
        atomic_write(out, lambda f: torch.save(state, f))
    except (SnapshotError, OSError) as e:
        print(f"disttrain export: error: {e}", file=sys.stderr)
        return 1
    size = sum(t.numel() * t.element_size() for t in state.values())
    print(f"exported the model of {name} ({len(state)} tensors, {size / 2**20:.1f} MiB) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
