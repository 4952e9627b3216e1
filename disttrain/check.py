"""`disttrain check`: are your gradients the same under every strategy?

Two optimizer steps of the configured job, from the same weights over the same samples, under

    single        one process, each step's samples in one batch (the reference)
    accumulate    one process, a step's samples in `--accumulate` micro-batches
    ddp           `--nproc` processes under torchrun, each its share of the samples
    ddp+accum     the same, each share in 2 micro-batches
    dp            DataParallel in one process
    fsdp          FSDP2 over `--nproc` processes, each its share
    fsdp+accum    the same, each share in 2 micro-batches
    hsdp          FSDP2 over a 2 × 2 mesh of 4 processes (strategy.replicate=2)
    V+full        single, ddp and fsdp with every block's activations recomputed in backward
    V+selective   the same with every other block's (strategy.activation_checkpointing); only for a
                  model with blocks (strategy.fsdp_blocks')

The variants of `--nproc` processes run one after another in one torchrun job, hsdp in another;
`--variants single,ddp` runs only those named (and starts no torchrun job when they are all of one process).
A model with dropout draws other random numbers under every strategy: its variants are compared only
with their activation-checkpointed twins (V with V+full and V+selective), which must recompute the
same random numbers, and only the variants that have such twins run.

The first step takes `--samples` samples; the second (`+tail`) is an epoch's short last step, of
`--samples` / 2 + 1 more: the ranks hold unequal shares, and a rank fewer micro-batches than another.
The learning rate is zero, so both steps start from the initial weights. Each variant is a real
`fit()` over the dataset's first samples in their order (trainer.shuffle=false): rank r holds the
step's samples r, r + world, ..., as in any run, and a callback keeps the
gradients the optimizer is about to apply (on_before_optimizer_step) and the loss the step reports
(on_log: the mean over all items of the window on all ranks, what metrics.jsonl logs; compared
relative to its size when above 1). The steps are compared pair by pair, each with the same step of
the other variants, in the form of the seed's `cmp`: exact (bit-equal), approximate (allclose),
maxdiff. The exit code is 1 when a pair differs by more than `--tol`, with one line on the likely
cause: BatchNorm (its statistics are per micro-batch), or a loss that is not the mean over the items
the step reports.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from disttrain.config import ConfigError, TrainConfig, load_config, to_dict, validate

#: The variants of one process and of torchrun: (strategy, micro-batches per rank; None: --accumulate).
SINGLE_PROCESS = {"single": ("single", 1), "accumulate": ("single", None), "dp": ("dp", 1)}
MULTI = {"ddp": ("ddp", 1), "ddp+accum": ("ddp", 2), "fsdp": ("fsdp", 1), "fsdp+accum": ("fsdp", 2)}
#: HSDP: (processes, replica groups), run as fsdp with strategy.replicate.
HSDP = {"hsdp": (4, 2)}
#: The variants activation checkpointing adds to these (a model with blocks only).
CHECKPOINTED = ("single", "ddp", "fsdp")
CHECKPOINTING = ("full", "selective")
#: The second step's name suffix: an epoch's last window, shorter than the global batch.
TAIL = "+tail"
#: The name under which the loss the step reports is compared, beside the parameters' gradients.
REPORTED_LOSS = "(the loss the step reports)"


def tail_of(samples: int) -> int:
    """The samples of the epoch's short last step, after a whole one of `samples`: ranks then hold
    unequal shares (one fewer on some), and a rank fewer micro-batches than another."""
    return samples // 2 + 1


class GradientCapture:
    """A callback that keeps the gradients each optimizer step is about to apply (gathered, if they are
    sharded: every rank calls it) and, on rank 0, the loss each step reports (metrics.jsonl's)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.losses: dict[int, float] = {}

    def on_before_optimizer_step(self, run: Any) -> None:
        grads = {}
        for name, p in run.model.named_parameters():
            if p.grad is not None:
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name] = grad.detach().double().cpu().clone()
        self.steps.append(grads)

    def on_log(self, run: Any, record: dict[str, Any]) -> None:
        if "loss" in record:
            self.losses[record["step"]] = record["loss"]

    def results(self) -> list[dict[str, torch.Tensor]]:
        return [
            {**grads, REPORTED_LOSS: torch.tensor(self.losses[i + 1], dtype=torch.float64)}
            for i, grads in enumerate(self.steps)
        ]


def capture_steps(
    cfg: TrainConfig, samples: Head, accumulate: int, env: Any = None
) -> list[dict[str, torch.Tensor]]:
    """fit() over `samples`: a whole step of `--samples` of them and the epoch's short last step of the
    rest, in micro-batches of --samples / (world × accumulate); the gradients and the reported loss of
    each step (on rank 0; [] elsewhere). The optimizer has a learning rate of zero, so both steps start
    from the initial weights."""
    from hydra.utils import instantiate

    from disttrain.dist import placement
    from disttrain.trainer import Trainer
    from disttrain.worker import build

    world = placement().world_size
    cfg.trainer.batch_size = cfg.trainer.global_batch_size // (world * accumulate)
    cfg.trainer.accumulate, cfg.trainer.global_batch_size = accumulate, 0
    torch.manual_seed(cfg.trainer.seed)
    model = build("model", cfg.model)
    step = instantiate(cfg.step, _partial_=True) if cfg.step else None
    capture = GradientCapture()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    Trainer(model, optimizer, samples, cfg, step=step, env=env, callbacks=[capture]).fit()
    return capture.results() if capture.losses else []  # (rank 0 is the one that logs)


class Head(Dataset):
    """The first `n` samples of a dataset, which keeps declaring what the dataset declares (its loss,
    loss items, vocabulary): the Trainer reads those from the dataset it is given."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "n"):  # (not set yet: unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def check_config(overrides: list[str], config_dirs: list[str], samples: int) -> TrainConfig:
    from disttrain.compose import compose

    data = compose(overrides, config_dirs)
    # Two clean steps of one epoch: no clipping (it would hide a difference), fp32 unless asked otherwise,
    # `samples` a step; each variant splits them into its micro-batches (capture_steps).
    data["trainer"]["grad_clip_norm"] = 0.0
    data["health"]["on_explosion"] = "warn"  # skip/halve_lr need clipping, which a check turns off
    data["trainer"]["batch_size"] = data["trainer"]["accumulate"] = 1
    data["trainer"]["global_batch_size"] = samples
    data["trainer"].update(val_fraction=0.0, max_epochs=1, max_steps=2, drop_last=False, shuffle=False)
    data["snapshot"]["every_steps"] = 0
    cfg = load_config(data)
    validate(cfg, world_size=1)
    return cfg


def first_samples(cfg: TrainConfig, n: int) -> Head:
    """The dataset's first `n` samples: a whole step's and the short last step's."""
    from disttrain.worker import build

    dataset = build("data", cfg.data)
    if len(dataset) < n:
        raise ConfigError(f"--samples: the dataset has only {len(dataset)} samples, the check takes {n}")
    return Head(dataset, n)


def cmp_rows(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor], tol: float) -> list[tuple]:
    rows = []
    for name, ref in reference.items():
        got = other[name]
        if name == REPORTED_LOSS:  # a mean of float32 values, compared relative to its size past 1
            ref, got = (t / max(1.0, abs(reference[name].item())) for t in (ref, got))
        maxdiff = (ref - got).abs().max().item()
        rows.append(
            (name, bool(torch.equal(ref, got)), bool(torch.allclose(ref, got, rtol=0, atol=tol)), maxdiff)
        )
    return rows


def _worker(args: argparse.Namespace) -> int:
    """One torchrun job's variants, one fit() after another in the same process group."""
    import json

    from disttrain.dist import distributed

    variants = json.loads(Path(args.config).read_text())
    captured = {}
    first = load_config(next(iter(variants.values()))[0])
    # One process group for all the variants (a Trainer that made its own would leave it at its end).
    with distributed(first.trainer.device, first.trainer.timeout_s) as env:
        for name, (data, micro) in variants.items():
            cfg = load_config(data)
            tail = tail_of(args.samples) if cfg.trainer.max_steps == 2 else 0
            captured[name] = capture_steps(cfg, first_samples(cfg, args.samples + tail), micro, env)
    if any(captured.values()):  # (rank 0)
        torch.save(captured, args.out)
    return 0


def variant_config(cfg: TrainConfig, tmp: Path, name: str, strategy: str, **settings: Any) -> dict[str, Any]:
    """The check's config as variant `name` runs it: `strategy` with `settings` (strategy's keys)."""
    data = to_dict(cfg)
    data["strategy"].update(name=strategy, **settings)
    data["run_dir"] = str(tmp / name)
    return data


def _run_torchrun(
    cfg: TrainConfig, args: argparse.Namespace, nproc: int, variants: dict[str, tuple[dict, int]], tmp: Path
) -> dict[str, list[Any]]:
    """`variants` (name: config, micro-batches) in one torchrun job of `nproc` processes."""
    import json

    first = next(iter(variants))
    config = tmp / f"{first}.json"
    config.write_text(json.dumps(variants))
    out = tmp / f"{first}.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "disttrain.check", "--worker", "--config", str(config), "--out", str(out),
        "--samples", str(args.samples),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cfg.trainer.num_threads)))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        names = ", ".join(variants)
        raise RuntimeError(f"{names}: torchrun exited {result.returncode}:\n{result.stderr[-3000:]}")
    return torch.load(out, weights_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disttrain check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="samples in the one step (default 16)")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches for the accumulate variant")
    parser.add_argument("--nproc", type=int, default=2, help="processes for the DDP variants")
    parser.add_argument("--tol", type=float, default=1e-6, help="largest absolute difference allowed")
    parser.add_argument(
        "--variants", default="", help="only these, comma-separated (default: every variant), e.g. single,ddp"
    )
    parser.add_argument("-cd", "--config-dir", action="append", default=[], help="your config groups")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.worker:
        return _worker(args)
    try:
        for key, value, parts in (("--accumulate", args.accumulate, 1), ("--nproc", args.nproc, 2)):
            if value < 1 or args.samples % (value * parts):
                raise ConfigError(f"{key}={value}: --samples ({args.samples}) must split evenly into it")
        selected = [v for v in args.variants.split(",") if v] if args.variants else None
        hsdp_processes = max(nproc for nproc, _ in HSDP.values())
        if (selected is None or set(selected) & set(HSDP)) and args.samples % hsdp_processes:
            rule = f"must split evenly into the hsdp variant's {hsdp_processes} processes"
            raise ConfigError(f"--samples={args.samples}: {rule}")
        cfg = check_config(overrides, args.config_dir, args.samples)
        # A BatchNorm cannot train on the short step's micro-batch of one sample (the Trainer refuses it).
        tail = 0 if has_batchnorm(cfg) else tail_of(args.samples)
        cfg.trainer.max_steps = 2 if tail else 1
        samples = first_samples(cfg, args.samples + tail)
        checkpointed = has_blocks(cfg)
        if selected is not None:
            check_variants(selected, checkpointed)
    except ConfigError as e:
        print(f"disttrain: error: {e}", file=sys.stderr)
        return 2
    # With dropout a variant is compared with its activation-checkpointed twins only: one without twins
    # would be run for nothing.
    twins_only = has_dropout(cfg)
    twinned = set(CHECKPOINTED) if checkpointed else set()

    def wanted(name: str) -> bool:
        return (selected is None or name in selected) and (not twins_only or twin_of(name) in twinned)

    captured: dict[str, list[Any]] = {}
    with tempfile.TemporaryDirectory(prefix="disttrain-check-") as tmp_dir:
        tmp = Path(tmp_dir)
        single = dict(SINGLE_PROCESS)
        multi: dict[str, tuple[dict, int]] = {
            name: (variant_config(cfg, tmp, name, strategy), micro)
            for name, (strategy, micro) in MULTI.items()
        }
        for base in CHECKPOINTED if checkpointed else ():
            for mode in CHECKPOINTING:
                name = f"{base}+{mode}"
                if base == "single":
                    single[name] = ("single", 1)
                else:
                    config = variant_config(cfg, tmp, name, base, activation_checkpointing=mode)
                    multi[name] = (config, 1)
        single = {name: v for name, v in single.items() if wanted(name)}
        multi = {name: v for name, v in multi.items() if wanted(name)}
        for name, (strategy, micro) in single.items():
            mode = name.partition("+")[2] if name.startswith("single+") else "none"
            data = variant_config(cfg, tmp, name, strategy, activation_checkpointing=mode)
            captured[name] = capture_steps(load_config(data), samples, micro or args.accumulate)
        if multi:
            captured |= _run_torchrun(cfg, args, args.nproc, multi, tmp)
        for name, (nproc, replicas) in HSDP.items():
            if not wanted(name):
                continue
            hsdp = {name: (variant_config(cfg, tmp, name, "fsdp", replicate=replicas), 1)}
            captured |= _run_torchrun(cfg, args, nproc, hsdp, tmp)
    # A step over the epoch's short end is compared with the others' (report pairs tails with tails).
    results = {name: steps[0] for name, steps in captured.items()}
    results |= {name + TAIL: steps[1] for name, steps in captured.items() if len(steps) > 1}
    if not tail:
        print("(the model has BatchNorm: the +tail step, with a micro-batch of one sample, is left out)")
    if twins_only:
        print(
            "(the model has dropout, whose random numbers differ between strategies: each variant is "
            "compared with its activation-checkpointed twins only)"
        )
    return report(results, args.tol, mismatch_cause(cfg), twins_only=twins_only)


def check_variants(selected: list[str], checkpointed: bool) -> None:
    """--variants names two variants or more, each one the job has (ConfigError otherwise)."""
    known = [*SINGLE_PROCESS, *MULTI, *HSDP]
    if checkpointed:
        known += [f"{base}+{mode}" for base in CHECKPOINTED for mode in CHECKPOINTING]
    for name in selected:
        if name not in known:
            raise ConfigError(
                f"--variants={','.join(selected)!r}: no variant {name!r}; the job's are {', '.join(known)}"
            )
    if len(set(selected)) < 2:
        raise ConfigError(f"--variants={','.join(selected)!r}: name two variants or more, to compare")


def _meta_model(cfg: TrainConfig) -> Any:
    from disttrain.worker import build

    with torch.device("meta"):
        return build("model", cfg.model)


def has_blocks(cfg: TrainConfig) -> bool:
    from disttrain.strategy import find_blocks

    return bool(find_blocks(_meta_model(cfg), cfg.strategy.fsdp_blocks))


def has_dropout(cfg: TrainConfig) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in _meta_model(cfg).modules())


def twin_of(name: str) -> str:
    """The variant `name` checkpoints activations of (itself when it checkpoints none)."""
    for mode in CHECKPOINTING:
        name = name.replace(f"+{mode}", "")
    return name


def has_batchnorm(cfg: TrainConfig) -> bool:
    from torch import nn

    from disttrain.worker import build

    with torch.device("meta"):
        model = build("model", cfg.model)
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def mismatch_cause(cfg: TrainConfig) -> str:
    """What most likely breaks the identity for this job, in one line."""
    if has_batchnorm(cfg):
        return "the model has BatchNorm, whose statistics are per micro-batch"
    if has_dropout(cfg):
        return "activation checkpointing recomputed a block's forward with other random numbers"
    if cfg.step:
        return (
            f"the step {cfg.step['_target_']} returns a loss that is not the mean over the items it reports "
            "(a token loss returned without its count is weighted like a mean over samples)"
        )
    return (
        "the model's loss is not the mean over the items disttrain counts for it (labels that are not -100; "
        "see disttrain.step); pass a step function that returns (loss, items)"
    )


def report(
    results: dict[str, dict[str, torch.Tensor]], tol: float, cause: str = "", twins_only: bool = False
) -> int:
    """Every pair of variants (with `twins_only`, each with its activation-checkpointed twins), one line
    each (the worst parameter of the pair), then the parameters of each pair that differs beyond `tol`."""
    names = list(results)
    # A tail variant steps over other samples than a whole window: it is compared with its own kind.
    pairs = [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if a.endswith(TAIL) == b.endswith(TAIL) and (not twins_only or twin_of(a) == twin_of(b))
    ]
    print(f"one optimizer step, every pair of strategies compared (tolerance {tol:g})")
    print(f"{'pair':40s} | {'exact':5s} | {'approximate':11s} | {'maxdiff':9s} | worst parameter")
    failed: list[tuple[str, str, list[tuple]]] = []
    for a, b in pairs:
        rows = cmp_rows(results[a], results[b], tol)
        worst = max(rows, key=lambda r: r[3])
        exact, approx = all(r[1] for r in rows), all(r[2] for r in rows)
        print(f"{a + ' ~ ' + b:40s} | {exact!s:5s} | {approx!s:11s} | {worst[3]:.3e} | {worst[0]}")
        if not approx:
            failed.append((a, b, [r for r in rows if not r[2]]))
    for a, b, rows in failed:
        print(f"\n{a} ~ {b}:")
        for name, exact, approx, maxdiff in rows:
            print(f"  {name:30s} | exact: {exact!s:5s} | approximate: {approx!s:5s} | maxdiff: {maxdiff:.3e}")
    if failed:
        print(f"\nMISMATCH: {len(failed)} of {len(pairs)} pairs differ beyond {tol:g}: {cause}")
        return 1
    print(f"OK: all {len(pairs)} pairs give the same gradients within {tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
