"""Run under torchrun with 2 processes (or alone, in one): tests/streams.py's Uneven streams, rank 0's 37
training samples and rank 1's 32, validated on streams of 7 and 2 (rank 1 runs a filler while rank 0
reads its second batch). One process streams the same windows. `python uneven_stream.py RUN_DIR`."""

import sys

import torch

from disttrain import TrainConfig, Trainer
from disttrain.trainer import make_optimizer
from tests.order import Regressor
from tests.streams import Uneven


def main(run_dir: str) -> None:
    cfg = TrainConfig(run_dir=run_dir)
    t = cfg.trainer
    t.batch_size, t.global_batch_size, t.max_epochs, t.max_steps = 4, 16, 2, 100
    t.val_fraction, t.num_threads = 0, 1
    cfg.optim.lr = 0.05
    torch.manual_seed(t.seed)
    model = Regressor()
    train, val = Uneven([37, 32], window=8), Uneven([7, 2], window=4)
    Trainer(model, make_optimizer(cfg.optim, model), train, cfg, val_dataset=val).fit()


if __name__ == "__main__":
    main(sys.argv[1])
