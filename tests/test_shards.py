"""Sharded streams (`data=shards`, disttrain.shards.Shards): JSONL, Parquet and webdataset tar shards,
local or through fsspec URLs, in one global order that does not depend on the number of processes,
served by global id; every bad shard refused in one line naming it. In-process: the order is the
sampler's, so driving the sampler of every rank of W checks what W processes would read."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from disttrain import TrainConfig, Trainer
from disttrain.config import ConfigError, TrainerConfig
from disttrain.data import EpochSampler, InProcessLoader
from disttrain.models import MLPLanguageModel
from disttrain.shards import Shards

#: Shard sizes that divide by none of 2, 3 and 4 (nor does their sum, 41): JSONL and Parquet in turn.
SIZES = [7, 11, 5, 13, 5]
VOCAB = 64


def tokens_of(gid: int) -> list[int]:
    """Record `gid`'s tokens: its id first (read back from a sample), then a pattern."""
    return [gid % VOCAB, *((gid * 7 + j) % VOCAB for j in range(1, 6))]


def write_shards(
    root: Path, sizes: list[int] = SIZES, formats: tuple[str, ...] = ("jsonl", "parquet")
) -> list[str]:
    """Shards 0..n-1 in `formats` in turn (Parquet: row groups of 4; tar: `.tokens.npy` members);
    record ids in naming order."""
    paths, gid = [], 0
    for s, n in enumerate(sizes):
        rows = [tokens_of(gid + i) for i in range(n)]
        fmt = formats[s % len(formats)]
        path = root / f"part{s}.{fmt}"
        if fmt == "jsonl":
            path.write_text(
                "".join(json.dumps({"tokens": r, "id": gid + i}) + "\n" for i, r in enumerate(rows))
            )
        elif fmt == "parquet":
            pq.write_table(pa.table({"tokens": rows}), path, row_group_size=4)
        else:
            write_tar(
                path,
                [{"tokens.npy": np.asarray(r, dtype=np.uint16), "cls": gid + i} for i, r in enumerate(rows)],
            )
        paths.append(str(path))
        gid += n
    return paths


def write_tar(path: Path, samples: list[dict], first_key: int = 0) -> None:
    """A webdataset tar: sample i's members `{first_key + i:06d}.{ext}` (a dict as JSON, an array as
    .npy, anything else as its str's bytes), as `tar cf` of such files would."""
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, value in sample.items():
                if isinstance(value, np.ndarray):
                    buffer = io.BytesIO()
                    np.save(buffer, value)
                    data = buffer.getvalue()
                else:
                    data = (json.dumps(value) if isinstance(value, dict) else str(value)).encode()
                member = tarfile.TarInfo(f"{first_key + i:06d}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def dataset(paths: list[str] | str, tmp_path: Path, **kw) -> Shards:
    return Shards(paths, context=4, vocab_size=VOCAB, index_dir=str(tmp_path / "index"), **kw)


def global_sequence(data, world: int, seed: int, epoch: int, step: int, start: int = 0) -> list[int]:
    """The epoch's samples as W ranks read them, put back in the global order from global position
    `start`: rank r's i-th is the (r + i·W)-th (EpochSampler), in optimizer steps of `step` samples."""
    shares = []
    for r in range(world):
        sampler = EpochSampler(data, world, r, shuffle=True, seed=seed)
        sampler.set_epoch(epoch, start=start // world)
        shares.append(list(sampler))
    return [shares[i % world][i // world] for i in range(sum(map(len, shares)))]


def test_the_global_order_is_the_same_on_any_number_of_processes_and_keeps_to_a_window_of_shards(
    tmp_path,
) -> None:
    paths = write_shards(tmp_path)
    data = dataset(paths, tmp_path, shuffle_window=2)
    assert len(data) == 41
    for epoch in (0, 1):
        one = global_sequence(data, 1, 3, epoch, 12)
        assert sorted(one) == list(range(41))  # an epoch: each record once
        for world in (2, 3, 4):
            assert global_sequence(data, world, 3, epoch, 12) == one
        # Resumed at a global position (a multiple of the step on every W) on another number of processes.
        assert global_sequence(data, 3, 3, epoch, 12, start=24) == one[24:]
    first, second = global_sequence(data, 1, 3, 0, 12), global_sequence(data, 1, 3, 1, 12)
    assert first != second  # shuffled anew each epoch
    # The order walks the shards a window of 2 at a time: the first window's records all come first.
    starts = np.cumsum([0, *SIZES])
    shard_of = {g: int(np.searchsorted(starts, g, side="right")) - 1 for g in range(41)}
    seen: list[int] = []
    window_of = []
    for g in first:
        if shard_of[g] not in seen:
            seen.append(shard_of[g])
        window_of.append(seen.index(shard_of[g]) // 2)
    assert window_of == sorted(window_of) == [w for w in range(3) for _ in range(window_of.count(w))]
    # Every sample is its record: its first token is its id.
    for g in first[:10]:
        inputs, target = data[g]
        assert inputs.tolist() == tokens_of(g)[:4] and target.tolist() == tokens_of(g)[1:5]


def test_shards_read_through_fsspec_urls_as_local_paths(tmp_path) -> None:
    paths = write_shards(tmp_path)
    local = dataset([f"{tmp_path}/*.jsonl", f"{tmp_path}/*.parquet"], tmp_path)
    by_url = dataset([f"file://{tmp_path}/*.jsonl", f"file://{tmp_path}/*.parquet"], tmp_path)
    memory = fsspec.filesystem("memory")
    for p in paths:
        memory.pipe(f"/shards-test/{Path(p).name}", Path(p).read_bytes())
    in_memory = dataset(["memory://shards-test/*.jsonl", "memory://shards-test/*.parquet"], tmp_path)
    assert by_url.urls[0] == f"file://{tmp_path}/part0.jsonl"
    assert len(local) == len(by_url) == len(in_memory) == 41
    assert local.urls == [u.removeprefix("file://") for u in by_url.urls]
    for g in (0, 7, 20, 40):  # the glob puts the JSONL shards first: a global id names the same record
        assert torch.equal(by_url[g][0], local[g][0]) and torch.equal(in_memory[g][0], local[g][0])
    assert local.epoch_order(5, 2) == in_memory.epoch_order(5, 2)
    # decode: any record to any sample (a JSONL line's dict, a Parquet row's).
    rows = dataset(paths, tmp_path, decode=lambda r: (torch.tensor(r["tokens"]), torch.tensor(len(r))))
    assert [rows[g][0].tolist() for g in (0, 8)] == [tokens_of(0), tokens_of(8)]
    assert [int(rows[g][1]) for g in (0, 8)] == [2, 1]  # {"tokens", "id"} and the Parquet row {"tokens"}
    memory.rm("/shards-test", recursive=True)


def test_a_jsonl_index_is_kept_and_open_shards_are_bounded(tmp_path) -> None:
    paths = write_shards(tmp_path, [30, 0, 30, 0, 30])  # empty Parquet shards are no records
    data = dataset(paths, tmp_path, open_shards=2)
    assert len(data) == 90
    assert len(list((tmp_path / "index").glob("*.npy"))) == 3  # one per JSONL shard
    again = dataset(paths, tmp_path)
    assert again.starts.tolist() == data.starts.tolist()
    for g in data.epoch_order(0, 0):
        data[g]
        assert len(data._open) <= 2
    Path(paths[0]).write_text(Path(paths[0]).read_text() + json.dumps({"tokens": tokens_of(0)}) + "\n")
    assert len(dataset(paths, tmp_path)) == 91  # a changed shard is indexed again


def test_token_samples_are_decoded_once_into_a_cache_that_a_half_written_row_never_passes(tmp_path) -> None:
    paths = write_shards(tmp_path)
    data = dataset(paths, tmp_path)
    everything = list(range(len(data)))
    truth = [(tokens_of(g)[:4], tokens_of(g)[1:5]) for g in everything]
    assert [(x.tolist(), y.tolist()) for x, y in data.__getitems__(everything)] == truth
    (cache,) = (tmp_path / "index").glob("*.tokens.npy")
    rows = np.load(cache, mmap_mode="r+")  # a row per record: its ids + 1, then 2 (a sample)
    assert rows.dtype == np.uint16 and rows.shape == (41, 6) and (rows[:, 5] == 2).all()
    assert rows[3, :5].tolist() == [t + 1 for t in tokens_of(3)[:5]]
    # Another reader (a rank, a loader worker, a later run) takes the rows as they are: no shard is read.
    again = dataset(paths, tmp_path)
    for p in paths:
        Path(p).rename(p + ".away")
    assert [(x.tolist(), y.tolist()) for x, y in again.__getitems__(everything)] == truth
    for p in paths:
        Path(p + ".away").rename(p)
    # A row seen half-written (a page another process, or a network file system, has not shown yet)
    # holds a zero, and its shard is decoded again rather than served.
    rows[3, 1:3] = 0
    rows.flush()
    healed = dataset(paths, tmp_path).__getitems__([3, 20])
    assert [(x.tolist(), y.tolist()) for x, y in healed] == [truth[3], truth[20]]
    assert rows[3, :5].tolist() == [t + 1 for t in tokens_of(3)[:5]]
    assert torch.equal(data[-1][0], data[40][0])  # a negative id counts from the end, as a list's does
    with pytest.raises(IndexError, match=r"^Shards: index out of range 0\.\.40$"):
        data[41]
    # Another window, field or vocabulary is another cache: a cache never serves what it was not made for.
    wider = Shards(paths, context=5, vocab_size=VOCAB, index_dir=str(tmp_path / "index"))
    assert wider[3][0].tolist() == tokens_of(3)[:5]
    assert len(list((tmp_path / "index").glob("*.tokens.npy"))) == 2


def test_a_bad_shard_is_one_line_naming_it(tmp_path) -> None:
    paths = write_shards(tmp_path)

    def refused(path, **kw) -> str:
        with pytest.raises(ConfigError) as e:
            dataset(path, tmp_path, **kw)
        return str(e.value)

    assert (
        refused(str(tmp_path / "none*.jsonl"))
        == f"data.path={str(tmp_path / 'none*.jsonl')!r}: matches no file"
    )
    assert refused([paths[0], str(tmp_path / "gone.jsonl")]) == (
        f"data.path={str(tmp_path / 'gone.jsonl')!r}: no such file"
    )
    cut = tmp_path / "cut.jsonl"
    cut.write_text(Path(paths[0]).read_text()[:-9])  # a partial last line
    assert refused(str(cut)) == f"data.path: shard {cut} ends in a cut-off line 7 (a truncated file?)"
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(Path(paths[1]).read_bytes()[:-20])
    assert refused(str(broken)).startswith(f"data.path: shard {broken} is not a readable Parquet file: ")
    assert refused(paths[1], field="text") == (
        f"data.field='text': shard {paths[1]} has no such column (it has tokens)"
    )
    assert refused(paths[0], format="csv") == "data.format='csv': must be auto, jsonl, parquet or tar"
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.mkdir()
    assert refused(str(unreadable)) == f"data.path={str(unreadable)!r}: no such file"

    # What only reading a record finds stops the run at its batch, in one line naming shard and record.
    odd = tmp_path / "odd.jsonl"
    odd.write_text(
        json.dumps({"tokens": [1, 2, 3, 4, 5]}) + "\n" + json.dumps({"tokens": [1, 2, 99, 4, 5]}) + "\n"
        + json.dumps({"tokens": [1, 2]}) + "\n" + json.dumps({"text": "a"}) + "\n" + "{not json\n"
        + json.dumps({"tokens": [1, 2.5, 3, 4, 5]}) + "\n"
    )  # fmt: skip
    data = dataset(str(odd), tmp_path)
    assert data[0][0].tolist() == [1, 2, 3, 4]
    lines = []
    for g in range(1, 6):
        with pytest.raises(ConfigError) as e:
            data[g]
        lines.append(str(e.value))
    assert lines == [
        f"data.path: shard {odd} record 2 holds token id 99, which data.vocab_size=64 does not cover "
        "(ids must be from 0 and below it)",
        f"data.path: shard {odd} record 3 holds 2 tokens, fewer than one window of data.context + 1 = 5",
        f"data.path: shard {odd} record 4 has no list of token ids in field 'tokens' (data.field)",
        f"data.path: shard {odd} line 5 is not JSON",
        f"data.path: shard {odd} record 6 holds 2.5 in field 'tokens', not a token id (an integer)",
    ]


def test_webdataset_tars_yield_the_samples_their_records_would_as_jsonl(tmp_path) -> None:
    records = [{"tokens": tokens_of(g), "id": g} for g in range(23)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_tar(tmp_path / "json.tar", [{"json": r, "cls": r["id"], "txt": "é"} for r in records])
    as_npy = [{"tokens.npy": np.asarray(r["tokens"], dtype=np.uint16), "id": r["id"]} for r in records]
    write_tar(tmp_path / "npy.tar", as_npy, first_key=100)
    jsonl, from_json, from_npy = (
        dataset(str(tmp_path / n), tmp_path) for n in ("a.jsonl", "json.tar", "npy.tar")
    )
    assert len(jsonl) == len(from_json) == len(from_npy) == 23
    assert jsonl.epoch_order(1, 0) == from_json.epoch_order(1, 0) == from_npy.epoch_order(1, 0)
    batch = list(range(23))
    for one, other in ((jsonl, from_json), (jsonl, from_npy)):
        for (x, y), (x2, y2) in zip(one.__getitems__(batch), other.__getitems__(batch), strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2) and x.dtype == x2.dtype == torch.int64
    # A sample's record: its members by extension, decoded by the extension's last part.
    assert from_json.record(5) == {"cls": 5, "json": records[5], "txt": "é"}
    npy_record = from_npy.record(5)
    assert npy_record["id"] == 5 and npy_record["tokens.npy"].tolist() == tokens_of(5)
    # The index: one small file and its members' list per tar, kept, and each shard's token cache (the
    # samples it has served, decoded once); a changed tar is indexed again.
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "index").iterdir()) == [
        "npy", "tar.json", "tar.json", "tar.npy", "tar.npy", "tokens.npy", "tokens.npy", "tokens.npy"
    ]  # fmt: skip
    assert dataset(str(tmp_path / "json.tar"), tmp_path).starts.tolist() == [0, 23]
    write_tar(tmp_path / "json.tar", [{"json": r, "cls": r["id"], "txt": "é"} for r in records[:20]])
    assert len(dataset(str(tmp_path / "json.tar"), tmp_path)) == 20
    # decode: a sample's dict to any sample; fsspec URLs read as the local path does.
    pairs = dataset(str(tmp_path / "json.tar"), tmp_path, decode=lambda r: (r["json"]["id"], r["cls"]))
    assert pairs[7] == (7, 7)
    memory = fsspec.filesystem("memory")
    memory.pipe("/wds-test/npy.tar", (tmp_path / "npy.tar").read_bytes())
    for url in ("memory://wds-test/*.tar", f"file://{tmp_path}/npy.tar"):
        by_url = dataset(url, tmp_path)
        assert len(by_url) == 23 and torch.equal(by_url[11][0], from_npy[11][0])
    memory.rm("/wds-test", recursive=True)
    # An array member reads back as np.load gives it, the first time and from the header seen before.
    grids = [np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4) + g) for g in range(3)]
    write_tar(tmp_path / "grids.tar", [{"grid.npy": grid} for grid in grids])
    read = dataset(str(tmp_path / "grids.tar"), tmp_path, decode=lambda r: r["grid.npy"])
    for g in (0, 1, 2, 1):
        assert read[g].dtype == np.float32 and np.array_equal(read[g], grids[g])


def test_a_bad_tar_is_one_line_naming_it(tmp_path) -> None:
    write_tar(tmp_path / "good.tar", [{"json": {"tokens": tokens_of(g)}, "cls": g} for g in range(9)])
    whole = (tmp_path / "good.tar").read_bytes()

    def refused(name: str, raw: bytes | None = None, **kw) -> str:
        if raw is not None:
            (tmp_path / name).write_bytes(raw)
        with pytest.raises(ConfigError) as e:
            dataset(str(tmp_path / name), tmp_path, **kw)
        return str(e.value)

    cut = f"data.path: shard {tmp_path / 'cut.tar'} is cut short (a truncated file?)"
    assert refused("cut.tar", whole[:2600]) == cut  # inside a member's data
    assert refused("cut.tar", whole[:3072]) == cut  # at a member's end: no end-of-archive blocks
    assert refused("cut.tar", whole[:100]) == cut  # inside the first header
    assert refused("junk.tar", b"not a tar" * 200).startswith(
        f"data.path: shard {tmp_path / 'junk.tar'} is not a readable tar file: "
    )  # tarfile's reason (invalid header, bad checksum) after it
    (tmp_path / "dir.tar").mkdir()
    assert refused("dir.tar") == f"data.path={str(tmp_path / 'dir.tar')!r}: no such file"
    gap = [{"json": {"tokens": tokens_of(g)}, "cls": g} for g in range(5)]
    del gap[3]["cls"]
    write_tar(tmp_path / "gap.tar", gap)
    assert refused("gap.tar") == (
        f"data.path: shard {tmp_path / 'gap.tar'} sample '000003' lacks member 000003.cls "
        "(every sample needs the members of the shard's first: cls, json)"
    )
    write_tar(tmp_path / "labels.tar", [{"cls": g} for g in range(3)])
    no_tokens = (
        f"data.field='tokens': shard {tmp_path / 'labels.tar'} has no KEY.tokens.npy nor KEY.json member "
        "to take a sample's tokens from (its samples have cls)"
    )
    assert refused("labels.tar") == no_tokens
    assert len(dataset(str(tmp_path / "labels.tar"), tmp_path, decode=lambda r: r["cls"])) == 3
    assert refused("labels.tar") == no_tokens  # from the index kept by the run with decode, too
    with tarfile.open(tmp_path / "bare.tar", "w") as tar:
        tar.addfile(tarfile.TarInfo("README"), io.BytesIO(b""))
    assert refused("bare.tar") == (
        f"data.path: shard {tmp_path / 'bare.tar'} member 'README' is not a file named KEY.EXTENSION "
        "(a webdataset sample's member)"
    )
    assert refused("good.tar", format="zip") == "data.format='zip': must be auto, jsonl, parquet or tar"
    # What only reading a member finds stops the run at its batch, in one line naming shard and record.
    write_tar(
        tmp_path / "odd.tar", [{"json": {"tokens": tokens_of(0)}}, {"json": "{x"}, {"json": {"tokens": [1]}}]
    )
    raw = (tmp_path / "odd.tar").read_bytes().replace(b'"{x"', b"{x}{")
    (tmp_path / "odd.tar").write_bytes(raw)
    odd = dataset(str(tmp_path / "odd.tar"), tmp_path)
    assert odd[0][0].tolist() == tokens_of(0)[:4]
    lines = []
    for g in (1, 2):
        with pytest.raises(ConfigError) as e:
            odd[g]
        lines.append(str(e.value))
    assert lines[0].startswith(
        f"data.path: shard {tmp_path / 'odd.tar'} record 2: its .json member does not decode ("
    )
    assert lines[1] == (
        f"data.path: shard {tmp_path / 'odd.tar'} record 3 holds 1 tokens, fewer than one window of "
        "data.context + 1 = 5"
    )


def test_a_model_trains_on_shards_in_one_process_as_the_global_order_says(tmp_path) -> None:
    paths = write_shards(tmp_path)
    data = dataset(paths, tmp_path, sequence=False)  # the MLP predicts the next token alone
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.trainer.batch_size, cfg.trainer.num_threads, cfg.trainer.max_epochs = 8, 1, 2
    cfg.trainer.val_fraction = 0.1  # the last 4 records held out: the order is of the other 37
    model = MLPLanguageModel(vocab_size=VOCAB, context=4)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, cfg)
    assert isinstance(trainer.loader, InProcessLoader)
    expected = [g for g in data.epoch_order(cfg.trainer.seed, 0) if g < 37]
    assert list(trainer.sampler) == expected
    summary = trainer.fit()
    assert summary["steps"] == 2 * 5  # 37 samples in steps of 8: 4 whole and one of 5, twice


def test_the_same_model_config_trains_alike_on_tars_and_on_jsonl(tmp_path) -> None:
    from tests.support import losses

    curves = []
    for fmt in ("jsonl", "tar"):
        root = tmp_path / fmt
        root.mkdir()
        data = dataset(write_shards(root, SIZES, (fmt,)), tmp_path, sequence=False)
        cfg = TrainConfig(run_dir=str(root / "run"))
        cfg.trainer.batch_size, cfg.trainer.num_threads, cfg.trainer.val_fraction = 8, 1, 0
        cfg.trainer.max_epochs = 1
        torch.manual_seed(0)
        model = MLPLanguageModel(vocab_size=VOCAB, context=4, batchnorm=False)
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, cfg).fit()
        curves.append(losses(root / "run"))
    assert len(curves[0]) == 6 and curves[1] == curves[0]  # 41 samples in steps of 8: the same floats


def test_a_truncated_tar_given_to_the_cli_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    from disttrain.cli import main

    write_tar(tmp_path / "a.tar", [{"tokens.npy": np.arange(6), "cls": 1} for _ in range(40)])
    (tmp_path / "cut.tar").write_bytes((tmp_path / "a.tar").read_bytes()[:5000])
    job = [
        "data=shards",
        "data.vocab_size=64",
        f"data.index_dir={tmp_path / 'index'}",
        f"run_dir={tmp_path / 'run'}",
    ]
    assert main([*job, f"data.path=[{tmp_path / 'a.tar'},{tmp_path / 'cut.tar'}]"]) == 2
    assert capsys.readouterr().err == (
        f"disttrain: error: data.path: shard {tmp_path / 'cut.tar'} is cut short (a truncated file?)\n"
    )
    assert not (tmp_path / "run" / "snapshots").exists()


#: 181 records in 5 shards (none of the sizes divides by 2 or 4), JSONL, Parquet and tar in turn, 16
#: per optimizer step (4 per micro-batch): 11 whole steps an epoch and one of the 5 left, 2 epochs, a
#: snapshot every 2 steps. Epoch 0 reads shards 0 and 4 first (a window of 2): 33 + 31 = 64 records,
#: so the second window starts with step 5, right after the snapshot of step 4.
RUN_SIZES = [33, 41, 29, 47, 31]
RUN_STEPS, RUN_EPOCH, FIRST_WINDOW = 24, 181, 64


def shard_job(root: Path) -> list[str]:
    shards = root / "shards"
    if not shards.is_dir():
        shards.mkdir()
        write_shards(shards, RUN_SIZES, ("jsonl", "parquet", "tar"))
    return [
        "--config-dir", "tests/conf", "model=mlp_lm", "model.batchnorm=false", "data=logged_shards",
        f"data.path={shards}/*", f"data.index_dir={root / 'index'}", "trainer.global_batch_size=16",
        "trainer.batch_size=4", "trainer.max_epochs=2", "trainer.val_fraction=0", "trainer.num_threads=1",
        "snapshot.every_steps=2", "optim.lr=0.05",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def shard_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[int]]]:
    """The uninterrupted run, on one process (the order does not depend on the number of processes),
    and every step's global ids; its shards are written once and shared by the tests' runs."""
    from tests.order import steps_read
    from tests.support import disttrain

    root = tmp_path_factory.mktemp("shards")
    job = shard_job(root)
    reference = disttrain(*job, f"run_dir={root / 'ref'}", ORDER_LOG=str(root / "ref_log"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref_steps = steps_read(root / "ref_log", 1, 16, RUN_EPOCH)
    assert sorted(ref_steps) == list(range(1, RUN_STEPS + 1))
    assert [len(ref_steps[s]) for s in (11, 12, 13)] == [16, 5, 16]  # the epoch ends on what is left
    data = dataset(f"{root}/shards/*", root, shuffle_window=2)
    for epoch, steps in enumerate((range(1, 13), range(13, 25))):  # the order is the shards' own
        assert [g for s in steps for g in ref_steps[s]] == data.epoch_order(TrainerConfig().seed, epoch)
    return root, ref_steps


def assert_resumed_like_the_reference(shard_reference, run_dir: Path, log: Path, resumed_at: int) -> None:
    """The resumed life (no loader workers: its log is in step order) read every step after the
    snapshot it resumed from as the reference did, and metrics.jsonl holds the reference's losses."""
    from tests.order import steps_read
    from tests.support import step_losses, summary

    root, ref_steps = shard_reference
    again = steps_read(log, resumed_at + 1, 16, RUN_EPOCH)
    assert again == {s: ref_steps[s] for s in range(resumed_at + 1, RUN_STEPS + 1)}
    steps, losses = step_losses(run_dir)
    assert steps == list(range(1, RUN_STEPS + 1)) and summary(run_dir)["steps"] == RUN_STEPS
    assert losses == pytest.approx(step_losses(root / "ref")[1], rel=1e-5)


def kill_when_paused(proc, log: Path, snapshot: Path, timeout: float = 120) -> None:
    """SIGKILL the job's process group once its data has paused at ORDER_PAUSE_AT (tests/order.py) and
    `snapshot` is committed: the kill lands at a known sample, after a known snapshot."""
    import os
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not ((log / "paused").exists() and snapshot.is_dir()):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"no pause after {snapshot.name} in {timeout} s:\n{out[-3000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_sharded_run_killed_inside_a_shard_resumes_on_another_number_of_processes_and_workers(
    shard_reference, tmp_path
) -> None:
    from collections import Counter

    from disttrain.snapshot import list_snapshots
    from tests.order import steps_read
    from tests.support import disttrain, kill_at_step, start, step_losses, summary

    root, ref_steps = shard_reference
    job = shard_job(root)
    # Two processes, reading a sample takes 20 ms (a step 160 ms: metrics.jsonl, written once a second,
    # shows step 3 well before the epoch ends): killed mid-epoch, inside the shards of a window.
    run_dir = tmp_path / "run"
    two = ["launcher=torchrun", "launcher.nproc_per_node=2", "data.delay=0.02", f"run_dir={run_dir}"]
    kill_at_step(start(*job, *two, ORDER_LOG=str(tmp_path / "1")), run_dir, 3)
    # (A snapshot whose commit was under way at the kill may land after it: the resume says which.)
    assert list_snapshots(run_dir / "snapshots")

    # Resumed on one process with two loader workers (which log in the order they read, not the steps').
    again = disttrain(
        *job, "data.delay=0.02", "trainer.num_workers=2", f"run_dir={run_dir}", ORDER_LOG=str(tmp_path / "2")
    )
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = re.search(r"\(epoch 0, step (\d+), 2 -> 1 processes\)", again.stderr)
    assert resumed, again.stderr[-3000:]
    resumed_at = int(resumed.group(1))
    assert 0 < resumed_at < 12
    first_life = steps_read(tmp_path / "1", 1, 16, RUN_EPOCH)
    assert {s: first_life[s] for s in range(1, resumed_at + 1)} == {
        s: ref_steps[s] for s in range(1, resumed_at + 1)
    }
    read = Counter(int(v) for v in (tmp_path / "2" / "rank0.txt").read_text().split())
    assert read == Counter(g for s in range(resumed_at + 1, RUN_STEPS + 1) for g in ref_steps[s])
    steps, losses = step_losses(run_dir)
    assert steps == list(range(1, RUN_STEPS + 1)) and summary(run_dir)["steps"] == RUN_STEPS
    assert losses == pytest.approx(step_losses(root / "ref")[1], rel=1e-5)


@pytest.mark.slow
def test_a_sharded_run_killed_at_a_shard_boundary_on_4_processes_resumes_on_2(
    shard_reference, tmp_path
) -> None:
    from tests.order import steps_read
    from tests.support import disttrain, start

    root, ref_steps = shard_reference
    job, run_dir = shard_job(root), tmp_path / "run"
    boundary = ref_steps[5][0]  # the first record of the second window of shards, read by rank 0
    data = dataset(f"{root}/shards/*", root)
    shard_of = [int(np.searchsorted(data.starts, g, side="right")) - 1 for g in range(RUN_EPOCH)]
    first = {shard_of[g] for s in range(1, 5) for g in ref_steps[s]}
    assert first == {0, 4} and shard_of[boundary] not in first
    # Four processes (a micro-batch a step each), SIGKILLed as rank 0 reads the boundary's record,
    # after the snapshot of step 4, whose position is the boundary: 64 records, a whole window.
    four = ["launcher=torchrun", "launcher.nproc_per_node=4", f"run_dir={run_dir}"]
    proc = start(*job, *four, ORDER_LOG=str(tmp_path / "1"), ORDER_PAUSE_AT=str(boundary))
    kill_when_paused(proc, tmp_path / "1", run_dir / "snapshots" / "step_00000004")
    assert (tmp_path / "1" / "rank0.txt").read_text().split()[-4] == str(boundary)  # its batch's first
    first_life = steps_read(tmp_path / "1", 1, 16, RUN_EPOCH)
    assert {s: first_life[s] for s in range(1, 5)} == {s: ref_steps[s] for s in range(1, 5)}

    again = disttrain(
        *job,
        "launcher=torchrun",
        "launcher.nproc_per_node=2",
        f"run_dir={run_dir}",
        ORDER_LOG=str(tmp_path / "2"),
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(epoch 0, step 4, 4 -> 2 processes)" in again.stderr
    assert_resumed_like_the_reference(shard_reference, run_dir, tmp_path / "2", 4)


@pytest.mark.slow
def test_a_sharded_run_killed_at_the_end_of_an_epoch_with_2_workers_resumes_into_the_next_with_none(
    shard_reference, tmp_path
) -> None:
    from collections import Counter

    from tests.support import disttrain, start

    root, ref_steps = shard_reference
    job, run_dir = shard_job(root), tmp_path / "run"
    # One process, two loader workers (each 2 batches ahead): paused as a worker reads the epoch's last
    # step (12, its 5 records), after the snapshot of step 10; killed there, in epoch 0's last steps.
    proc = start(
        *job, "trainer.num_workers=2", f"run_dir={run_dir}",
        ORDER_LOG=str(tmp_path / "1"), ORDER_PAUSE_AT=str(ref_steps[12][0]),
    )  # fmt: skip
    kill_when_paused(proc, tmp_path / "1", run_dir / "snapshots" / "step_00000010")
    read = Counter(int(v) for v in (tmp_path / "1" / "rank0.txt").read_text().split())
    assert read >= Counter(g for s in range(1, 11) for g in ref_steps[s])

    # Resumed on two processes without workers: steps 11 and 12 end epoch 0, 13 to 24 are epoch 1.
    two = ["launcher=torchrun", "launcher.nproc_per_node=2", f"run_dir={run_dir}"]
    again = disttrain(*job, *two, ORDER_LOG=str(tmp_path / "2"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(epoch 0, step 10, 1 -> 2 processes)" in again.stderr
    assert_resumed_like_the_reference(shard_reference, run_dir, tmp_path / "2", 10)


def test_a_shard_failing_mid_run_stops_it_in_one_line_with_the_last_snapshot_kept(tmp_path) -> None:
    from disttrain.snapshot import list_snapshots

    paths = write_shards(tmp_path)
    data = dataset(paths, tmp_path, sequence=False, shuffle_window=1)  # one shard at a time
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.trainer.batch_size, cfg.trainer.num_threads, cfg.trainer.val_fraction = 4, 1, 0
    cfg.snapshot.every_steps = 1
    # The shard the epoch reads last, cut short before the run reaches it (a copy still being written, a
    # bad disk); a shard already decoded into the token cache is no longer read.
    last = paths[
        int(np.searchsorted(data.starts, data.epoch_order(cfg.trainer.seed, 0)[-1], side="right")) - 1
    ]

    class CutAShard:
        def on_step_end(self, run) -> None:
            if run.step == 2:
                Path(last).write_bytes(Path(last).read_bytes()[:40])

    model = MLPLanguageModel(vocab_size=VOCAB, context=4, batchnorm=False)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, cfg, callbacks=[CutAShard()])
    with pytest.raises(ConfigError) as e:
        trainer.fit()
    assert str(e.value) == f"data.path: shard {last} is shorter than when it was indexed"
    assert list_snapshots(tmp_path / "run" / "snapshots")[0].step >= 2


def test_a_refusal_from_a_loader_worker_stays_one_line() -> None:
    from torch._utils import ExceptionWrapper

    from disttrain.data import one_line_refusals

    def from_a_worker():  # what DataLoader does with a worker's exception: its traceback in the message
        yield 1
        try:
            raise ConfigError("data.path: shard a.jsonl line 3 is not JSON")
        except ConfigError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    batches = one_line_refusals(from_a_worker())
    assert next(batches) == 1
    with pytest.raises(ConfigError) as e:
        next(batches)
    assert str(e.value) == "data.path: shard a.jsonl line 3 is not JSON"
