"""What one micro-batch contributes to an optimizer step: its loss, how many loss items that loss averages
over, and any extra metrics. Batches are any nested structure of tensors.

The contract a step keeps (the one escape hatch for a user's own loss):

    step(model, batch) -> loss | StepOutput(loss, items, metrics)

- `loss` is a scalar tensor: the MEAN over the batch's loss items (what `F.cross_entropy` and every
  `transformers` model return). The Trainer weights it by `items`, so the gradient of one optimizer
  step is the gradient of the mean over all items of the window on all ranks, whatever each
  micro-batch or rank holds (also zero items: a rank whose window holds none adds nothing).
- `items` is how many loss items the mean covers: non-ignored tokens for a token loss (an int or a
  0-dim tensor, counted on the device). A bare tensor, or `items=None`, means the batch's samples.
- `metrics` are extra scalars (accuracy, a loss term), each a mean over the same items: the Trainer
  averages them over items on all ranks and logs them in training and validation.

A micro-batch with zero items must still return a finite loss, or at least one whose gradient is
finite: `F.cross_entropy` over only ignored targets does (its forward is NaN, its backward zero); a
masked mean of your own should divide by `max(count, 1)`.

The default step (no step given) calls the model as the batch says:
- a mapping (a Hugging Face batch): `model(**batch)`; the output must carry the loss (a scalar tensor,
  a dict with "loss", or an object with `.loss`, as `ModelOutput`). Items: the batch's `labels` that
  are not -100 (`shift_labels` if given; for a `transformers` causal LM, which shifts its labels,
  `labels[..., 1:]`, as transformers' own Trainer counts them); without labels, the samples.
- a pair `(inputs, target)` (tuple, list or two-field NamedTuple): `loss_fn(model(inputs), target)` with
  the built-in `cross_entropy` (items: targets that are not -100) or `mse` (items: samples), or the
  Python `loss_fn=` given to the Trainer (a mean over samples).
- anything else (a tensor, a dataclass): `model(batch)`, whose output must carry the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate, get_worker_info

from disttrain.config import ConfigError

IGNORE_INDEX = -100


class StepOutput(NamedTuple):
    #: The mean loss over the batch's `items` (a scalar tensor).
    loss: torch.Tensor
    #: Loss items the mean covers (int or 0-dim tensor); None: the batch's samples.
    items: int | torch.Tensor | None = None
    #: Extra scalars, each a mean over the same items.
    metrics: Mapping[str, torch.Tensor] = {}


Step = Callable[[nn.Module, Any], "torch.Tensor | StepOutput | tuple"]


# ==== batches: collate, move, count =====================================================================


def collate(samples: Sequence[Any]) -> Any:
    """torch's `default_collate`, plus dataclasses at any depth (a batch of dataclasses is a dataclass
    of batches)."""
    first = samples[0]
    # Tensors and plain (inputs, target) samples first, the loader's every batch: the tests below (an
    # abstract class's isinstance among them) cannot match them.
    if type(first) is torch.Tensor:
        # What default_collate makes of tensors in the training process, without its checks (half its
        # cost); in a loader's worker it stacks into shared memory, which the batch then travels in.
        return torch.stack(list(samples)) if get_worker_info() is None else default_collate(list(samples))
    if type(first) in (tuple, list):
        return [collate(list(column)) for column in zip(*samples, strict=True)]
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = {f.name: collate([getattr(s, f.name) for s in samples]) for f in dataclasses.fields(first)}
        return type(first)(**fields)
    if isinstance(first, Mapping):
        return {key: collate([s[key] for s in samples]) for key in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):  # NamedTuple
        return type(first)(*(collate(list(column)) for column in zip(*samples, strict=True)))
    if isinstance(first, (tuple, list)):
        return [collate(list(column)) for column in zip(*samples, strict=True)]
    return default_collate(list(samples))


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """`batch` with `fn` applied to every tensor, its structure (dict, list, tuple, NamedTuple,
    dataclass) kept; other leaves (strings, numbers) as they are."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = {f.name: map_tensors(fn, getattr(batch, f.name)) for f in dataclasses.fields(batch)}
        return dataclasses.replace(batch, **fields)
    if isinstance(batch, Mapping):
        return {key: map_tensors(fn, value) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(fn, v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a batch on `device` (non_blocking: pinned memory copies asynchronously)."""
    if type(batch) in (list, tuple) and len(batch) == 2:
        inputs, target = batch
        if type(inputs) is torch.Tensor and type(target) is torch.Tensor:
            # The common batch, (inputs, target), moved as a hand-written loop moves it: the walk
            # (map_tensors: a call per node and per tensor) is the Trainer's cost, not the user's.
            # (What it cost: docs/benchmarks.md.)
            return type(batch)((inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)))
    return map_tensors(lambda t: t.to(device, non_blocking=True), batch)


def take(batch: Any, n: int) -> Any:
    """The first `n` samples of a batch (every tensor cut along its leading dimension)."""
    return map_tensors(lambda t: t[:n] if t.dim() else t, batch)


def num_samples(batch: Any) -> int:
    """The batch's samples: the leading dimension of its first batched tensor."""
    first = batch[0] if type(batch) in (list, tuple) and batch else batch
    if type(first) is torch.Tensor and first.dim():  # (inputs, target): no walk over the structure
        return first.shape[0]  # (not len(): for a tensor it is a Python function of torch's, every step)
    sizes: list[int] = []
    map_tensors(lambda t: sizes.append(len(t)) if t.dim() else None, batch)
    if not sizes:
        raise ConfigError(f"batch: {describe(batch)} holds no batched tensor; samples must hold tensors")
    return sizes[0]


# ==== losses and the default step ========================================================================


def cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the targets that are not -100 (class indices, any shape: one per sample or per token)."""
    # (N, C) fp32 logits and (N,) targets, the classifier's shapes, need no flatten or cast: each would be
    # a call into torch, every step, that returns its input.
    if out.dim() != 2:
        out = out.flatten(0, -2)
    if out.dtype != torch.float32:
        out = out.float()
    return F.cross_entropy(out, target if target.dim() == 1 else target.flatten(), ignore_index=IGNORE_INDEX)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), target)


#: Built-in losses for `(inputs, target)` batches, and what each one's mean is over (None: samples).
LOSSES: dict[str, tuple[Callable[..., torch.Tensor], Callable[[torch.Tensor], torch.Tensor] | None]] = {
    "cross_entropy": (cross_entropy, lambda target: (target != IGNORE_INDEX).sum()),
    "mse": (mse, None),
}


def loss_of(output: Any) -> torch.Tensor:
    """The loss a model's output carries: itself (a scalar tensor), output["loss"] or output.loss."""
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    raise ConfigError(
        f"model output: {describe(output)} carries no loss; return a scalar tensor, a dict with "
        '"loss" or an object with .loss (as transformers does when given labels), or pass a step function'
    )


def _shifts_labels(model: nn.Module) -> bool:
    """A `transformers` causal LM shifts its labels by one inside the model: its loss function (the one
    its loss_type names, ForCausalLMLoss when that names none, as transformers itself falls back) is
    ForCausalLMLoss, and it is no encoder-decoder."""
    if not hasattr(model, "loss_type"):
        return False
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    # None names no loss: transformers then uses ForCausalLM's. (getattr, not `model.loss_type`, which
    # nn.Module's __getattr__ types as a tensor or a submodule.)
    loss_type = getattr(model, "loss_type", None) or "ForCausalLM"
    loss = getattr(model, "_loss_function", None) or LOSS_MAPPING.get(loss_type, ForCausalLMLoss)
    config = getattr(model, "config", None)
    return loss is ForCausalLMLoss and not getattr(config, "is_encoder_decoder", False)


def label_items(batch: Mapping[str, Any], shifted: bool) -> torch.Tensor | None:
    """Non-ignored labels of a mapping batch, counted as the model's loss averages them (`shifted`: the
    model shifts its labels by one, _shifts_labels); None without labels (the loss is then taken to be a
    mean over samples)."""
    if "shift_labels" in batch:
        labels = batch["shift_labels"]
    elif "labels" in batch:
        labels = batch["labels"][..., 1:] if shifted else batch["labels"]
    else:
        return None
    return (labels != IGNORE_INDEX).sum()


class DefaultStep:
    """The step without a user's step function (module docstring): call the model as the batch says.

    A dataset whose samples all carry the same targets, none ignored (the built-in ones), may say so
    with `loss_items = "samples"`: its cross-entropy is then weighted by samples, which needs neither a
    count nor, under DDP, the all-reduce of the counts."""

    def __init__(
        self, model: nn.Module, loss: str, loss_fn: Callable[..., torch.Tensor] | None, loss_items: str
    ) -> None:
        if loss_items not in ("samples", "targets"):
            raise ConfigError(f"data: loss_items={loss_items!r}: must be 'samples' or 'targets'")
        # Read once from the user's module, unwrapped: hasattr() on a module without the attribute raises
        # and catches an AttributeError, which every micro-batch would pay.
        self.shifts_labels = _shifts_labels(model)
        self.loss_fn, self.count = (loss_fn, None) if loss_fn is not None else LOSSES[loss]
        self.loss_name = callable_name(loss_fn) if loss_fn is not None else loss
        if loss_items == "samples":
            self.count = None
        #: Whether the output and target shapes of a pair batch have been checked (on the first one).
        self.shapes_checked = False

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        # The pair first: the commonest batch, and a cheaper test than Mapping's (an abstract class).
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, target = batch
            items = self.count(target) if self.count is not None else None
            out = model(inputs)
            if not self.shapes_checked:
                self.check_shapes(out, target)
            return StepOutput(self.loss_fn(out, target), items)
        if isinstance(batch, Mapping):
            return StepOutput(loss_of(model(**batch)), label_items(batch, self.shifts_labels))
        return StepOutput(loss_of(model(batch)))

    def check_shapes(self, out: Any, target: Any) -> None:
        """An output and a target the loss would broadcast into another shape ([B, 1] against [B]: a
        [B, B] loss) train on a wrong loss without an error: refused in one line. mse needs equal
        shapes; a loss_fn of the user's, shapes that broadcast to more elements than either holds
        (cross-entropy's [B, C] against [B] does not broadcast, and is left alone)."""
        self.shapes_checked = True
        if not isinstance(out, torch.Tensor) or not isinstance(target, torch.Tensor):
            return
        if self.loss_fn is cross_entropy or out.shape == target.shape:
            return
        try:
            joint = torch.broadcast_shapes(out.shape, target.shape)
        except RuntimeError:
            if self.loss_fn is not mse:
                return  # (a loss of the user's that takes unlike shapes, as cross-entropy does)
            joint = None
        grows = joint is None or joint.numel() > max(out.numel(), target.numel())
        if self.loss_fn is not mse and not grows:
            return
        how = f"would broadcast to {tuple(joint)}" if joint is not None else "do not match"
        raise ConfigError(
            f"loss: the model's output of shape {tuple(out.shape)} and the target of shape "
            f"{tuple(target.shape)} {how} in {self.loss_name}; make them the same shape (e.g. squeeze the "
            "output's last dimension, or give the target one)"
        )


def as_step_output(result: Any) -> StepOutput:
    """A step's return value, checked: a scalar loss tensor, or (loss, items[, metrics])."""
    if type(result) is not StepOutput:  # (the default step's needs no conversion)
        if isinstance(result, torch.Tensor):
            result = StepOutput(result)
        elif isinstance(result, tuple) and not isinstance(result, StepOutput):
            result = StepOutput(*result)
    if not isinstance(result, StepOutput) or not isinstance(result.loss, torch.Tensor):
        raise ConfigError(
            f"step: returned a {type(result).__name__}; it must return the loss (a scalar tensor) or "
            "StepOutput(loss, items, metrics)"
        )
    if result.loss.dim() != 0:
        raise ConfigError(
            f"step: returned a loss of shape {tuple(result.loss.shape)}; it must be a scalar, the mean over "
            "the batch's loss items"
        )
    return result


def describe(batch: Any) -> str:
    """A batch in a few words, for an error line: its type, and its keys or length."""
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a dict with keys {', '.join(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        if batch and all(isinstance(t, torch.Tensor) for t in batch):
            shapes = ", ".join(str(tuple(t.shape)) for t in batch)
            return f"a {type(batch).__name__} of {len(batch)} tensors of shapes {shapes}"
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"


def callable_name(fn: Callable[..., Any]) -> str:
    """module.qualname of a function (of a partial's function): how a config names it."""
    fn = getattr(fn, "func", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
