"""Checks of plain-data dicts (read back from JSON) against config dataclasses; stdlib only."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any


def check_known_fields(cls: type, d: Mapping[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming the keys of ``d`` that are not fields of dataclass ``cls``.

    ``what`` starts the message: ``unknown <what> ['x']; valid: [...]``.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {sorted(names)}")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls``, on one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


_FLAG_TYPES = {"int": int, "float": float, "str": str}


def add_field_flags(parser: argparse._ActionsContainer, cls: type, names: Sequence[str]
                    ) -> list[str]:
    """Add ``--<name>`` for fields of dataclass ``cls``, typed and documented by the field.

    Every flag defaults to None ("not given"), so a preset's value stands unless the flag
    is passed. Returns the destination names (for ``config.replace(**...)``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = field_docs(cls)
    for name in names:
        kind = str(fields[name].type).split("|")[0].strip()
        if kind not in _FLAG_TYPES:
            raise TypeError(f"{cls.__name__}.{name}: no command-line flag for type {kind}")
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_FLAG_TYPES[kind],
                            default=None, help=docs.get(name, "").replace("%", "%%"))
    return list(names)
