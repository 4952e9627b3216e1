"""Run under torchrun with 2 processes: FSDP2's collectives per optimizer step with and without
accumulation (all-gathers and reduce-scatters, counted where FSDP2 calls them), the gradient norm the
Trainer clips against (global, the same on both ranks, equal to one process's unsharded norm), and a
non-finite gradient on one rank skipping the step on both."""

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import disttrain
from disttrain import TrainConfig, Trainer, distributed
from disttrain.config import StrategyConfig, TrainerConfig
from disttrain.data import TokenCorpus
from disttrain.models import CharGPT
from disttrain.step import DefaultStep

out = Path(sys.argv[1])
calls: Counter = Counter()
for name in ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor"):
    if hasattr(dist, name):
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name.split("_")[0] + "_" + _name.split("_")[1]] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def job(accumulate: int, run_dir: Path, poison: bool = False) -> dict:
    data = TokenCorpus(vocab_size=32, num_tokens=2000, context=8, sequence=True)
    disttrain.seed_everything(0)
    model = CharGPT(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    cfg = TrainConfig(
        run_dir=str(run_dir),
        strategy=StrategyConfig(name="fsdp"),
        trainer=TrainerConfig(batch_size=4, global_batch_size=8 * accumulate, max_steps=3, val_fraction=0),
    )

    class Norms:  # the norm the Trainer clips against, as a callback sees it
        def on_before_optimizer_step(self, run) -> None:
            norms.append(run.metrics["grad_norm"])

    norms: list[float] = []
    step = None
    if poison:  # rank 1's loss, and so its gradients, become inf on every step: both ranks must skip
        plain = DefaultStep(model, "cross_entropy", None, data.loss_items)

        def step(model, batch):
            out = plain(model, batch)
            return out._replace(loss=out.loss * float("inf")) if dist.get_rank() == 1 else out

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = Trainer(model, optimizer, data, cfg, step=step, callbacks=[Norms()])
    groups = 1 + len(trainer.strategy._blocks)
    per_step: list[dict] = []

    def at_step(*_):
        per_step.append(dict(calls))
        calls.clear()

    trainer.optimizer.register_step_pre_hook(at_step)
    result = trainer.fit()
    calls.clear()
    del trainer
    return {"groups": groups, "per_step": per_step, "norms": norms, "skipped": result["skipped_steps"]}


with distributed() as env:
    runs = {f"accumulate={k}": job(k, out.parent / f"run{k}") for k in (1, 4)}
    runs["poisoned"] = job(4, out.parent / "poisoned", poison=True)
    gathered = [None, None]
    dist.all_gather_object(gathered, runs)
    if env.is_main:
        out.write_text(json.dumps(gathered))
