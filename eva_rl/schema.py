"""Checks of plain-data dicts (read back from JSON) against config dataclasses; stdlib only."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
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


def _comma_list(item: type) -> Any:
    def parse(text: str) -> tuple:
        return tuple(item(v.strip()) for v in text.split(",") if v.strip())

    parse.__name__ = f"comma list of {item.__name__}"
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


_FLAG_TYPES = {"int": int, "float": float, "str": str, "tuple[str, ...]": _comma_list(str),
               "tuple[float, float]": _comma_list(float)}


def field_default(field: dataclasses.Field) -> Any:
    """A dataclass field's default (made by its factory where it has one)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_field_flags(parser: argparse._ActionsContainer, cls: type, names: Sequence[str],
                    defaults: Any = None, dests: Mapping[str, str] | None = None) -> list[str]:
    """Add ``--<name>`` for fields of dataclass ``cls``, typed and documented by the field
    (its docstring, and its value in ``defaults``, an instance of ``cls``, or else its own
    default; a bool field gets ``--<name>`` / ``--no-<name>``, a tuple one a comma list).
    ``dests`` renames fields: ``{"rank": "adapter_rank"}`` gives ``--adapter-rank``.

    Every flag defaults to None ("not given"), so a preset's value stands unless the flag
    is passed. Returns the destination names (for ``config.replace(**...)``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = field_docs(cls)
    dests = dests or {}
    for field_name in names:
        name = dests.get(field_name, field_name)
        kind = str(fields[field_name].type).split(" | ")[0].strip()
        default = (field_default(fields[field_name]) if defaults is None
                   else getattr(defaults, field_name))
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{docs.get(field_name, '')} (default: {shown})".replace("%", "%%")
        flag = f"--{name.replace('_', '-')}"
        if kind == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
            continue
        if kind.startswith("Literal["):  # Literal["a", "b"]: one of those strings
            choices = ast.literal_eval(f"[{kind[len('Literal['):-1]}]")
            parser.add_argument(flag, dest=name, choices=choices, default=None, help=help_text)
            continue
        if kind.startswith("dict["):  # a JSON object
            parser.add_argument(flag, dest=name, type=_json_object, default=None,
                                help=help_text.replace("(default:", "(JSON; default:"))
            continue
        if kind not in _FLAG_TYPES:
            raise TypeError(f"{cls.__name__}.{field_name}: no command-line flag for type {kind}")
        parser.add_argument(flag, dest=name, type=_FLAG_TYPES[kind], default=None,
                            help=help_text)
    return [dests.get(n, n) for n in names]
