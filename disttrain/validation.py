"""The held-out split's loss: the mean over all of its loss items on all ranks, and the step function's
extra metrics as means over the same items."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from disttrain.callbacks import Callbacks, RunView
from disttrain.dist import DistEnv
from disttrain.metrics import ItemMeans
from disttrain.precision import Precision
from disttrain.run_state import Counters
from disttrain.step import Step, as_step_output, num_samples, take, to_device
from disttrain.streams import is_stream, val_batches


class Validator:
    """Runs the validation split; the counters keep its loss and the best one so far."""

    def __init__(
        self,
        loader: Any,
        step: Step,
        model: nn.Module,
        precision: Precision,
        env: DistEnv,
        batch_size: int,
        counters: Counters,
        callbacks: Callbacks,
        run_view: RunView,
    ) -> None:
        self.loader, self.step, self.model, self.precision = loader, step, model, precision
        self.env, self.batch_size, self.counters = env, batch_size, counters
        self.callbacks, self.run_view = callbacks, run_view

    @torch.no_grad()
    def __call__(self) -> dict[str, Any]:
        """The validation's line: step, epoch, val_loss and val_<metric>. The sampler pads the last shard
        with repeated samples; those positions (global index >= the split's length) are cut from the
        batch, so they never count."""
        c, world, device = self.counters, self.env.world_size, self.env.device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # sum of loss × items, items
        means = ItemMeans()
        self.callbacks.fire("on_validation_start", self.run_view)
        self.model.eval()
        for batch, real in self._batches():
            # A batch of padding only still runs (FSDP's ranks must all call forward), weighted by 0.
            batch = to_device(take(batch, max(real, 1)), device)
            with self.precision.autocast():
                out = as_step_output(self.step(self.model, batch))
            items = torch.as_tensor(real if out.items is None else out.items, device=device) * (real > 0)
            totals += torch.stack([torch.nan_to_num(out.loss.double()) * items, items.double()])
            if out.metrics:
                means.add(out.metrics, items)
        self.model.train()
        if world > 1:
            dist.all_reduce(totals)
        c.last_val_loss = (totals[0] / totals[1]).item()
        if c.last_val_loss < c.best_val_loss:
            c.best_val_loss, c.bad_validations = c.last_val_loss, 0
        else:
            c.bad_validations += 1
        record = {"step": c.step, "epoch": c.epoch, "val_loss": c.last_val_loss}
        record.update({f"val_{name}": value for name, value in means.read(world).items()})
        return record

    def _batches(self) -> Iterator[tuple[Any, int]]:
        """The batches with their real samples (the rest is padding): a stream's (each rank its own,
        disttrain.streams.val_batches), or the padded sampler's, whose positions past the split's
        length are repeats."""
        if is_stream(self.loader.dataset):
            yield from val_batches(self.loader, self.env)
            return
        world, val_split = self.env.world_size, self.loader.dataset
        assert isinstance(val_split, Sized)  # training_splits refused a split without len()
        n_real = len(val_split)
        for j, batch in enumerate(self.loader):
            # Rank r's k-th sample of batch j sits at global position r + world·(j·batch_size + k).
            first = self.env.rank + world * j * self.batch_size
            yield batch, min(num_samples(batch), max(0, -(-(n_real - first) // world)))
