"""Run under torchrun: `health_probe.py OUT.json [--poison INDEX] OVERRIDE ...`. Trains the job the
overrides describe (composed as the CLI does), then gathers every rank's view of the gradient-health
state (counters, learning rate, the schedule's base, a hash of its own parameters) into OUT.json, so a
test can check that all ranks decided alike. `--poison INDEX` sets one training sample's inputs to NaN
(regression data), which only the rank that draws it sees."""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate

from disttrain import Trainer, distributed
from disttrain.compose import compose
from disttrain.config import load_config
from disttrain.trainer import make_optimizer

out = Path(sys.argv[1])
args = sys.argv[2:]
poison = None
if args[:1] == ["--poison"]:
    poison, args = int(args[1]), args[2:]
cfg = load_config(compose(args))

with distributed() as env:
    dataset = instantiate(cfg.data)
    if poison is not None:
        dataset.x[poison] = float("nan")
    torch.manual_seed(cfg.trainer.seed)
    model = instantiate(cfg.model)
    trainer = Trainer(model, make_optimizer(cfg.optim, model), dataset, cfg, env=env)
    trainer.fit()
    c = trainer.counters
    mine = {
        "rank": env.rank,
        "skipped_steps": c.skipped_steps,
        "explosions": c.explosions,
        "lr_halvings": c.lr_halvings,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "base_lrs": trainer.scheduler.base_lrs,
        # Parameters only: BatchNorm's running statistics are each rank's own (DDP broadcasts rank 0's at
        # every forward, and the last forward updates them locally).
        "params_sha256": hashlib.sha256(
            b"".join(p.detach().numpy().tobytes() for p in trainer.module.parameters())
        ).hexdigest(),
        "params_finite": all(bool(p.isfinite().all()) for p in trainer.module.parameters()),
    }
    ranks = [None] * env.world_size
    dist.all_gather_object(ranks, mine)
    if env.is_main:
        out.write_text(json.dumps(ranks))
