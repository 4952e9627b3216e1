"""`disttrain check`: are your gradients the same under every strategy?

One optimizer step of the configured job, from the same weights and the same samples, under

    single        one process, one batch of all the samples (the reference)
    accumulate    one process, the samples in `--accumulate` micro-batches
    ddp           `--nproc` processes under torchrun, each a contiguous share of the samples
    ddp+accum     the same, each share in 2 micro-batches
    dp            DataParallel in one process
    fsdp          FSDP2 over `--nproc` processes, each a contiguous share
    fsdp+accum    the same, each share in 2 micro-batches

Each variant runs the Trainer's own step (`Trainer._train_step`, no_sync included) and captures the
gradients the optimizer is about to apply, and the loss the step reports (the mean over all items of
the window on all ranks, what metrics.jsonl logs; compared relative to its size when above 1). Every
variant is compared with the reference in the form of the seed's `cmp`: exact (bit-equal), approximate
(allclose), maxdiff. The exit code is 1 when a pair
differs by more than `--tol`, with one line on the likely cause: BatchNorm (its statistics are per
micro-batch), or a loss that is not the mean over the items the step reports.
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

from disttrain.config import ConfigError, TrainConfig, load_config, to_dict, validate

SINGLE_PROCESS = {"single": ("single", 1), "accumulate": ("single", None), "dp": ("dp", 1)}
#: The name under which the loss the step reports is compared, beside the parameters' gradients.
REPORTED_LOSS = "(the loss the step reports)"
#: The variants that run under torchrun: (strategy, micro-batches per rank).
MULTI = {"ddp": ("ddp", 1), "ddp+accum": ("ddp", 2), "fsdp": ("fsdp", 1), "fsdp+accum": ("fsdp", 2)}


def capture_step(cfg: TrainConfig, samples: list[Any], accumulate: int) -> dict[str, torch.Tensor] | None:
    """Run one Trainer step over this rank's contiguous share of `samples`, split into `accumulate`
    micro-batches; return the gradients the optimizer saw (on rank 0), keyed by parameter name."""
    from disttrain.step import collate
    from disttrain.worker import build_trainer

    trainer = build_trainer(cfg, env=None)
    world, rank = trainer.env.world_size, trainer.env.rank
    share = len(samples) // world
    mine = samples[rank * share : (rank + 1) * share]
    micro = len(mine) // accumulate
    window = [collate(mine[i * micro : (i + 1) * micro]) for i in range(accumulate)]
    names = {p: n for n, p in trainer.module.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def grab(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:  # a sharded gradient is gathered (every rank calls this)
                    grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    grads[names[p]] = grad.detach().double().cpu().clone()

    trainer.optimizer.register_step_pre_hook(grab)
    # The loss the step reports is compared too: the window's mean on all ranks, in every variant.
    loss = trainer._step_losses([trainer._train_step(window)])[0]  # (collective: on every rank)
    grads[REPORTED_LOSS] = torch.tensor(loss, dtype=torch.float64)
    from disttrain.dist import teardown

    teardown()
    return grads if rank == 0 else None


def check_config(overrides: list[str], config_dirs: list[str], world_size: int) -> TrainConfig:
    from disttrain.compose import compose

    data = compose(overrides, config_dirs)
    # One clean step: no clipping (it would hide a difference), fp32 unless asked otherwise, no snapshots.
    # The check builds its windows itself: the loader's batch size only has to fit the samples.
    data["trainer"]["grad_clip_norm"] = 0.0
    data["health"]["on_explosion"] = "warn"  # skip/halve_lr need clipping, which a check turns off
    data["trainer"]["batch_size"] = data["trainer"]["accumulate"] = 1
    data["trainer"]["val_fraction"] = 0.0
    cfg = load_config(data)
    validate(cfg, world_size=1)
    return cfg


def first_samples(cfg: TrainConfig, n: int) -> list[Any]:
    from hydra.utils import instantiate

    dataset = instantiate(cfg.data)
    if len(dataset) < n:
        raise ConfigError(f"--samples={n}: the dataset has only {len(dataset)} samples")
    return [dataset[i] for i in range(n)]


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
    import json

    data = json.loads(Path(args.config).read_text())
    cfg = load_config(data)
    grads = capture_step(cfg, first_samples(cfg, args.samples), args.micro)
    if grads is not None:
        torch.save(grads, args.out)
    return 0


def _run_variant_torchrun(
    cfg: TrainConfig, args: argparse.Namespace, strategy: str, micro: int, tmp: Path, name: str
) -> dict:
    import json

    data = to_dict(cfg)
    data["strategy"]["name"] = strategy
    data["run_dir"] = str(tmp / name)
    config = tmp / f"{name}.json"
    config.write_text(json.dumps(data))
    out = tmp / f"{name}.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
        "-m", "disttrain.check", "--worker", "--config", str(config), "--out", str(out),
        "--samples", str(args.samples), "--micro", str(micro),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cfg.trainer.num_threads)))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: torchrun exited {result.returncode}:\n{result.stderr[-3000:]}")
    return torch.load(out, weights_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disttrain check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="samples in the one step (default 16)")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches for the accumulate variant")
    parser.add_argument("--nproc", type=int, default=2, help="processes for the DDP variants")
    parser.add_argument("--tol", type=float, default=1e-6, help="largest absolute difference allowed")
    parser.add_argument("-cd", "--config-dir", action="append", default=[], help="your config groups")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--micro", type=int, default=1, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.worker:
        return _worker(args)
    try:
        for key, value, parts in (("--accumulate", args.accumulate, 1), ("--nproc", args.nproc, 2)):
            if value < 1 or args.samples % (value * parts):
                raise ConfigError(f"{key}={value}: --samples ({args.samples}) must split evenly into it")
        cfg = check_config(overrides, args.config_dir, 1)
        samples = first_samples(cfg, args.samples)
    except ConfigError as e:
        print(f"disttrain: error: {e}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory(prefix="disttrain-check-") as tmp:
        for name, (strategy, micro) in SINGLE_PROCESS.items():
            data = to_dict(cfg)
            data["strategy"]["name"] = strategy
            data["run_dir"] = str(Path(tmp) / name)
            grads = capture_step(load_config(data), samples, micro or args.accumulate)
            assert grads is not None
            results[name] = grads
        for name, (strategy, micro) in MULTI.items():
            results[name] = _run_variant_torchrun(cfg, args, strategy, micro, Path(tmp), name)
    return report(results, args.tol, mismatch_cause(cfg))


def mismatch_cause(cfg: TrainConfig) -> str:
    """What most likely breaks the identity for this job, in one line."""
    from hydra.utils import instantiate
    from torch import nn

    model = instantiate(cfg.model)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return "the model has BatchNorm, whose statistics are per micro-batch"
    if cfg.step:
        return (
            f"the step {cfg.step['_target_']} returns a loss that is not the mean over the items it reports "
            "(a token loss returned without its count is weighted like a mean over samples)"
        )
    return (
        "the model's loss is not the mean over the items disttrain counts for it (labels that are not -100; "
        "see disttrain.step); pass a step function that returns (loss, items)"
    )


def report(results: dict[str, dict[str, torch.Tensor]], tol: float, cause: str = "") -> int:
    """Every pair of variants, one line each (the worst parameter of the pair), then the parameters of
    each pair that differs beyond `tol`."""
    names = list(results)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    print(f"one optimizer step, every pair of strategies compared (tolerance {tol:g})")
    print(f"{'pair':26s} | {'exact':5s} | {'approximate':11s} | {'maxdiff':9s} | worst parameter")
    failed: list[tuple[str, str, list[tuple]]] = []
    for a, b in pairs:
        rows = cmp_rows(results[a], results[b], tol)
        worst = max(rows, key=lambda r: r[3])
        exact, approx = all(r[1] for r in rows), all(r[2] for r in rows)
        print(f"{a + ' ~ ' + b:26s} | {exact!s:5s} | {approx!s:11s} | {worst[3]:.3e} | {worst[0]}")
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
