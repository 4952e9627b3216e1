#!/usr/bin/env python3
"""`python scripts/plot.py RUN_DIR [RUN_DIR ...] [-o OUT.png]`: the same as `disttrain plot` (see
disttrain/plot.py), for a checkout without the package installed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from disttrain.plot import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
