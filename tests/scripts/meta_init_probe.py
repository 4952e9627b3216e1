"""The Python API's sharded initialisation, run in one process (the reference: strategy=single) or
under torchrun with strategy=fsdp (argv: OUT_DIR STRATEGY REPLICATE): disttrain.build_model builds the
model on the meta device on every rank but rank 0, and the Trainer fills the shards with rank 0's
weights. Rank 0 writes what it saw: where each rank built, the weights' hash at step 0 and after 4
steps, the losses, and the final full weights (weights.pt)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import disttrain
from disttrain import TrainConfig, Trainer, distributed
from disttrain.config import StrategyConfig, TrainerConfig
from disttrain.data import TokenCorpus
from disttrain.metrics import params_sha256
from tests.targets import TableGPT

out, strategy, replicate = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = TrainConfig(
    run_dir=str(out / "run"),
    strategy=StrategyConfig(name=strategy, replicate=replicate),
    trainer=TrainerConfig(batch_size=16 // (1 if strategy == "single" else 4), global_batch_size=16,
                          max_steps=4, val_fraction=0, num_threads=1),
)  # fmt: skip
with distributed("cpu") as env:
    data = TokenCorpus(vocab_size=32, num_tokens=2000, context=8, sequence=True)
    disttrain.seed_everything(0)
    model = disttrain.build_model(
        lambda: TableGPT(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16), cfg, env
    )
    built_on = str(next(model.parameters()).device)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), data, cfg, env=env)
    start = params_sha256(trainer.module)
    table = trainer.module.table.tolist()
    summary = trainer.fit()
    state = {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trainer.module.state_dict().items()
    }
    built = [(built_on, table)] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(built, (built_on, table))
    if env.rank == 0:
        torch.save(state, out / "weights.pt")
        losses = [
            json.loads(line)["loss"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        report = {"built_on": [b[0] for b in built], "tables": [b[1] for b in built], "start_sha256": start,
                  "end_sha256": summary["params_sha256"], "losses": losses}  # fmt: skip
        (out / "probe.json").write_text(json.dumps(report))
