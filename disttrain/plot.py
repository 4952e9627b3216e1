"""`disttrain plot RUN_DIR [RUN_DIR ...] [-o OUT.png]`: loss, gradient norm and throughput against step,
read from each run's metrics.jsonl, every run on the same three panels for comparison.

- loss: the training loss per step (solid) and, where the run validated, the validation loss (dashed,
  same colour);
- grad norm: the global norm before clipping, on a log scale; steps that were skipped (non-finite or
  exploding gradients) are marked with an x at the top of the panel (a non-finite norm has no point);
- throughput: samples/s per step.

Each run is labelled with its run_dir as given. matplotlib (`pip install disttrain[plot]`) draws with the
Agg backend: no display needed, so it works on a cluster's login node.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from disttrain.metrics import read_whole_records

PANELS = ("loss", "grad norm", "samples/s")


class PlotError(ValueError):
    """A run that cannot be plotted: one line, exit 2."""


def load_run(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics, every whole line of them; lines that are not (a killed run's torn last line,
    damaged bytes) are left out and counted in one line on stderr."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(
            f"{run_dir}: no metrics.jsonl (not a run directory, or the run has not logged a step)"
        )
    try:
        rows, skipped = read_whole_records(path)
    except OSError as e:
        raise PlotError(f"{path}: unreadable ({e.strerror or e})") from None
    if skipped:
        lines = f"{skipped} line{'s' if skipped > 1 else ''}"
        print(
            f"disttrain plot: {path}: skipped {lines} that {'are' if skipped > 1 else 'is'} not a whole "
            f"JSON record (a killed run's torn last line, or damaged bytes); plotted {len(rows)}",
            file=sys.stderr,
        )
    if not any("loss" in r for r in rows):
        raise PlotError(f"{run_dir}: metrics.jsonl holds no training step yet")
    return rows


def plot_runs(run_dirs: list[Path], out: Path) -> Any:
    """Draw every run onto one figure, save it as a PNG at `out`, and return the figure (its axes hold
    one labelled line per run and panel, plus one per validated run on the loss panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(str(d), load_run(d)) for d in run_dirs]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 9), sharex=True, constrained_layout=True)
    for i, (label, rows) in enumerate(runs):
        color = f"C{i % 10}"
        steps = [r for r in rows if "loss" in r]
        x = [r["step"] for r in steps]
        axes[0].plot(x, [r["loss"] for r in steps], color=color, lw=1, label=label)
        val = [r for r in rows if "val_loss" in r]
        if val:
            axes[0].plot(
                [r["step"] for r in val],
                [r["val_loss"] for r in val],
                "--o",
                ms=3,
                color=color,
                label=f"{label} (val)",
            )
        # An exploding step's norm is plotted even when it was skipped; a non-finite one cannot be.
        norms = [r["grad_norm"] if math.isfinite(r["grad_norm"]) else math.nan for r in steps]
        axes[1].plot(x, norms, color=color, lw=1, label=label)
        skipped = [r["step"] for r in steps if r.get("skipped")]
        if skipped:
            axes[1].plot(
                skipped,
                [1] * len(skipped),
                "x",
                color=color,
                transform=axes[1].get_xaxis_transform(),
                clip_on=False,
                label="_skipped",
            )
        axes[2].plot(x, [r["samples_per_s"] for r in steps], color=color, lw=1, label=label)
    for ax, name in zip(axes, PANELS, strict=True):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[1].set_yscale("log")
    axes[-1].set_xlabel("step")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="disttrain plot", description="Plot loss, gradient norm and throughput of runs against step."
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("-o", "--output", type=Path, default=Path("metrics.png"), help="PNG to write")
    args = parser.parse_args(argv)
    try:
        plot_runs(args.run_dirs, args.output)
    except PlotError as e:
        print(f"disttrain plot: error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("disttrain plot: error: needs matplotlib (pip install 'disttrain[plot]')", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0
