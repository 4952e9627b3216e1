"""A module whose import takes a while: a `_target_` being imported while the config is checked. It
touches the file DISTTRAIN_TEST_MARKER names, so that a test knows when the import has begun."""

import os
import time
from pathlib import Path

Path(os.environ["DISTTRAIN_TEST_MARKER"]).touch()
time.sleep(60)
Model = None
