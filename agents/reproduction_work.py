"""The work directory of a rerun cell (`scripts/reproduce.py --work`): what it was made
for and which cells were started and finished there, so that a directory of another tier
or publication, or a cell changed since it finished, is refused rather than compared.

``WORK/reproduce.json`` (format ``eva-rl-reproduce-work``, version 1), written before any
work::

    {"tier": {...}, "fingerprints": sha256 | null, "made": time,
     "cells": {"<method>/<task>/<seed>/<index>": {"dir": "cell-...", "started": time,
                                                 "finished": time | null,
                                                 "record_sha256": sha256 | null}}}

    identity = work_identity(tier, saved)
    check_work(work, identity)  # before anything is written
    rec = start_work_record(work, identity)
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from agents.reproduction import RESULTS_FILE
from agents.runs import RECORD_FILE, read_record, run_dir_of, task_dir_of
from agents.tiers import FINGERPRINTS_FILE, TIER_FILE, Tier
from eva_rl.io import read_versioned_json, sha256_file, write_json_atomic
from eva_rl.runlock import LOCK_FILE

WORK_FILE = "reproduce.json"
WORK_FORMAT = "eva-rl-reproduce-work"


def check_apart(results_dir: Path, work: Path) -> None:
    """``--work`` must neither be nor lie inside the publication, nor hold it (through
    symlinks too): the rerun must not read what it writes, nor write what it reads."""
    pub, dest = results_dir.resolve(), work.resolve()
    sources = [pub / TIER_FILE, pub / RESULTS_FILE, pub / FINGERPRINTS_FILE]
    inside = [p for p in (pub, *(s.resolve() for s in sources))
              if p == dest or dest in p.parents]
    if dest == pub or pub in dest.parents or inside:
        raise ValueError(f"--work {work} overlaps the publication {results_dir} (resolved: "
                         f"{dest} and {pub}); use a work directory outside it")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def work_identity(tier: Tier, saved: dict[str, Any] | None) -> dict[str, Any]:
    """What a work directory is made for: the tier's settings and the publication's
    fingerprints (their data and pretrained digests; None without fingerprints)."""
    prints = None if saved is None else _digest({"data": saved["data"],
                                                 "pretrained": saved["pretrained"]})
    return {"tier": tier.to_dict(), "fingerprints": prints}


def _dotted_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _dotted_differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} {old!r:.60} -> {new!r:.60}"]


def read_work_record(work: Path) -> dict[str, Any] | None:
    """``WORK/reproduce.json`` (None if the directory has none), checked."""
    path = work / WORK_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        rec = read_versioned_json(path, WORK_FORMAT, 1, "reproduce work record")
    except ValueError as err:
        raise ValueError(f"{err}; reproduce in a fresh --work directory") from None
    cells = rec.get("cells")
    if not isinstance(rec.get("tier"), dict) or not isinstance(cells, dict) or not all(
            isinstance(c, dict) and isinstance(c.get("dir"), str) and "finished" in c
            for c in cells.values()):
        raise ValueError(f"{path}: corrupt reproduce work record (expected tier, "
                         "fingerprints and cells); reproduce in a fresh --work directory")
    return rec


def check_work(work: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The work record of ``work`` if it was made for ``identity``; None for a new or
    empty directory; a `ValueError` naming the record and what differs otherwise."""
    path = work / WORK_FILE
    rec = read_work_record(work) if work.is_dir() else None
    if rec is None:
        held = sorted(p.name for p in work.iterdir() if p.name != LOCK_FILE) \
            if work.is_dir() else []
        if held:
            raise ValueError(f"{work} holds {', '.join(held[:4])}{' ...' if len(held) > 4 else ''}"
                             f" but no {WORK_FILE} saying which tier they were made for; "
                             "reproduce in a fresh --work directory")
        return None
    saved = {"tier": rec["tier"], "fingerprints": rec.get("fingerprints")}
    diffs = _dotted_differences(saved, identity)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ValueError(f"{path}: this work directory was made for another tier or "
                         f"publication ({shown}); its data, model and cells are not this "
                         "one's: reproduce in a fresh --work directory")
    return rec


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def write_work_record(work: Path, rec: dict[str, Any]) -> None:
    """Save the work record (atomically)."""
    write_json_atomic(work / WORK_FILE, {"format": WORK_FORMAT, "version": 1, **rec})


def start_work_record(work: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The work record of ``work`` (`check_work`), or a new one for ``identity``; saved
    before any work (hold ``work``'s `RunLock`)."""
    rec = check_work(work, identity) or {**identity, "made": _now(), "cells": {}}
    write_work_record(work, rec)
    return rec


def cell_key(method: str, task: str, seed: int, index: int) -> str:
    """A cell's name in the work record: ``lora/push-wall-v3/0/3``."""
    return f"{method}/{task}/{seed}/{index}"


def cell_dir(work: Path, method: str, task: str, seed: int) -> Path:
    """Where a cell is rerun inside the work directory."""
    return work / f"cell-{method}-{task}-seed{seed}"


def cell_record_path(run: Path, key: str) -> Path:
    """The task record a cell ``key`` finished in ``run`` leaves."""
    method, task, seed, index = key.split("/")
    return task_dir_of(run_dir_of(run, method, int(seed)), int(index), task) / RECORD_FILE


def claim_cell(work: Path, rec: dict[str, Any], key: str, run: Path) -> str | None:
    """Register the cell ``key`` (directory ``run``) in the work record before it runs;
    returns when it finished if it finished here before (its record unchanged since)."""
    entry = rec["cells"].get(key)
    if entry is not None and not (run.exists() or run.is_symlink()):
        entry = None  # its directory was deleted to run it again
    if entry is None:
        if run.exists() or run.is_symlink():
            raise ValueError(f"{run} exists but {work / WORK_FILE} never started it: it was "
                             "not made here for this tier; reproduce in a fresh --work "
                             "directory")
        rec["cells"][key] = {"dir": run.name, "started": _now(), "finished": None,
                             "record_sha256": None}
        write_work_record(work, rec)
        return None
    if entry["dir"] != run.name:
        raise ValueError(f"{work / WORK_FILE}: cell {key} is recorded in {entry['dir']!r}, not "
                         f"{run.name!r}; reproduce in a fresh --work directory")
    if not entry["finished"]:
        return None  # started here and interrupted: continued from its checkpoint
    record = cell_record_path(run, key)
    if not record.is_file() or sha256_file(record) != entry.get("record_sha256"):
        raise ValueError(f"{record} was changed or removed since this work directory "
                         f"finished it ({entry['finished']}); delete {run} to rerun the cell")
    return str(entry["finished"])


def read_cell_record(run: Path, key: str) -> dict[str, Any]:
    """The task record the cell ``key`` left in ``run`` (checked, `agents.runs.read_record`)
    as a dict; a ``ValueError`` if it finished without one."""
    record_path = cell_record_path(run, key)
    record = read_record(record_path.parent)
    if record is None:
        raise ValueError(f"{record_path}: the cell finished without its record")
    return record.to_dict()


def finish_cell(work: Path, rec: dict[str, Any], key: str, run: Path) -> None:
    """Record in the work record that the cell ``key`` finished, with its record's digest
    (which `claim_cell` checks when the cell is compared again)."""
    digest = sha256_file(cell_record_path(run, key))
    rec["cells"][key].update(finished=_now(), record_sha256=digest)
    write_work_record(work, rec)
