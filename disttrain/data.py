"""Built-in datasets, the sampler that starts an epoch anywhere, and the loaders.

Every built-in dataset is map-style and deterministic: built from a seed or a file, never downloaded. A
dataset may declare `loss = "cross_entropy"` or `"mse"`; `trainer.loss=auto` takes it.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, Subset, default_collate

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


#: The token widths of a pre-tokenized file (`data.dtype`): nanoGPT's prepare.py writes uint16.
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class TokenFile(Dataset):
    """Pre-tokenized flat files of tokens, memory-mapped: the format nanoGPT's and Megatron's preparation
    scripts write (`np.array(ids, dtype=np.uint16).tofile("train.bin")`; `disttrain tokenize` writes it
    too). Never read whole: a sample reads its own `context + 1` tokens, so memory does not grow with the
    file. `path` is one file, a glob, or a list of either (files in sorted order of each glob); windows
    never cross from one file into the next. `sequence=True` (the default) gives GPT samples, the
    target the input shifted by one; False the next token alone, as TokenCorpus.

    Refused in one line (ConfigError) naming the file: a missing file, a glob that matches nothing, a
    size that is not a whole number of tokens, a file shorter than one window; a token id at or past
    `vocab_size`, found in the batch that holds it."""

    loss = "cross_entropy"
    loss_items = "samples"

    def __init__(
        self,
        path: str | list[str],
        context: int,
        vocab_size: int,
        dtype: str = "uint16",
        sequence: bool = True,
    ) -> None:
        if dtype not in TOKEN_DTYPES:
            raise ConfigError(f"data.dtype={dtype!r}: must be one of {', '.join(TOKEN_DTYPES)}")
        width = np.dtype(TOKEN_DTYPES[dtype]).itemsize
        self.context, self.vocab_size, self.sequence = context, vocab_size, sequence
        self.paths = token_paths(path)
        self.files = [_token_map(p, TOKEN_DTYPES[dtype], width, context) for p in self.paths]
        # Window i of the dataset is window i - starts[f] of file f, f the last file whose start <= i.
        self.starts = np.cumsum([0] + [len(f) - context for f in self.files])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> Sample:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        idx = np.asarray(indices, dtype=np.int64)
        if (idx < 0).any() or (idx >= len(self)).any():
            raise IndexError(f"TokenFile: index out of range 0..{len(self) - 1}")
        which = np.searchsorted(self.starts, idx, side="right") - 1
        rows = np.empty((len(idx), self.context + 1), dtype=np.int64)
        for f in np.unique(which):
            mine = which == f
            offsets = (idx[mine] - self.starts[f])[:, None] + np.arange(self.context + 1)
            rows[mine] = self.files[f][offsets]
            if (bad := int(rows[mine].max())) >= self.vocab_size:
                raise ConfigError(
                    f"data.path: {self.paths[f]} holds token id {bad}, which data.vocab_size="
                    f"{self.vocab_size} does not cover (ids must be below it)"
                )
        tokens = torch.from_numpy(rows)
        inputs, targets = tokens[:, :-1], tokens[:, 1:] if self.sequence else tokens[:, -1]
        return list(zip(inputs, targets, strict=True))


def token_paths(path: str | list[str] | Any) -> list[str]:
    """The files `path` names: a file, a glob, or a list of either; each glob's matches sorted."""
    import glob

    patterns = [path] if isinstance(path, str) else [str(p) for p in path]
    found: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ConfigError(f"data.path={pattern!r}: matches no file")
            found += matches
        elif not Path(pattern).is_file():
            raise ConfigError(f"data.path={pattern!r}: no such file")
        else:
            found.append(pattern)
    if not found:
        raise ConfigError("data.path=[]: names no file")
    return found


def _token_map(path: str, dtype: Any, width: int, context: int) -> np.memmap:
    size = Path(path).stat().st_size
    if size % width:
        raise ConfigError(
            f"data.path: {path} has {size} bytes, not a whole number of {width}-byte tokens (data.dtype)"
        )
    if size // width <= context:
        raise ConfigError(
            f"data.path: {path} holds {size // width} tokens, fewer than one window of data.context + 1 = "
            f"{context + 1}"
        )
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except OSError as e:
        raise ConfigError(f"data.path: {path} cannot be read: {e.strerror or e}") from None


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


class EpochSampler(Sampler[int]):
    """Rank r's share of an epoch: `perm[r::world]` of one permutation of (seed, epoch) (torch's
    DistributedSampler's permutation), started at a rank-local position (how an epoch continues after a
    resume, on any number of processes).

    The training order is never padded: when the samples do not divide by the number of processes, the
    ranks' shares differ by one, and the epoch's last window holds exactly the samples that are left
    (the Trainer weights them by their items and fills the ranks that run out with batches weighted by
    zero). Padding with repeats, as DistributedSampler does, would make the last step of every epoch
    train on duplicates whose number depends on the world size. `pad=True` keeps that padding for
    validation, which cuts the repeats from its sums itself; `drop_last` cuts the epoch to `length`."""

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        pad: bool = False,
        length: int | None = None,
    ) -> None:
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        #: Samples of an epoch on all ranks: the dataset's, or fewer (trainer.drop_last).
        self.length = len(dataset) if length is None else length  # type: ignore[arg-type]
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if not self.shuffle:
            return list(range(self.length))
        if (epoch_order := _epoch_order(self.dataset)) is not None:
            return epoch_order(self.seed, self.epoch, n)[: self.length]
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=g)[: self.length].tolist()

    def _share(self) -> int:
        """This rank's samples of the epoch (padded: every rank as many as rank 0)."""
        world = self.num_replicas
        return -(-self.length // world) if self.pad else max(0, -(-(self.length - self.rank) // world))

    def __len__(self) -> int:
        return max(0, self._share() - self.start)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.pad and len(order) % self.num_replicas:
            order += order[: self.num_replicas - len(order) % self.num_replicas]
        return itertools.islice(order, self.rank + self.start * self.num_replicas, None, self.num_replicas)


def _epoch_order(dataset: Dataset) -> Callable[[int, int, int], list[int]] | None:
    """A dataset's own shuffle (`epoch_order(seed, epoch, n)`: a permutation of its ids below n from
    (seed, epoch) alone, e.g. disttrain.shards.Shards' shard-aware one), also through the Subset that
    holds out validation at the end (its ids are the dataset's own, from 0)."""
    if isinstance(dataset, Subset):
        indices = dataset.indices
        if not (isinstance(indices, range) and indices.start == 0 and indices.step == 1):
            return None
        dataset = dataset.dataset
    return getattr(dataset, "epoch_order", None)


def training_splits(
    dataset: Dataset, val_dataset: Dataset | None, trainer: TrainerConfig, world_size: int
) -> tuple[Dataset, Dataset | None]:
    """The training and validation splits: `val_dataset` if given, else the last `trainer.val_fraction`
    of `dataset` held out (contiguous, so no sample leaks across). Refused in one line (ConfigError)
    when a split is too small to use: an empty dataset would never end an epoch, a training split
    smaller than one optimizer step would never make a whole one, and a held-out share that rounds to
    no sample would silently turn validation off. An IterableDataset (disttrain.streams) is checked by
    stream_splits."""
    if isinstance(dataset, IterableDataset):
        return stream_splits(dataset, val_dataset, trainer)
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
    elif (
        val_dataset is not None
        and not isinstance(val_dataset, IterableDataset)
        and not _length("val_dataset", val_dataset)
    ):
        raise ConfigError("val_dataset: has no samples")
    accumulate = accumulate_for(trainer, world_size)
    step = world_size * trainer.batch_size * accumulate
    if (n_train := _length("data", dataset)) < step:
        raise ConfigError(
            f"data: the training split has {n_train} samples, fewer than one optimizer step takes "
            f"({world_size} process{'es' if world_size > 1 else ''} × trainer.batch_size "
            f"{trainer.batch_size} × trainer.accumulate {accumulate} = {step})"
        )
    return dataset, val_dataset


def stream_splits(
    dataset: IterableDataset, val_dataset: Dataset | None, trainer: TrainerConfig
) -> tuple[Dataset, Dataset | None]:
    """A user's own IterableDataset trains as it is: no share of a stream can be held out for validation,
    and without len() nothing says how many steps an epoch has, which the learning-rate schedule needs
    (trainer.max_steps gives its length)."""
    name = type(dataset).__name__
    if val_dataset is None and trainer.val_fraction:
        raise ConfigError(
            f"trainer.val_fraction={trainer.val_fraction!r}: {name} is an IterableDataset, of which no "
            "share can be held out; pass val_dataset= (a stream or a map-style dataset), or set "
            "trainer.val_fraction=0"
        )
    if not trainer.max_steps and not isinstance(dataset, Sized):
        raise ConfigError(
            f"trainer.max_steps=0: {name} is an IterableDataset without len(), so nothing gives the "
            "learning-rate schedule its length; set trainer.max_steps (the run ends there or at "
            "trainer.max_epochs), or give it __len__ (this rank's samples of an epoch)"
        )
    return dataset, val_dataset


def one_sample_micro_batches(n: int, trainer: TrainerConfig, world_size: int) -> list[int]:
    """The ranks whose part of an epoch's short last step (of a training split of `n` samples) ends on
    a micro-batch of one sample: rank r holds every world-th sample of what is left, from the r-th."""
    step = world_size * trainer.batch_size * accumulate_for(trainer, world_size)
    tail = n % step
    if not tail or trainer.drop_last or trainer.batch_size == 1:
        return []
    return [r for r in range(world_size) if -(-(tail - r) // world_size) % trainer.batch_size == 1]


def _length(key: str, dataset: Dataset) -> int:
    if not isinstance(dataset, Sized):
        raise ConfigError(
            f"{key}: {type(dataset).__name__} has no len(); the Trainer needs a map-style dataset "
            "(__len__ and __getitem__; records in JSONL or Parquet files: disttrain.shards.Shards) or a "
            "torch.utils.data.IterableDataset"
        )
    return len(dataset)


class InProcessLoader:
    """The batches `torch.utils.data.DataLoader(num_workers=0)` yields, fetched the way it fetches them,
    without its per-batch machinery.

    The sampler's indices in chunks of `batch_size` (the last one shorter), each chunk fetched with the
    dataset's `__getitems__` where it has one, else one `dataset[i]` per index, then collated: the same
    batches in the same order. What it leaves out is what a batch fetched in the training process does
    not need: a profiler range around every batch and the iterator's bookkeeping (on a small model, a
    quarter of the Trainer's own cost: docs/benchmarks.md).
    It also draws no worker seed from the global RNG, as DataLoader's iter() does without a generator."""

    #: DataLoader's attribute its workers are seeded from; without workers nothing reads it.
    generator: torch.Generator | None = None

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochSampler,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.collate_fn = collate_fn or default_collate

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

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


class WorkerLoader(StatefulDataLoader):
    """torchdata's StatefulDataLoader, with a dataset's one-line refusal (ConfigError) from a worker
    process kept one line: the worker's traceback, which DataLoader puts into the message it raises
    again in the training process, is cut off."""

    def __iter__(self) -> Any:
        return one_line_refusals(super().__iter__())


def one_line_refusals(batches: Iterator[Any]) -> Iterator[Any]:
    """`batches`, a ConfigError raised again from a loader worker cut to the worker's own line."""
    try:
        yield from batches
    except ConfigError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        if len(lines) < 2 or not lines[0].startswith("Caught ConfigError"):
            raise
        raise ConfigError(lines[-1].split("ConfigError: ", 1)[-1]) from None


def make_loader(
    dataset: Dataset,
    sampler: EpochSampler,
    batch_size: int,
    num_workers: int,
    pin: bool,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> InProcessLoader | WorkerLoader:
    """The loader of a split: batches fetched in the training process on the CPU (InProcessLoader), and
    torchdata's StatefulDataLoader where it does more: worker processes, pinned memory for CUDA. Where an
    epoch starts is the sampler's business (EpochSampler.set_epoch), so both resume alike."""
    if not num_workers and not pin:
        return InProcessLoader(dataset, sampler, batch_size, collate_fn)
    return worker_loader(dataset, sampler, batch_size, num_workers, pin, collate_fn)


def worker_loader(
    dataset: Dataset,
    sampler: Sampler[int] | None,
    batch_size: int,
    num_workers: int,
    pin: bool,
    collate_fn: Callable[[list[Any]], Any] | None,
) -> WorkerLoader:
    """torchdata's StatefulDataLoader as disttrain runs it: no batch dropped (the Trainer sizes the
    epoch's last step itself), workers started anew every epoch (set_epoch reaches them)."""
    return WorkerLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin,
        drop_last=False,
        persistent_workers=False,
    )
