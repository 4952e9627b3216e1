"""A griffe extension for the API reference of the schema (disttrain/config.py).

The schema documents each dataclass field in `#:` comments right above it, which griffe does not read by
itself: this gives each such attribute those lines as its docstring. Its defaults are written through
helpers (`_number(5, low=1)`, `field(default_factory=list)`): the reference shows the default itself, and
a number's range as the rule the config check prints."""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

import griffe

from disttrain import config


def _rule(attr: griffe.Attribute) -> str:
    """The range a number must be in, as the config check says it (read from the field's metadata)."""
    schema = getattr(config, attr.parent.name, None) if attr.parent else None
    if schema is None or not dataclasses.is_dataclass(schema):
        return ""
    found = {f.name: f for f in dataclasses.fields(schema)}.get(attr.name)
    if found is None or "range" not in found.metadata:
        return ""
    return f"A finite number that {found.metadata['range'].rule()}."


def _default(call: ast.Call, attr: griffe.Attribute) -> tuple[str, str] | None:
    """(the default, the rule it adds) of a field written with the schema's helpers, else None."""
    name = call.func.id if isinstance(call.func, ast.Name) else ""
    keywords = {k.arg: k.value for k in call.keywords if k.arg}
    if name == "_number" and call.args:
        return ast.unparse(call.args[0]), _rule(attr)
    if name == "_choice" and call.args:
        return ast.unparse(call.args[0]), ""
    if name == "field" and "default_factory" in keywords:
        factory = keywords["default_factory"]
        if isinstance(factory, ast.Lambda):
            return ast.unparse(factory.body), ""
        return {"list": "[]", "dict": "{}"}.get(ast.unparse(factory), f"{ast.unparse(factory)}()"), ""
    return None


class CommentDocstrings(griffe.Extension):
    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, agent: Any, **kwargs: Any) -> None:
        code = getattr(agent, "code", None)  # the visitor reads the source; an inspector has none
        if attr.lineno is None or not code:
            return
        rule = ""
        if isinstance(getattr(node, "value", None), ast.Call) and (found := _default(node.value, attr)):
            attr.value, rule = found
        if attr.docstring is not None:
            return
        lines = code.splitlines()
        comment: list[str] = []
        index = attr.lineno - 2  # the line above the attribute (lineno counts from 1)
        while index >= 0 and lines[index].strip().startswith("#:"):
            comment.insert(0, lines[index].strip()[2:].strip())
            index -= 1
        if comment or rule:
            attr.docstring = griffe.Docstring(" ".join([*comment, rule]).strip(), parent=attr)
