"""Sharded datasets: records in JSONL, Parquet or webdataset tar shard files, local or behind an fsspec
URL, served by global id so that the sampler's one global order carries them (docs/data.md#sharded-streams).

Each record has a global id: the shards in the order they are named (each glob's matches sorted), the
records of each in file order. An index gives every shard its record count (Parquet: its footer; JSONL:
one pass that records each line's byte offset; tar: one pass over the member headers that records each
sample's members' offsets and sizes; both kept in small cache files keyed by the shard's URL, size and
modification time), so a sample is read by seeking to it, never by reading the shards before it.
Token samples (no `decode`) are decoded once per shard, the first time any process reads it, into a
token cache beside the index (each record's first context + 1 ids, memory-mapped): every later read, by
any rank, worker or run, is then a gather, as a map-style dataset's is, and nothing is decoded again.
The epoch's order (`epoch_order`) is a permutation of the global ids drawn from (seed, epoch) alone:
the shards shuffled, then the records of each run of `shuffle_window` consecutive shards of that order
shuffled among themselves. It depends on neither the number of processes nor the loader workers, and the
Trainer's sampler hands rank r `order[r::W]` of it, so reads stay within a window of shards at a time.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from torch.utils.data import Dataset

from disttrain.config import ConfigError

Sample = tuple[torch.Tensor, torch.Tensor]

#: The formats a shard may have, by its name's ending (`format=auto`).
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".tar": "tar"}

#: A tar member's name as webdataset splits it: the sample's key (the directory and the base name up to
#: its first dot) and the member's extension (the rest), e.g. `train/000001.tokens.npy`.
_KEY_AND_EXT = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")


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


@contextlib.contextmanager
def _reading_shard(url: str) -> Iterator[None]:
    """Opening or reading shard `url`: an OSError, or anything else (pyarrow's ArrowInvalid: not Parquet,
    a cut-off footer), refused in one line naming the shard (ConfigError passes as it is)."""
    try:
        yield
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"data.path: shard {url} cannot be read: {e.strerror or e}") from None
    except Exception as e:
        raise ConfigError(f"data.path: shard {url} is not a readable Parquet file: {e}") from None


def _joined(protocol: str, pattern: str, match: str) -> str:
    """A glob's match as the user would write it: with the pattern's protocol, a local path kept as is."""
    if not protocol:
        return match
    if protocol == "memory://":
        return protocol + match.lstrip("/")
    return protocol + match


class Shards(Dataset):
    """Records in shard files (JSONL lines, Parquet rows or webdataset tar samples), each a sample, read
    by global id.

    A record's `field` holds its token ids; the sample is its first `context + 1` of them: the input and
    the target shifted by one (`sequence=True`, a GPT's samples) or the next token alone. A tar sample
    (the members that share a key) holds them in a `<key>.<field>.npy` member or in its `<key>.json`
    member's `field`, as a JSONL line does (`decode_member`). `decode`, for the Python API, turns a record
    (a dict: a JSONL line, a Parquet row, a tar sample's decoded members) into any sample instead (then
    `context`, `vocab_size` and `field` are not used). `format` is `jsonl`, `parquet`, `tar` or `auto`
    (by each shard's name). `shuffle_window` shards are shuffled together (see the module); at most
    `open_shards` shards are kept open per process. Token samples are read from the token cache in
    `index_dir` (see the module), each shard decoded into it once.

    Refused in one line naming the shard (ConfigError): before training, a missing or unreadable shard,
    a glob that matches nothing, a JSONL shard whose last line is cut short, a Parquet file whose footer
    does not read or that lacks `field`, a tar that does not read or is cut short, a tar sample that
    lacks a member the shard's first sample has (or, for tokens, the first has no tokens member); when
    its batch is read, a record that is not JSON, lacks `field`, holds fewer than `context + 1` tokens or
    a token id at or past `vocab_size`."""

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
        if format not in ("auto", "jsonl", "parquet", "tar"):
            raise ConfigError(f"data.format={format!r}: must be auto, jsonl, parquet or tar")
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
        #: Per shard, memory-mapped from its index file: JSONL line offsets (n + 1); a tar's members
        #: (n × members × (offset, size)), their extensions in `_members`; None for Parquet.
        self._offsets: list[np.ndarray | None] = []
        self._members: list[list[str]] = []
        #: Per shard, (size, modification time) when it was indexed: a shard must not change under a run.
        self._stamps: list[tuple[int, str]] = []
        counts: list[int] = []
        for url, fmt in zip(self.urls, self.formats, strict=True):
            self._stamps.append(self._stamp(url))
            members: list[str] = []
            if fmt == "jsonl":
                offsets = self._jsonl_index(len(counts))
                counts.append(len(offsets) - 1)
            elif fmt == "tar":
                offsets, members = self._tar_index(len(counts))
                counts.append(len(offsets))
            else:
                offsets = None
                counts.append(self._parquet_rows(url))
            self._offsets.append(offsets)
            self._members.append(members)
        #: Global id i is record i - starts[s] of shard s, s the last shard whose start <= i.
        self.starts = np.cumsum([0, *counts])
        #: Open shards (their files, or a Parquet shard's column), at most `open_shards`, the least
        #: recently used closed first; and the token cache, memory-mapped (`_token_cache`).
        self._open: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._cache: np.ndarray | None = None
        #: (shard, offset, bytes) read at once while a tar chunk is decoded.
        self._span: tuple[int, int, bytes] | None = None
        self._pid = os.getpid()

    # -- the index ---------------------------------------------------------------------------------

    def _stamp(self, url: str) -> tuple[int, str]:
        """Shard `url`'s size and modification time (or what its file system has instead)."""
        fs, inner = _filesystem(url)
        try:
            info = fs.info(inner)
        except OSError as e:
            raise ConfigError(f"data.path: shard {url} cannot be read: {e.strerror or e}") from None
        return int(info.get("size") or 0), str(info.get("mtime", info.get("created", info.get("ETag"))))

    def _index_file(self, s: int, kind: str, key: str = "") -> Path:
        """The cache file of shard s's index or token cache (`kind`), keyed by its URL, size and
        modification time when it was indexed (a changed shard is indexed again) and `key`."""
        size, mtime = self._stamps[s]
        stamp = f"{self.urls[s]}\0{size}\0{mtime}\0{key}"
        return self.index_dir / f"{hashlib.sha256(stamp.encode()).hexdigest()[:32]}{kind}.npy"

    def _save_index(self, cached: Path, index: np.ndarray) -> None:
        self.index_dir.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(partial, "wb") as out:
            np.save(out, index)
        os.replace(partial, cached)  # another rank may write the same index at once: whole or absent

    def _jsonl_index(self, s: int) -> np.ndarray:
        url = self.urls[s]
        fs, inner = _filesystem(url)
        cached = self._index_file(s, "")
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
        self._save_index(cached, index)
        return index

    def _tar_index(self, s: int) -> tuple[np.ndarray, list[str]]:
        """A tar shard's samples: per sample, the (offset, size) of each member, the members in the order
        of their sorted extensions (returned too, and kept in a sidecar file next to the index); for
        token samples, the members must hold the tokens."""
        url = self.urls[s]
        cached = self._index_file(s, ".tar")
        sidecar = cached.with_suffix(".json")
        if cached.is_file() and sidecar.is_file():
            index, members = np.load(cached, mmap_mode="r"), json.loads(sidecar.read_text())
        else:
            index, members = self._scan_tar(url, cached, self._stamps[s][0], sidecar)
        if self.decode is None and members and not {f"{self.field}.npy", "json"} & set(members):
            raise ConfigError(
                f"data.field={self.field!r}: shard {url} has no KEY.{self.field}.npy nor KEY.json member "
                f"to take a sample's tokens from (its samples have {', '.join(members)})"
            )
        return index, members

    def _scan_tar(self, url: str, cached: Path, size: int, sidecar: Path) -> tuple[np.ndarray, list[str]]:
        """One pass over tar shard `url`'s member headers: the index `_tar_index` returns, written to
        `cached` and `sidecar`. Every sample must have the members of the shard's first sample: one
        without is refused, never skipped."""
        fs, inner = _filesystem(url)
        rows: list[int] = []  # flat: offset, size of each member of each sample
        members: list[str] | None = None
        key: str | None = None
        sample: dict[str, tuple[int, int]] = {}  # the sample being gathered: extension -> (offset, size)

        def close_sample() -> None:
            nonlocal members
            if key is None:
                return
            if members is None:
                members = sorted(sample)
            if sorted(sample) != members:
                lacks = sorted(set(members) - set(sample)) or sorted(set(sample) - set(members))
                what = "lacks" if set(members) - set(sample) else "has an extra"
                raise ConfigError(
                    f"data.path: shard {url} sample {key!r} {what} member {key}.{lacks[0]} (every sample "
                    f"needs the members of the shard's first: {', '.join(members)})"
                )
            for ext in members:
                rows.extend(sample[ext])

        end = 0
        try:
            with fs.open(inner, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                while (member := tar.next()) is not None:
                    # TarFile keeps every member it has read (a list typeshed does not declare): emptied,
                    # only the index is kept and memory does not grow with the shard.
                    tar.members.clear()  # type: ignore[attr-defined]
                    if member.isdir():
                        continue
                    parts = _KEY_AND_EXT.match(member.name)
                    if not member.isfile() or parts is None:
                        raise ConfigError(
                            f"data.path: shard {url} member {member.name!r} is not a file named "
                            "KEY.EXTENSION (a webdataset sample's member)"
                        )
                    if parts[1] != key:
                        close_sample()
                        key, sample = parts[1], {}
                    if parts[2] in sample:
                        raise ConfigError(f"data.path: shard {url} holds {member.name!r} twice in one sample")
                    sample[parts[2]] = (member.offset_data, member.size)
                    end = member.offset_data + member.size
                if end > size or size - (-(-end // 512) * 512) < 1024:
                    # A tar ends in two zero blocks: without them the copy was cut at a member's end
                    # (the last sample's missing members are then no sample's fault).
                    raise ConfigError(f"data.path: shard {url} is cut short (a truncated file?)")
                close_sample()
        except OSError as e:
            raise ConfigError(f"data.path: shard {url} cannot be read: {e.strerror or e}") from None
        except tarfile.TarError as e:
            cut = "unexpected end" in str(e) or "truncated" in str(e)
            why = "is cut short (a truncated file?)" if cut else f"is not a readable tar file: {e}"
            raise ConfigError(f"data.path: shard {url} {why}") from None
        members = members or []
        index = (
            np.asarray(rows, dtype=np.int64).reshape(-1, len(members), 2) if members else np.zeros((0, 0, 2))
        )
        self.index_dir.mkdir(parents=True, exist_ok=True)
        partial = sidecar.with_suffix(f".json.{os.getpid()}.tmp")
        partial.write_text(json.dumps(members))
        os.replace(partial, sidecar)  # before the index: an index file means both are whole
        self._save_index(cached, index.astype(np.int64))
        return index, members

    def _parquet_rows(self, url: str) -> int:
        import pyarrow.parquet as pq

        fs, inner = _filesystem(url)
        with _reading_shard(url), fs.open(inner, "rb") as f:
            footer = pq.ParquetFile(f)
            schema, rows = footer.schema_arrow, footer.metadata.num_rows
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
        # A loader worker opens its own shards and maps the cache itself: open files do not travel.
        state = self.__dict__.copy()
        state["_open"], state["_cache"] = collections.OrderedDict(), None
        return state

    def _this_process(self) -> None:
        if self._pid != os.getpid():
            # A forked loader worker shares its parent's file offsets: seeking one would move the other's.
            self._open, self._cache, self._pid = collections.OrderedDict(), None, os.getpid()

    def _shard(self, s: int) -> Any:
        """Shard s, open: a JSONL or tar shard's file; a Parquet shard's rows (with `decode`) or its
        `field` column."""
        self._this_process()
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        url = self.urls[s]
        fs, inner = _filesystem(url)
        with _reading_shard(url):
            if self.formats[s] in ("jsonl", "tar"):
                handle: Any = fs.open(inner, "rb")
            else:
                import pyarrow.parquet as pq

                with fs.open(inner, "rb") as f:
                    table = pq.read_table(f, columns=None if self.decode else [self.field])
                handle = table.to_pylist() if self.decode else table.column(0).combine_chunks()
        self._open[s] = handle
        if len(self._open) > self.open_shards:
            _, closing = self._open.popitem(last=False)
            if hasattr(closing, "close"):
                closing.close()
        return handle

    # -- the token cache ---------------------------------------------------------------------------
    #
    # One file for the dataset (keyed by every shard's index stamp, the field, the window and the
    # vocabulary), a row per record: its first context + 1 ids plus one, then a state: 0 while the
    # record is not decoded, 1 where it is no sample (`_refuse_record` says why), 2 where it is. A
    # shard's rows are written once, by whichever process reads one of its records first, and every
    # process maps the file: rows are only ever zero or final, so a row that holds a zero (a write still
    # under way in another process, a page a network file system has not shown yet) is decoded again,
    # never served.

    def _token_cache(self) -> np.ndarray:
        """The token cache, mapped for reading and writing (made, its disk space taken, if it is not
        there)."""
        self._this_process()
        if self._cache is not None:
            return self._cache
        stamps = [
            f"{url}\0{size}\0{mtime}" for url, (size, mtime) in zip(self.urls, self._stamps, strict=True)
        ]
        key = "\0".join([*stamps, self.field, str(self.context + 1), str(self.vocab_size)])
        path = self.index_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.tokens.npy"
        if not path.is_file():
            self.index_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            dtype = np.uint16 if self.vocab_size < 2**16 - 1 else np.uint32
            np.lib.format.open_memmap(partial, "w+", dtype, (len(self), self.context + 2)).flush()
            self._allocate(partial)
            if not path.is_file():  # another process may have made it meanwhile: its rows are kept
                os.replace(partial, path)
            partial.unlink(missing_ok=True)
        self._cache = np.asarray(np.lib.format.open_memmap(path, "r+"))  # (np.memmap's indexing is slow)
        return self._cache

    def _allocate(self, path: Path) -> None:
        """The cache's disk blocks taken now: a write through the mapping to a full disk would kill the
        process (SIGBUS) mid-run, where this refuses in one line before the first batch."""
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    path.unlink(missing_ok=True)
                    raise ConfigError(
                        f"data.index_dir={str(self.index_dir)!r}: no room for the token cache ({size:,} "
                        "bytes); free some or name another directory"
                    ) from None
                # A file system that cannot allocate ahead (EOPNOTSUPP, EINVAL) keeps the file sparse.

    def _cached_rows(self, idx: np.ndarray) -> np.ndarray:
        """Records `idx`' first context + 1 ids, from the token cache, each shard decoded into it the
        first time one of its records is asked for; a record that is no sample refused (BadRecord)."""
        cache, width = self._token_cache(), self.context + 1
        rows = cache[idx]
        decoded: set[int] = set()
        while len(rows) and rows.min() == 0:  # a sample's row holds no zero: its ids + 1 and its state, 2
            first = int(np.flatnonzero((rows == 0).any(axis=1))[0])
            gid = int(idx[first]) % len(self)
            s = int(np.searchsorted(self.starts, gid, side="right")) - 1
            if rows[first, width] == 1:
                self._refuse_record(s, gid - int(self.starts[s]))
            if s in decoded:
                raise ConfigError(
                    f"data.index_dir={str(self.index_dir)!r}: the token cache does not read back what was "
                    "written to it"
                )
            self._decode_into_cache(s)
            decoded.add(s)
            rows = cache[idx]
        ids = rows[:, :width].astype(np.int64)
        ids -= 1
        return ids

    def _decode_into_cache(self, s: int) -> None:
        """Shard s's rows of the token cache, decoded in one pass over the shard, 4,096 records at a time."""
        now = self._stamp(self.urls[s])
        if now != self._stamps[s]:  # a shard rewritten under a run would no longer be the run's data
            change = "is shorter than" if now[0] < self._stamps[s][0] else "has changed since"
            raise ConfigError(f"data.path: shard {self.urls[s]} {change} when it was indexed")
        cache, width, first = self._token_cache(), self.context + 1, int(self.starts[s])
        for tokens, ok in self._parquet_chunks(s) if self.formats[s] == "parquet" else self._chunks(s):
            ok &= (tokens.min(axis=1, initial=0) >= 0) & (tokens.max(axis=1, initial=0) < self.vocab_size)
            at = slice(first, first + len(ok))
            cache[at, :width] = np.where(ok[:, None], tokens + 1, 0)
            cache[at, width] = np.where(ok, 2, 1)  # after the ids: a row is final once its state is
            first += len(ok)

    def _parquet_chunks(self, s: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Parquet shard s's records, 4,096 at a time (never the whole column in memory): each one's first
        context + 1 ids (int64) and whether it has them."""
        import pyarrow.parquet as pq

        url = self.urls[s]
        fs, inner = _filesystem(url)
        with _reading_shard(url), fs.open(inner, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=[self.field]):
                tokens, lengths = self._token_rows(batch.column(0), url)
                yield tokens, lengths >= self.context + 1

    def _chunks(self, s: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """JSONL or tar shard s's records, 4,096 at a time, as `_parquet_chunks` gives them."""
        n = int(self.starts[s + 1] - self.starts[s])
        for first in range(0, n, 4096):
            yield self._decoded_records(s, range(first, min(n, first + 4096)))

    def _decoded_records(self, s: int, rows: range) -> tuple[np.ndarray, np.ndarray]:
        """Records `rows` of JSONL or tar shard s: their first context + 1 ids and whether each has them."""
        width = self.context + 1
        tokens, ok = np.zeros((len(rows), width), dtype=np.int64), np.zeros(len(rows), dtype=bool)
        found = self._jsonl_windows(s, rows) if self.formats[s] == "jsonl" else self._tar_windows(s, rows)
        held = [j for j, window in enumerate(found) if window is not None]
        if not held:
            return tokens, ok
        together = np.array([found[j] for j in held])  # one conversion for the chunk, if all are integers
        if together.dtype.kind in "iu" and together.shape == (len(held), width):
            tokens[held], ok[held] = together, True
            return tokens, ok
        for j in held:
            ids = np.asarray(found[j])
            if ids.dtype.kind in "iu" and ids.shape == (width,):
                tokens[j], ok[j] = ids, True
        return tokens, ok

    def _jsonl_windows(self, s: int, rows: range) -> list[Any]:
        """Records `rows` of JSONL shard s (one read): each one's first context + 1 token ids as its field
        lists them, or None where it lists fewer. orjson parses a line several times faster than the json
        module; a line it refuses is no sample either way, and `_refuse_record` then says why in the json
        module's terms."""
        offsets = self._offsets[s]
        assert offsets is not None
        first = int(offsets[rows.start])
        text = self._read(s, first, int(offsets[rows.stop]) - first)
        found: list[Any] = []
        for k in rows:
            try:
                record = orjson.loads(text[int(offsets[k]) - first : int(offsets[k + 1]) - first])
            except orjson.JSONDecodeError:
                record = None
            tokens = record.get(self.field) if isinstance(record, dict) else None
            found.append(self._window(tokens))
        return found

    def _tar_windows(self, s: int, rows: range) -> list[Any]:
        """Samples `rows` of tar shard s (one read): each one's first context + 1 ids, or None where it is
        no sample."""
        offsets = self._offsets[s]
        assert offsets is not None
        first, last = offsets[rows.start], offsets[rows.stop - 1]
        start = int(first[:, 0].min())
        self._span = (s, start, self._read(s, start, int((last[:, 0] + last[:, 1]).max()) - start))
        found: list[Any] = []
        try:
            for k in rows:
                try:
                    found.append(self._window(self._tar_tokens(s, k)))
                except BadRecord:
                    found.append(None)
        finally:
            self._span = None
        return found

    def _window(self, tokens: Any) -> Any:
        """A record's first context + 1 token ids (a list or an array), or None if it holds fewer."""
        if not isinstance(tokens, (list, np.ndarray)) or len(tokens) < self.context + 1:
            return None
        return tokens[: self.context + 1]

    def record(self, i: int) -> Any:
        """Record `i` (a global id): a dict for JSONL and tar (`decode_member`); for Parquet the row (with
        `decode`) or its field."""
        if not 0 <= i < len(self):
            raise IndexError(f"Shards: index {i} out of range 0..{len(self) - 1}")
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        k, handle = i - int(self.starts[s]), self._shard(s)
        if self.formats[s] == "parquet":
            return handle[k] if self.decode is not None else handle[k].as_py()
        if self.formats[s] == "tar":
            return {ext: self._tar_member(s, k, ext) for ext in self._members[s]}
        offsets = self._offsets[s]
        assert offsets is not None
        line = self._read(s, int(offsets[k]), int(offsets[k + 1]) - int(offsets[k]))
        try:
            return json.loads(line)
        except ValueError:
            raise BadRecord(f"data.path: shard {self.urls[s]} line {k + 1} is not JSON") from None

    def _read(self, s: int, start: int, size: int) -> bytes:
        """`size` bytes of shard s (JSONL or tar) from `start` (from `_span` when it holds them)."""
        if (
            self._span is not None
            and self._span[0] == s
            and 0 <= start - self._span[1] <= len(self._span[2]) - size
        ):
            return self._span[2][start - self._span[1] : start - self._span[1] + size]
        handle = self._shard(s)
        try:
            handle.seek(start)
            data = handle.read(size)
        except OSError as e:
            raise ConfigError(f"data.path: shard {self.urls[s]} cannot be read: {e.strerror or e}") from None
        if len(data) < size:
            raise ConfigError(f"data.path: shard {self.urls[s]} is shorter than when it was indexed")
        return data

    def _tar_member(self, s: int, k: int, ext: str) -> Any:
        """Sample k of tar shard s: its member of extension `ext`, decoded as `decode_member` says."""
        offsets = self._offsets[s]
        assert offsets is not None
        column = self._members[s].index(ext)
        data = self._read(s, int(offsets[k, column, 0]), int(offsets[k, column, 1]))
        try:
            return decode_member(ext, data)
        except ValueError as e:
            raise BadRecord(
                f"data.path: shard {self.urls[s]} record {k + 1}: its .{ext} member does not decode ({e})"
            ) from None

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        if self.decode is not None:
            return [self.decode(self.record(i)) for i in indices]
        idx = np.asarray(indices, dtype=np.int64)
        try:
            rows = self._cached_rows(idx)  # (a negative id counts from the end, as a list's index does)
        except IndexError:
            raise IndexError(f"Shards: index out of range 0..{len(self) - 1}") from None
        tokens = torch.from_numpy(rows)
        inputs, targets = tokens[:, :-1], tokens[:, 1:] if self.sequence else tokens[:, -1]
        return list(zip(inputs, targets, strict=True))

    def _refuse_record(self, s: int, k: int) -> None:
        """Why record k of shard s, marked in its token cache, is no sample: in one line (BadRecord)."""
        if self.formats[s] == "tar":
            self._tar_tokens(s, k)
        elif self.formats[s] == "parquet":
            tokens = self._shard(s)[k].as_py()
            tokens = self._record_tokens(s, k, {self.field: tokens if tokens is not None else []})
        else:
            tokens = self._record_tokens(s, k, self.record(int(self.starts[s]) + k))
        bad = next(int(t) for t in tokens if not 0 <= t < self.vocab_size)
        raise BadRecord(
            f"data.path: shard {self.urls[s]} record {k + 1} holds token id {bad}, which "
            f"data.vocab_size={self.vocab_size} does not cover (ids must be from 0 and below it)"
        )

    def _token_rows(self, column: Any, url: str) -> tuple[np.ndarray, np.ndarray]:
        """A Parquet shard's token lists as one matrix of their first context + 1 tokens (a shorter
        record's row padded with -1) and the records' lengths."""
        import pyarrow.compute as pc

        width, n = self.context + 1, len(column)
        if not n:
            return np.full((0, width), -1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        try:
            lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
            flat = pc.list_flatten(pc.list_slice(column, 0, width)).to_numpy(zero_copy_only=False)
        except Exception:  # pyarrow's ArrowNotImplementedError / ArrowInvalid: not a list of integers
            raise ConfigError(
                f"data.field={self.field!r}: shard {url} holds {column.type} there, not lists of token ids"
            ) from None
        if flat.dtype.kind not in "iu":
            raise ConfigError(
                f"data.field={self.field!r}: shard {url} holds {column.type} there, not lists of token ids"
            )
        if len(flat) == n * width:  # every record holds a window: the usual shard, one reshape
            return flat.reshape(n, width).astype(np.int64, copy=False), lengths
        matrix = np.full((n, width), -1, dtype=np.int64)
        kept = np.minimum(lengths, width)
        rows = np.repeat(np.arange(n), kept)
        matrix[rows, np.arange(len(flat)) - np.repeat(np.cumsum(kept) - kept, kept)] = flat
        return matrix, lengths

    def _tar_tokens(self, s: int, k: int) -> Any:
        """Sample k of tar shard s: the first context + 1 token ids of its `<field>.npy` member, or else of
        its `.json` member's `field` (as a JSONL line's)."""
        if f"{self.field}.npy" not in self._members[s]:
            return self._record_tokens(s, k, self._tar_member(s, k, "json"))
        tokens = self._tar_member(s, k, f"{self.field}.npy")
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise BadRecord(
                f"data.path: shard {self.urls[s]} record {k + 1} holds a {tokens.dtype} array of shape "
                f"{tokens.shape} in .{self.field}.npy, not a list of token ids"
            )
        if len(tokens) < self.context + 1:
            self._refuse_short(s, k, len(tokens))
        return tokens[: self.context + 1]

    def _record_tokens(self, s: int, k: int, record: Any) -> list[int]:
        """A JSON record's first context + 1 token ids, from its `field`."""
        tokens = record.get(self.field) if isinstance(record, dict) else None
        if not isinstance(tokens, list):
            raise BadRecord(
                f"data.path: shard {self.urls[s]} record {k + 1} has no list of token ids in field "
                f"{self.field!r} (data.field)"
            )
        if len(tokens) < self.context + 1:
            self._refuse_short(s, k, len(tokens))
        window = tokens[: self.context + 1]
        if not all(type(t) is int for t in window):
            odd = next(t for t in window if type(t) is not int)
            raise BadRecord(
                f"data.path: shard {self.urls[s]} record {k + 1} holds {odd!r} in field {self.field!r}, "
                "not a token id (an integer)"
            )
        return window

    def _refuse_short(self, s: int, k: int, length: int) -> None:
        raise BadRecord(
            f"data.path: shard {self.urls[s]} record {k + 1} holds {length} tokens, fewer than one window "
            f"of data.context + 1 = {self.context + 1}"
        )


class BadRecord(ConfigError):
    """A record that is no sample (not JSON, no token ids, too few, not integers, one past the
    vocabulary): refused when a batch holds it, as a ConfigError; the token cache marks it instead."""


#: Tar members decoded to an int (webdataset's class labels and indices), by their extension's last part.
_INT_MEMBERS = {"cls", "cls2", "index", "inx", "id"}


def decode_member(ext: str, data: bytes) -> Any:
    """A tar member's bytes as the sample's dict holds them, by the last part of its extension
    (`tokens.npy`: `npy`): `json` parsed, `txt`/`text` a str, `cls`/`cls2`/`index`/`inx`/`id` an int,
    `npy` a numpy array (no pickles), any other (images, audio, ...) the bytes, for `decode` to read.
    A ValueError when the bytes are not what the extension says."""
    last = ext.rsplit(".", 1)[-1].lower()
    if last == "json":
        return json.loads(data)
    if last in ("txt", "text"):
        return data.decode()
    if last in _INT_MEMBERS:
        return int(data.decode().strip())
    if last == "npy":
        return _npy(data)
    return data


#: .npy headers seen (their bytes: dtype, shape, order) -> how to view the data after them.
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}


def _npy(data: bytes) -> np.ndarray:
    """A .npy file's array. np.load parses each header with `ast.literal_eval`, which costs more than
    the read itself for a sample's few hundred tokens: a header already seen is looked up instead."""
    size = 2 if data[6:7] == b"\x01" else 4  # the header's length field: 2 bytes in version 1, else 4
    end = 8 + size + int.from_bytes(data[8 : 8 + size], "little")
    header = data[:end]
    if header not in _NPY_HEADERS:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if len(_NPY_HEADERS) >= 4096:  # as many lengths as that: keep the cache bounded
            _NPY_HEADERS.clear()
        fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous
        _NPY_HEADERS[header] = (array.dtype, array.shape, fortran, end)
        return array
    dtype, shape, fortran, offset = _NPY_HEADERS[header]
    flat = np.frombuffer(data, dtype, offset=offset)
    return flat.reshape(shape, order="F") if fortran else flat.reshape(shape)


def _format_of(url: str) -> str:
    suffix = Path(url.split("?", 1)[0]).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(
            f"data.path: shard {url} is not .jsonl, .parquet nor .tar; name the format with data.format"
        )
    return FORMATS[suffix]
