"""`disttrain tokenize TEXT ... -o OUT.bin`: text files into a flat file of tokens that `data=token_file`
trains on (the format of nanoGPT's prepare.py: the ids one after the other, uint16 or uint32).

    disttrain tokenize corpus.txt -o train.bin                          # bytes: vocabulary 256
    disttrain tokenize a.txt b.txt -o train.bin --tokenizer tokenizer.json
    disttrain tokenize corpus.txt -o train.bin --tokenizer ./my-gpt2 --eot 50256

`--tokenizer` is a `tokenizers` file (tokenizer.json) or a local `transformers` tokenizer directory;
without it every byte is a token. The text is read and encoded a block of lines at a time and written as
it goes, so memory does not grow with the input. `--eot ID` ends each input file with that token (a
document separator, as nanoGPT appends GPT-2's <|endoftext|>). The last line printed is the override
that trains on the file.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from disttrain.config import ConfigError

#: Lines encoded together: large enough that a tokenizer's batch call pays off, small in memory.
LINES_PER_BLOCK = 4096


def byte_tokenizer() -> tuple[Callable[[list[str]], list[list[int]]], int]:
    return (lambda lines: [list(line.encode("utf-8")) for line in lines]), 256


def file_tokenizer(spec: str) -> tuple[Callable[[list[str]], list[list[int]]], int]:
    """A `tokenizers` file or a local `transformers` tokenizer directory: (encode lines, vocabulary)."""
    path = Path(spec)
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        return (lambda lines: [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]), (
            tok.get_vocab_size()
        )
    if path.is_dir():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return (lambda lines: hf(lines, add_special_tokens=False)["input_ids"]), len(hf)
    raise ConfigError(f"--tokenizer={spec!r}: no such file or directory")


def blocks(path: Path) -> Iterator[list[str]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            while block := list(itertools.islice(f, LINES_PER_BLOCK)):
                yield block
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text: {e}") from None


def tokenize(inputs: list[Path], out: Path, tokenizer: str | None, eot: int | None) -> tuple[int, int, str]:
    """Write the tokens of `inputs` to `out` (through a temporary file, renamed when whole); return
    (tokens written, vocabulary size, dtype)."""
    encode, vocab = file_tokenizer(tokenizer) if tokenizer else byte_tokenizer()
    if eot is not None and not 0 <= eot < vocab:
        raise ConfigError(f"--eot={eot}: must be a token id of the tokenizer's vocabulary (0..{vocab - 1})")
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    for path in inputs:
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
    partial = out.with_name(out.name + ".partial")
    written = 0
    with partial.open("wb") as f:
        for path in inputs:
            for block in blocks(path):
                ids = np.fromiter(itertools.chain.from_iterable(encode(block)), dtype=np.int64)
                f.write(ids.astype(dtype).tobytes())
                written += len(ids)
            if eot is not None:
                f.write(np.array([eot], dtype=dtype).tobytes())
                written += 1
    partial.replace(out)
    return written, vocab, dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disttrain tokenize", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="UTF-8 text files, tokenized in this order")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the token file to write")
    parser.add_argument("--tokenizer", help="tokenizer.json, or a local transformers tokenizer directory")
    parser.add_argument("--eot", type=int, help="a token id written after each input file")
    args = parser.parse_args(argv)
    try:
        written, vocab, dtype = tokenize(args.inputs, args.out, args.tokenizer, args.eot)
    except ConfigError as e:
        print(f"disttrain: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written:,} tokens ({dtype}, vocabulary {vocab}) to {args.out}")
    print(f"train on it: disttrain data=token_file data.path={args.out} data.vocab_size={vocab}", end="")
    print(f" data.dtype={dtype}" if dtype != "uint16" else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
