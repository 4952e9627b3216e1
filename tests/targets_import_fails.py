"""A module that raises when imported (a `_target_` whose package needs what this machine lacks)."""

raise RuntimeError("this module needs a GPU driver")
