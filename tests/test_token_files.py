"""Pre-tokenized token files (`data=token_file`, disttrain.data.TokenFile) and `disttrain tokenize`: the
windows are the file's tokens, never read whole, and every bad file is one line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from disttrain.config import ConfigError
from disttrain.data import TokenFile
from disttrain.tokenize import main as tokenize_main
from tests.support import ROOT, disttrain, env, summary


def write_tokens(path: Path, tokens: np.ndarray) -> Path:
    tokens.tofile(path)  # nanoGPT's prepare.py: np.array(ids, dtype=np.uint16).tofile("train.bin")
    return path


def test_windows_are_the_files_tokens_and_never_cross_from_one_file_into_the_next(tmp_path) -> None:
    rng = np.random.default_rng(0)
    a = write_tokens(tmp_path / "a.bin", rng.integers(0, 70_000, 40).astype(np.uint32))
    b = write_tokens(tmp_path / "b.bin", rng.integers(0, 70_000, 25).astype(np.uint32))
    data = TokenFile(str(tmp_path / "*.bin"), context=8, vocab_size=70_000, dtype="uint32")
    assert len(data) == (40 - 8) + (25 - 8)
    flat = [np.fromfile(a, np.uint32).astype(np.int64), np.fromfile(b, np.uint32).astype(np.int64)]
    expected = [f[i : i + 9] for f in flat for i in range(len(f) - 8)]
    for i, (inputs, target) in enumerate(data.__getitems__(list(range(len(data))))):
        assert torch.equal(inputs, torch.from_numpy(expected[i][:-1]))
        assert torch.equal(target, torch.from_numpy(expected[i][1:]))  # sequence: shifted by one
    inputs, target = TokenFile([str(b)], context=8, vocab_size=70_000, dtype="uint32", sequence=False)[3]
    assert torch.equal(inputs, torch.from_numpy(flat[1][3:11])) and int(target) == flat[1][11]


def test_a_bad_token_file_is_one_line_naming_it(tmp_path) -> None:
    good = write_tokens(tmp_path / "good.bin", np.arange(100, dtype=np.uint16))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 101)
    short = write_tokens(tmp_path / "short.bin", np.arange(5, dtype=np.uint16))
    cases = {
        str(tmp_path / "missing.bin"): f"data.path='{tmp_path}/missing.bin': no such file",
        str(tmp_path / "none*.bin"): f"data.path='{tmp_path}/none*.bin': matches no file",
        str(odd): f"data.path: {odd} has 101 bytes, not a whole number of 2-byte tokens (data.dtype)",
        str(short): f"data.path: {short} holds 5 tokens, fewer than one window of data.context + 1 = 9",
    }
    for path, line in cases.items():
        with pytest.raises(ConfigError) as refused:
            TokenFile(path, context=8, vocab_size=100)
        assert str(refused.value) == line
    with pytest.raises(ConfigError) as refused:
        TokenFile(str(good), context=8, vocab_size=100, dtype="int8")
    assert str(refused.value) == "data.dtype='int8': must be one of uint16, uint32"
    # An id past the vocabulary is found in the batch that reads it, not by reading the file whole.
    data = TokenFile(str(good), context=8, vocab_size=50)
    assert len(data.__getitems__([0, 10, 41])) == 3  # ids up to 49
    with pytest.raises(ConfigError) as refused:
        data.__getitems__([0, 60])
    assert str(refused.value) == (
        f"data.path: {good} holds token id 68, which data.vocab_size=50 does not cover (ids must be below it)"
    )


def test_tokenize_writes_the_bytes_or_a_tokenizers_ids(tmp_path, capsys) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("hello wörld\nthe quick brown fox\n" * 50, encoding="utf-8")
    out = tmp_path / "bytes.bin"
    assert tokenize_main([str(text), "-o", str(out), "--eot", "0"]) == 0
    assert np.fromfile(out, np.uint16).tolist() == [*text.read_bytes(), 0]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"train on it: disttrain data=token_file data.path={out} data.vocab_size=256"
    )
    # A tokenizer of the user's own, from a local tokenizer.json (the `tokenizers` library's format).
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        text.read_text().splitlines(), trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"])
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "bpe.bin"
    assert tokenize_main([str(text), "-o", str(out), "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    lines = text.read_text().splitlines(keepends=True)
    expected = [i for enc in tok.encode_batch(lines, add_special_tokens=False) for i in enc.ids]
    assert np.fromfile(out, np.uint16).tolist() == expected
    assert tokenize_main([str(tmp_path / "nothing.txt"), "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"disttrain: error: {tmp_path}/nothing.txt: no such file\n"


@pytest.mark.slow
def test_a_gpt_trains_on_a_token_file_and_a_bad_one_is_refused_before_training(tmp_path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("a small corpus of text, tokenized by bytes. " * 200)
    tokenized = disttrain("tokenize", str(text), "-o", str(tmp_path / "train.bin"))
    assert tokenized.returncode == 0, tokenized.stderr
    job = ["experiment=gpt", "data=token_file", "data.vocab_size=256", "trainer.max_steps=4"]
    job += ["trainer.val_every_steps=2", "trainer.num_threads=1", "model.n_layer=1"]
    run = disttrain(*job, f"data.path={tmp_path / 'train.bin'}", f"run_dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert summary(tmp_path / "run")["steps"] == 4
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01" * 4001)
    refused = disttrain(*job, f"data.path={odd}", f"run_dir={tmp_path / 'refused'}")
    assert (refused.returncode, refused.stderr) == (
        2,
        f"disttrain: error: data.path: {odd} has 4001 bytes, not a whole number of 2-byte tokens "
        "(data.dtype)\n",
    )
    assert not (tmp_path / "refused").exists()


#: Reads 200 batches of random windows through a TokenFile of each file named and prints how much the
#: process's private memory (RssAnon, KiB) grew meanwhile. The file's pages it maps are the kernel's page
#: cache (RssFile), shared and dropped under memory pressure: what would run a process out of memory is
#: private memory.
ANON_GROWTH = """
import sys, torch
from disttrain.data import TokenFile
def anon():
    return int(dict(l.split(":", 1) for l in open("/proc/self/status"))["RssAnon"].split()[0])
for path in sys.argv[1:]:
    data = TokenFile(path, context=256, vocab_size=256)
    g = torch.Generator().manual_seed(0)
    before = anon()
    for _ in range(50):  # enough batches for growth to show; reads into a sparse file's holes are slow
        data.__getitems__(torch.randint(len(data), (16,), generator=g).tolist())
    print(anon() - before)
"""


@pytest.mark.slow
def test_private_memory_does_not_grow_with_the_token_file(tmp_path) -> None:
    paths = []
    for name, size in (("small", 2**20), ("huge", 2**34)):  # 1 MiB, and 16 GiB (a sparse file of zeros)
        paths.append(tmp_path / f"{name}.bin")
        with paths[-1].open("wb") as f:
            f.truncate(size)
    result = subprocess.run(
        [sys.executable, "-c", ANON_GROWTH, *map(str, paths)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    small, huge = map(int, result.stdout.split())
    # The same few MiB of batches either way, nothing in proportion to the file (16 GiB of windows
    # read into memory would be 64 GiB as int64).
    assert huge < 16 * 1024 and abs(huge - small) < 8 * 1024, result.stdout
