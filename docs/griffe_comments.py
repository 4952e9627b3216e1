"""A griffe extension for the API reference: the schema documents each dataclass field in `#:` comments
right above it (disttrain/config.py), which griffe does not read by itself; this gives each such
attribute those lines as its docstring, so the reference shows what the source says."""

from __future__ import annotations

from typing import Any

import griffe


class CommentDocstrings(griffe.Extension):
    def on_attribute_instance(self, *, attr: griffe.Attribute, agent: Any, **kwargs: Any) -> None:
        code = getattr(agent, "code", None)  # the visitor reads the source; an inspector has none
        if attr.docstring is not None or attr.lineno is None or not code:
            return
        lines = code.splitlines()
        comment: list[str] = []
        index = attr.lineno - 2  # the line above the attribute (lineno counts from 1)
        while index >= 0 and lines[index].strip().startswith("#:"):
            comment.insert(0, lines[index].strip()[2:].strip())
            index -= 1
        if comment:
            attr.docstring = griffe.Docstring(" ".join(comment), parent=attr)
