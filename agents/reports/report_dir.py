"""The output directory of a combined report (scripts/report.py): never another run's.

A report directory holds ``report_inputs.json``: the ``results.json`` files it was made
from. Writing a report into a directory is allowed when it is empty, new, or a report of
the same inputs (running the same command again); a directory holding a run (its
``config.json``), another report or other files is refused, or moved aside to
``OUT.old-<UTC time>`` with ``overwrite``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from agents.reports.results import write_json
from eva_rl.io import check_writable, read_versioned_json
from eva_rl.runlock import is_empty_dir, replace_dir

INPUTS_FILE = "report_inputs.json"
INPUTS_FORMAT = "eva-rl-report-inputs"
INPUTS_VERSION = 1


def _occupant(out: Path, inputs: list[str]) -> str | None:
    """What in ``out`` a report of ``inputs`` would replace (None: nothing of value)."""
    if not out.is_dir() or is_empty_dir(out):
        return None
    marker = out / INPUTS_FILE
    if marker.is_file():
        saved = read_versioned_json(marker, INPUTS_FORMAT, INPUTS_VERSION, "report inputs")
        if saved.get("inputs") == inputs:
            return None
        return f"another report (of {', '.join(saved.get('inputs', []))})"
    if (out / "config.json").is_file():
        return "a run (its config.json)"
    names = sorted(p.name for p in out.iterdir())
    return f"other files ({', '.join(names[:5])})"


def check_report_dir(out: str | os.PathLike, inputs: Sequence[str],
                     overwrite: bool = False) -> None:
    """Refuse (before any work) an ``out`` that is a file, cannot be written, or holds
    something a report of ``inputs`` would replace (unless ``overwrite``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    check_writable(out)
    occupant = _occupant(out, list(inputs))
    if occupant and not overwrite:
        raise FileExistsError(f"{out} holds {occupant}; a report there would replace it: "
                              "choose another --out, or pass --overwrite to move it aside")


def prepare_report_dir(out: str | os.PathLike, inputs: Sequence[str],
                       overwrite: bool = False) -> Path | None:
    """`check_report_dir`, then make ``out`` this report's (moving an occupant aside with
    ``overwrite``) and record its inputs; returns where an occupant was moved. Call it
    holding ``out``'s `RunLock`."""
    out = Path(out)
    check_report_dir(out, inputs, overwrite)
    moved = None
    if _occupant(out, list(inputs)):
        moved = replace_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / INPUTS_FILE, {"format": INPUTS_FORMAT, "version": INPUTS_VERSION,
                                   "inputs": list(inputs)})
    return moved
