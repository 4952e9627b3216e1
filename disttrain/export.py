"""`disttrain export RUN_DIR [-o OUT]`: the model of a run's newest good snapshot as one plain file.

    disttrain export runs/gpt/torchrun-xyz                 # writes runs/gpt/torchrun-xyz/model.pt
    disttrain export runs/gpt/torchrun-xyz -o gpt.pt
    disttrain export runs/gpt/torchrun-xyz --ema           # the EMA callback's averaged weights

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

from disttrain.callbacks import SHARDED_PREFIX
from disttrain.sharded import read_model, read_tensors
from disttrain.snapshot import DCP_DIR, Snapshot, SnapshotError, atomic_write, list_snapshots


def exported_state(run_dir: Path, ema: bool = False) -> tuple[str, dict[str, torch.Tensor]]:
    """(the snapshot's name, its model's full state) of the newest snapshot that verifies; with `ema`,
    the EMA callback's averaged parameters in place of the parameters (buffers stay the model's)."""
    errors = []
    for snap in list_snapshots(run_dir / "snapshots"):
        try:
            snap.verify()
            state = read_model(snap.path / DCP_DIR) if snap.sharded else snap.load_shared()["model"]
            if ema:
                state = {**state, **_ema_weights(snap)}
            return snap.path.name, state
        except SnapshotError as e:
            errors.append(str(e))
    if errors:
        raise SnapshotError(f"{run_dir}: no snapshot verifies (newest: {errors[0]})")
    raise SnapshotError(f"{run_dir}: no snapshot to export (not a run dir, or no snapshot written yet)")


def _ema_weights(snap: Snapshot) -> dict[str, torch.Tensor]:
    """The averaged parameters of the snapshot's one EMA callback (disttrain.ema)."""
    from disttrain.ema import KIND

    callbacks = snap.load_shared().get("callbacks", {})
    names = [name for name, s in callbacks.items() if isinstance(s, dict) and s.get("kind") == KIND]
    if len(names) != 1:
        found = f"{len(names)} ({', '.join(names)})" if names else "none"
        raise SnapshotError(f"{snap.path}: --ema needs the run's one EMA callback's state; it has {found}")
    weights = callbacks[names[0]].get("weights", {})
    if snap.sharded:  # each rank's shards, put together here
        weights = {**weights, **read_tensors(snap.path / DCP_DIR, f"{SHARDED_PREFIX}{names[0]}.weights.")}
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disttrain export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="the file to write (default RUN_DIR/model.pt)")
    parser.add_argument(
        "--ema", action="store_true", help="write the EMA callback's averaged weights (disttrain.ema)"
    )
    args = parser.parse_args(argv)
    out = args.output or args.run_dir / "model.pt"
    try:
        name, state = exported_state(args.run_dir, ema=args.ema)
        atomic_write(out, lambda f: torch.save(state, f))
    except (SnapshotError, OSError) as e:
        print(f"disttrain export: error: {e}", file=sys.stderr)
        return 1
    size = sum(t.numel() * t.element_size() for t in state.values())
    what = "the EMA weights" if args.ema else "the model"
    print(f"exported {what} of {name} ({len(state)} tensors, {size / 2**20:.1f} MiB) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
