"""Built-in datasets, the sampler that starts an epoch anywhere, and the loaders.

Every dataset is map-style and deterministic: built from a seed or a file, never downloaded. A dataset
may declare `loss = "cross_entropy"` or `"mse"`; `trainer.loss=auto` takes it.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset, default_collate

from disttrain.config import ConfigError, TrainerConfig, accumulate_for

# torchdata calls a deprecated torch hook on import; the warning is noise for users.
warnings.filterwarnings("ignore", message=".*set_vital.*")
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

Sample = tuple[torch.Tensor, torch.Tensor]


class _Windows(Dataset):
    """Next-token samples over a token stream: `context` tokens in, the following token out.

    With `sequence=True` the target is the input shifted by one, `tokens[i+1 : i+context+1]`: a
    prediction at every position, as a GPT trains (`context` is then its block size). Both modes read
    the same windows of `context + 1` tokens, so the dataset's length does not change with the mode.
    """

    loss = "cross_entropy"
    #: Every sample has the same targets and none is ignored: weighted by samples (disttrain.step).
    loss_items = "samples"

    def __init__(self, tokens: torch.Tensor, context: int, sequence: bool = False, source: str = "") -> None:
        _check_windows(source or f"data: {len(tokens)} tokens", len(tokens), context)
        self.tokens = tokens
        self.context = context
        self.sequence = sequence

    def __len__(self) -> int:
        return max(0, len(self.tokens) - self.context)

    def __getitem__(self, i: int) -> Sample:
        row = self.tokens[i : i + self.context + 1]
        return row[:-1], row[1:] if self.sequence else row[-1]

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        # One gather for the whole batch instead of a slice per sample.
        idx = torch.as_tensor(indices).unsqueeze(1) + torch.arange(self.context + 1)
        rows = self.tokens[idx]
        return list(zip(rows[:, :-1], rows[:, 1:] if self.sequence else rows[:, -1], strict=True))


def _check_windows(source: str, tokens: int, context: int) -> None:
    """A token stream too short for one window: len() would be negative (a traceback from len()) or 0."""
    if tokens <= context:
        raise ConfigError(
            f"{source}: makes no sample: one sample is a window of data.context + 1 = {context + 1} tokens"
        )


class TokenCorpus(_Windows):
    """A generated language with structure a model can learn: a Markov chain in which each token is
    followed by one of `branching` successors (fixed per token, drawn from the seed) with skewed
    probabilities. The best achievable loss is the entropy of those probabilities (≈0.8 nats for 3),
    far below the ln(vocab_size) of guessing, so a falling loss shows learning. `sequence=True` gives
    GPT samples (see `_Windows`)."""

    def __init__(
        self,
        vocab_size: int = 1000,
        num_tokens: int = 100_000,
        context: int = 4,
        branching: int = 3,
        seed: int = 0,
        sequence: bool = False,
    ) -> None:
        _check_windows(f"data.num_tokens={num_tokens}", num_tokens, context)
        rng = np.random.default_rng(seed)
        successors = rng.integers(0, vocab_size, size=(vocab_size, branching))
        weights = 0.5 ** np.arange(branching)
        choices = rng.choice(branching, size=num_tokens, p=weights / weights.sum())
        tokens = np.empty(num_tokens, dtype=np.int64)
        tokens[0] = rng.integers(vocab_size)
        for i in range(1, num_tokens):
            tokens[i] = successors[tokens[i - 1], choices[i]]
        super().__init__(torch.from_numpy(tokens), context, sequence)
        self.vocab_size = vocab_size


class TextFile(_Windows):
    """The bytes of a text file as tokens (vocabulary 256): point `data.path` at your own corpus.
    `sequence=True` gives character-level GPT samples (see `_Windows`)."""

    def __init__(self, path: str, context: int = 4, vocab_size: int = 256, sequence: bool = False) -> None:
        # vocab_size is an argument only so model configs can interpolate ${data.vocab_size}.
        if vocab_size != 256:
            raise ValueError(f"TextFile reads bytes: vocab_size must be 256, not {vocab_size}")
        data = Path(path).read_bytes()
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        super().__init__(tokens, context, sequence, f"data.path={path!r} ({len(tokens)} bytes)")
        self.vocab_size = 256


class RandomRegression(Dataset):
    """The PyTorch DDP tutorial's data: `size` random inputs of `in_features` and random targets."""

    loss = "mse"

    def __init__(self, size: int = 2048, in_features: int = 20, out_features: int = 1, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(size, in_features, generator=g)
        self.y = torch.rand(size, out_features, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Sample:
        return self.x[i], self.y[i]


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (rank r gets `perm[r::world]` of one permutation of (seed, epoch),
    padded with repeats to a multiple of world), started at a rank-local position: how an epoch
    continues after a resume, on any number of processes."""

    start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)


def training_splits(
    dataset: Dataset, val_dataset: Dataset | None, trainer: TrainerConfig, world_size: int
) -> tuple[Dataset, Dataset | None]:
    """The training and validation splits: `val_dataset` if given, else the last `trainer.val_fraction`
    of `dataset` held out (contiguous, so no sample leaks across). Refused in one line (ConfigError)
    when a split is too small to use: an empty dataset would never end an epoch, a training split
    smaller than one optimizer step would never make a whole one, and a held-out share that rounds to
    no sample would silently turn validation off."""
    n = _length("data", dataset)
    if n == 0:
        raise ConfigError("data: the dataset has no samples")
    if val_dataset is None and trainer.val_fraction:
        n_val = int(n * trainer.val_fraction)
        if n_val == 0:
            raise ConfigError(
                f"trainer.val_fraction={trainer.val_fraction!r}: holds out no sample of the dataset's {n} "
                "(raise it, or set 0 to train without validation)"
            )
        val_dataset = Subset(dataset, range(n - n_val, n))
        dataset = Subset(dataset, range(n - n_val))
    elif val_dataset is not None and _length("val_dataset", val_dataset) == 0:
        raise ConfigError("val_dataset: has no samples")
    accumulate = accumulate_for(trainer, world_size)
    step = world_size * trainer.batch_size * accumulate
    if len(dataset) < step:  # type: ignore[arg-type]
        raise ConfigError(
            f"data: the training split has {len(dataset)} samples, fewer than one optimizer step takes "  # type: ignore[arg-type]
            f"({world_size} process{'es' if world_size > 1 else ''} × trainer.batch_size "
            f"{trainer.batch_size} × trainer.accumulate {accumulate} = {step})"
        )
    return dataset, val_dataset


def _length(key: str, dataset: Dataset) -> int:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"{key}: {type(dataset).__name__} has no len(); the Trainer needs a map-style dataset "
            "(__len__ and __getitem__)"
        ) from None


class InProcessLoader:
    """The batches `torch.utils.data.DataLoader(num_workers=0)` yields, fetched the way it fetches them,
    without its per-batch machinery.

    The sampler's indices in chunks of `batch_size` (the last one shorter), each chunk fetched with the
    dataset's `__getitems__` where it has one, else one `dataset[i]` per index, then collated: the same
    batches in the same order. What it leaves out is what a batch fetched in the training process does
    not need: a profiler range around every batch and the iterator's bookkeeping (10 us a batch timed
    alone, 10-13 us of a tiny model's step in the training loop: a quarter of the Trainer's own cost).
    It also draws no worker seed from the global RNG, as DataLoader's iter() does without a generator."""

    #: DataLoader's attribute its workers are seeded from; without workers nothing reads it.
    generator: torch.Generator | None = None

    def __init__(
        self,
        dataset: Dataset,
        sampler: Sampler,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.collate_fn = collate_fn or default_collate

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        fetch = getattr(self.dataset, "__getitems__", None)
        dataset, collate_fn, indices = self.dataset, self.collate_fn, iter(self.sampler)
        while chunk := list(itertools.islice(indices, self.batch_size)):
            samples = fetch(chunk) if fetch else [dataset[i] for i in chunk]
            try:
                batch = collate_fn(samples)
            except RuntimeError:
                unlike = unlike_samples(chunk, samples)
                if unlike is None:
                    raise
                raise ConfigError(unlike) from None
            yield batch


def unlike_samples(indices: list[int], samples: list[Any]) -> str | None:
    """Why samples failed to stack into a batch, naming the first two whose tensor shapes differ (None if
    none do: the failure is another one)."""
    from disttrain.step import map_tensors

    def shapes(sample: Any) -> list[tuple[int, ...]]:
        found: list[tuple[int, ...]] = []
        map_tensors(lambda t: found.append(tuple(t.shape)), sample)
        return found

    first = shapes(samples[0])
    for index, sample in zip(indices[1:], samples[1:], strict=True):
        if (other := shapes(sample)) != first:
            one, two = next(((a, b) for a, b in zip(first, other, strict=False) if a != b), (first, other))
            return (
                f"data: samples {indices[0]} and {index} differ in shape ({one} and {two}), so they do not "
                "stack into one batch; make every sample the same shape (pad them), or pass a collate_fn "
                "that pads"
            )
    return None


def make_loader(
    dataset: Dataset,
    sampler: Sampler,
    batch_size: int,
    num_workers: int,
    pin: bool,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> InProcessLoader | StatefulDataLoader:
    """The loader of a split: batches fetched in the training process on the CPU (InProcessLoader), and
    torchdata's StatefulDataLoader where it does more: worker processes, pinned memory for CUDA. Where an
    epoch starts is the sampler's business (EpochSampler.set_epoch), so both resume alike."""
    if not num_workers and not pin:
        return InProcessLoader(dataset, sampler, batch_size, collate_fn)
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin,
        drop_last=False,
        persistent_workers=False,
    )
