"""Sharded datasets: records in JSONL or Parquet shard files, local or behind an fsspec URL, served by
global id so that the sampler's one global order carries them (docs/data.md#sharded-streams).

Each record has a global id: the shards in the order they are named (each glob's matches sorted), the
records of each in file order. An index gives every shard its record count (Parquet: its footer; JSONL:
one pass that records each line's byte offset, kept in a small cache file keyed by the shard's URL, size
and modification time), so a sample is read by seeking to it, never by reading the shards before it.
The epoch's order (`epoch_order`) is a permutation of the global ids drawn from (seed, epoch) alone:
the shards shuffled, then the records of each run of `shuffle_window` consecutive shards of that order
shuffled among themselves. It depends on neither the number of processes nor the loader workers, and the
Trainer's sampler hands rank r `order[r::W]` of it, so reads stay within a window of shards at a time.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from disttrain.config import ConfigError

Sample = tuple[torch.Tensor, torch.Tensor]

#: The formats a shard may have, by its name's ending (`format=auto`).
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for `url` and the path inside it (a plain path is the local one)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def shard_urls(path: str | list[str] | Any) -> list[str]:
    """The shards `path` names: a file or URL, a glob of either, or a list; each glob's matches sorted.
    A glob that matches nothing or a shard that is not there is refused in one line (ConfigError)."""
    patterns = [path] if isinstance(path, str) else [str(p) for p in path]
    found: list[str] = []
    for pattern in patterns:
        fs, inner = _filesystem(pattern)
        protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        if glob.has_magic(inner):
            matches = sorted(m for m in fs.glob(inner) if fs.isfile(m))
            if not matches:
                raise ConfigError(f"data.path={pattern!r}: matches no file")
            found += [_joined(protocol, inner, m) for m in matches]
        elif not fs.isfile(inner):
            raise ConfigError(f"data.path={pattern!r}: no such file")
        else:
            found.append(pattern)
    if not found:
        raise ConfigError("data.path=[]: names no file")
    return found


def _joined(protocol: str, pattern: str, match: str) -> str:
    """A glob's match as the user would write it: with the pattern's protocol, a local path kept as is."""
    if not protocol:
        return match
    if protocol == "memory://":
        return protocol + match.lstrip("/")
    return protocol + match


class Shards(Dataset):
    """Records in shard files (JSONL lines or Parquet rows), each a sample, read by global id.

    A record's `field` holds its token ids; the sample is its first `context + 1` of them: the input and
    the target shifted by one (`sequence=True`, a GPT's samples) or the next token alone. `decode`, for
    the Python API, turns a record (a dict: a JSONL line, a Parquet row) into any sample instead (then
    `context`, `vocab_size` and `field` are not used). `format` is `jsonl`, `parquet` or
    `auto` (by each shard's name). `shuffle_window` shards are shuffled together (see the module); at
    most `open_shards` shards are kept open (and a Parquet shard's column decoded) per process.

    Refused in one line naming the shard (ConfigError): before training, a missing or unreadable shard,
    a glob that matches nothing, a JSONL shard whose last line is cut short, a Parquet file whose footer
    does not read or that lacks `field`; when its batch is read, a record that is not JSON, lacks `field`,
    holds fewer than `context + 1` tokens or a token id at or past `vocab_size`."""

    loss = "cross_entropy"
    loss_items = "samples"

    def __init__(
        self,
        path: str | list[str],
        context: int = 64,
        vocab_size: int = 0,
        field: str = "tokens",
        format: str = "auto",
        sequence: bool = True,
        shuffle_window: int = 4,
        open_shards: int = 8,
        index_dir: str | None = None,
        decode: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        if format not in ("auto", "jsonl", "parquet"):
            raise ConfigError(f"data.format={format!r}: must be auto, jsonl or parquet")
        if decode is None and vocab_size < 1:
            raise ConfigError(f"data.vocab_size={vocab_size!r}: token samples need the vocabulary's size")
        if shuffle_window < 1:
            raise ConfigError(f"data.shuffle_window={shuffle_window!r}: must be at least 1 shard")
        self.context, self.vocab_size, self.field, self.sequence = context, vocab_size, field, sequence
        self.shuffle_window, self.open_shards, self.decode = shuffle_window, max(1, open_shards), decode
        self.urls = shard_urls(path)
        self.formats = [format if format != "auto" else _format_of(u) for u in self.urls]
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "disttrain" / "shards"
        self.index_dir = Path(index_dir) if index_dir else cache
        #: Per shard: JSONL line offsets (n + 1, memory-mapped from the index file) or Parquet row count.
        self._offsets: list[np.ndarray | None] = []
        counts = []
        for url, fmt in zip(self.urls, self.formats, strict=True):
            if fmt == "jsonl":
                offsets = self._jsonl_index(url)
                self._offsets.append(offsets)
                counts.append(len(offsets) - 1)
            else:
                self._offsets.append(None)
                counts.append(self._parquet_rows(url))
        #: Global id i is record i - starts[s] of shard s, s the last shard whose start <= i.
        self.starts = np.cumsum([0, *counts])
        self._open: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._pid = os.getpid()

    # -- the index ---------------------------------------------------------------------------------

    def _jsonl_index(self, url: str) -> np.ndarray:
        fs, inner = _filesystem(url)
        try:
            info = fs.info(inner)
        except OSError as e:
            raise ConfigError(f"data.path: shard {url} cannot be read: {e.strerror or e}") from None
        stamp = f"{url}\0{info.get('size')}\0{info.get('mtime', info.get('created', info.get('ETag')))}"
        cached = self.index_dir / f"{hashlib.sha256(stamp.encode()).hexdigest()[:32]}.npy"
        if cached.is_file():
            return np.load(cached, mmap_mode="r")
        offsets, last = [0], b""
        try:
            with fs.open(inner, "rb") as f:
                position = 0
                for line in f:
                    position += len(line)
                    if line.strip():
                        offsets.append(position)
                        last = line
                    else:  # a blank line is no record: skip its bytes
                        offsets[-1] = position
        except OSError as e:
            raise ConfigError(f"data.path: shard {url} cannot be read: {e.strerror or e}") from None
        if last and not last.endswith(b"\n"):
            try:
                json.loads(last)
            except ValueError:
                raise ConfigError(
                    f"data.path: shard {url} ends in a cut-off line {len(offsets) - 1} (a truncated file?)"
                ) from None
        index = np.asarray(offsets, dtype=np.int64)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(partial, "wb") as out:
            np.save(out, index)
        os.replace(partial, cached)  # another rank may write the same index at once: whole or absent
        return index

    def _parquet_rows(self, url: str) -> int:
        import pyarrow.parquet as pq

        fs, inner = _filesystem(url)
        try:
            with fs.open(inner, "rb") as f:
                footer = pq.ParquetFile(f)
                schema, rows = footer.schema_arrow, footer.metadata.num_rows
        except OSError as e:
            raise ConfigError(f"data.path: shard {url} cannot be read: {e.strerror or e}") from None
        except Exception as e:  # pyarrow's ArrowInvalid: not Parquet, or a cut-off footer
            raise ConfigError(f"data.path: shard {url} is not a readable Parquet file: {e}") from None
        if self.decode is None and self.field not in schema.names:
            raise ConfigError(
                f"data.field={self.field!r}: shard {url} has no such column "
                f"(it has {', '.join(schema.names)})"
            )
        return int(rows)

    # -- the order ---------------------------------------------------------------------------------

    def epoch_order(self, seed: int, epoch: int, n: int | None = None) -> list[int]:
        """The epoch's permutation of the global ids below `n` (all by default), from (seed, epoch) alone:
        the shards in a shuffled order, the records of each `shuffle_window` consecutive shards of it
        shuffled among themselves. The sampler takes it instead of a uniform permutation."""
        rng = np.random.default_rng([seed, epoch])
        shards = rng.permutation(len(self.urls))
        parts = []
        for first in range(0, len(shards), self.shuffle_window):
            window = shards[first : first + self.shuffle_window]
            ids = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in window])
            rng.shuffle(ids)
            parts.append(ids)
        order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if n is not None and n < len(self):
            order = order[order < n]
        return order.tolist()

    # -- reading -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        # A loader worker opens its own shards: open files do not travel to it.
        state = self.__dict__.copy()
        state["_open"] = collections.OrderedDict()
        return state

    def _shard(self, s: int) -> Any:
        """Shard s, open (JSONL: its file; Parquet: its column, decoded), the least recently used closed."""
        if self._pid != os.getpid():
            # A forked loader worker shares its parent's file offsets: seeking one would move the other's.
            self._open, self._pid = collections.OrderedDict(), os.getpid()
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        url = self.urls[s]
        fs, inner = _filesystem(url)
        try:
            if self.formats[s] == "jsonl":
                handle: Any = fs.open(inner, "rb")
            else:
                import pyarrow.parquet as pq

                with fs.open(inner, "rb") as f:
                    table = pq.read_table(f, columns=None if self.decode else [self.field])
                handle = table.to_pylist() if self.decode else self._token_rows(table.column(0), url)
        except ConfigError:
            raise
        except OSError as e:
            raise ConfigError(f"data.path: shard {url} cannot be read: {e.strerror or e}") from None
        except Exception as e:
            raise ConfigError(f"data.path: shard {url} is not a readable Parquet file: {e}") from None
        self._open[s] = handle
        if len(self._open) > self.open_shards:
            _, closing = self._open.popitem(last=False)
            if hasattr(closing, "close"):
                closing.close()
        return handle

    def _token_rows(self, column: Any, url: str) -> tuple[np.ndarray, np.ndarray]:
        """A Parquet shard's token lists as one matrix of their first context + 1 tokens (a shorter
        record's row padded with -1) and the records' lengths: a batch is then one gather."""
        import pyarrow.compute as pc

        width, n = self.context + 1, len(column)
        matrix = np.full((n, width), -1, dtype=np.int64)
        if not n:
            return matrix, np.zeros(0, dtype=np.int64)
        try:
            column = column.combine_chunks()
            lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
            flat = pc.list_flatten(pc.list_slice(column, 0, width)).to_numpy(zero_copy_only=False)
        except Exception:  # pyarrow's ArrowNotImplementedError / ArrowInvalid: not a list of integers
            raise ConfigError(
                f"data.field={self.field!r}: shard {url} holds {column.type} there, not lists of token ids"
            ) from None
        kept = np.minimum(lengths, width)
        rows = np.repeat(np.arange(n), kept)
        matrix[rows, np.arange(len(flat)) - np.repeat(np.cumsum(kept) - kept, kept)] = flat
        return matrix, lengths

    def record(self, i: int) -> Any:
        """Record `i` (a global id): a dict for JSONL; for Parquet the row (with `decode`) or its field."""
        if not 0 <= i < len(self):
            raise IndexError(f"Shards: index {i} out of range 0..{len(self) - 1}")
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        k, handle = i - int(self.starts[s]), self._shard(s)
        if self.formats[s] == "parquet":
            if self.decode is not None:
                return handle[k]
            matrix, lengths = handle
            return matrix[k, : lengths[k]].tolist()
        offsets = self._offsets[s]
        assert offsets is not None
        start, end = int(offsets[k]), int(offsets[k + 1])
        try:
            handle.seek(start)
            line = handle.read(end - start)
        except OSError as e:
            raise ConfigError(f"data.path: shard {self.urls[s]} cannot be read: {e.strerror or e}") from None
        if len(line) < end - start:
            raise ConfigError(f"data.path: shard {self.urls[s]} is shorter than when it was indexed")
        try:
            return json.loads(line)
        except ValueError:
            raise ConfigError(f"data.path: shard {self.urls[s]} line {k + 1} is not JSON") from None

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        if self.decode is not None:
            return [self.decode(self.record(i)) for i in indices]
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"Shards: index out of range 0..{len(self) - 1}")
        which = np.searchsorted(self.starts, idx, side="right") - 1
        width = self.context + 1
        rows = np.empty((len(idx), width), dtype=np.int64)
        for s in np.unique(which).tolist():
            mine = which == s
            local = idx[mine] - int(self.starts[s])
            if self.formats[s] == "parquet":
                matrix, lengths = self._shard(s)
                if (short := lengths[local] < width).any():
                    k = int(local[short][0])
                    self._refuse_short(s, k, int(lengths[k]))
                rows[mine] = matrix[local]
            else:
                rows[mine] = [self._jsonl_tokens(s, int(k)) for k in local]
            if (bad := int(rows[mine].max())) >= self.vocab_size or int(rows[mine].min()) < 0:
                bad = bad if bad >= self.vocab_size else int(rows[mine].min())
                k = int(local[(rows[mine] == bad).any(axis=1)][0])
                raise ConfigError(
                    f"data.path: shard {self.urls[s]} record {k + 1} holds token id {bad}, which "
                    f"data.vocab_size={self.vocab_size} does not cover (ids must be from 0 and below it)"
                )
        tokens = torch.from_numpy(rows)
        inputs, targets = tokens[:, :-1], tokens[:, 1:] if self.sequence else tokens[:, -1]
        return list(zip(inputs, targets, strict=True))

    def _jsonl_tokens(self, s: int, k: int) -> list[int]:
        """Record k of JSONL shard s: its first context + 1 token ids."""
        record = self.record(int(self.starts[s]) + k)
        tokens = record.get(self.field) if isinstance(record, dict) else None
        if not isinstance(tokens, list):
            raise ConfigError(
                f"data.path: shard {self.urls[s]} record {k + 1} has no list of token ids in field "
                f"{self.field!r} (data.field)"
            )
        if len(tokens) < self.context + 1:
            self._refuse_short(s, k, len(tokens))
        return tokens[: self.context + 1]

    def _refuse_short(self, s: int, k: int, length: int) -> None:
        raise ConfigError(
            f"data.path: shard {self.urls[s]} record {k + 1} holds {length} tokens, fewer than one window "
            f"of data.context + 1 = {self.context + 1}"
        )


def _format_of(url: str) -> str:
    suffix = Path(url.split("?", 1)[0]).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(
            f"data.path: shard {url} is neither .jsonl nor .parquet; name the format with data.format"
        )
    return FORMATS[suffix]
