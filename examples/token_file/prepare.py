"""Writes a token file the way nanoGPT's prepare.py does, for any tokenizer you call from Python: the
ids one after the other, as uint16 (uint32 past 65,536 ids). `disttrain tokenize` does the same from the
command line; this is the shape to copy when your tokenization is code of your own.

    python prepare.py corpus.txt train.bin             # bytes as tokens, vocabulary 256
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(source: str, out: str) -> None:
    ids = np.frombuffer(Path(source).read_bytes(), dtype=np.uint8)  # your tokenizer's ids go here
    ids.astype(np.uint16).tofile(out)
    print(f"{out}: {len(ids):,} tokens (uint16, vocabulary 256)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
