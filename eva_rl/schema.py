"""Checks of plain-data dicts (read back from JSON) against config dataclasses; stdlib only."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def check_known_fields(cls: type, d: Mapping[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming the keys of ``d`` that are not fields of dataclass ``cls``.

    ``what`` starts the message: ``unknown <what> ['x']; valid: [...]``.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {sorted(names)}")
