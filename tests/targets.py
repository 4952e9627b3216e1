"""`_target_`s that fail on cue, for the tests of one-line errors (the package has no test hooks)."""

from __future__ import annotations

from typing import Any

from torch import nn


class FailsInInit(nn.Module):
    """A model or dataset whose constructor raises, as a user's code with a bug does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        raise ValueError(f"{len(kwargs)} arguments, and none of them is width")
