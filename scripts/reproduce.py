r"""Rerun one cell of a published tier from nothing and compare it with the published numbers.

Reads the tier from ``RESULTS/tier.json``, remakes what the cell needs in ``--work``
(the expert datasets of the pretraining tasks and of the cell's task, the pretrained
model; all deterministic), fine-tunes that one method x task x seed of the `single`
experiment, and prints its numbers beside those in ``RESULTS/single/results.json``, with a
graded verdict (below). Datasets and the pretrained model are also compared with
``RESULTS/fingerprints.json``, so a difference can be traced to the stage where it began
(a publication without that file is compared on the cell alone, and the output says so).

Everything read from RESULTS is untrusted input and is checked before anything is made:
a file that is missing, not JSON, of the wrong shape, or whose cell record holds a value
of the wrong type, not finite or out of range (success and AUC in [0, 1], returns in
[0, 10 x the episode length], curves lists of finite numbers, digests 64 hex digits), two
records for the cell, or a run made with other fine-tuning settings than the tier's, is one
``error:`` line naming the file, exit 2.

The work directory records what it was made for in ``WORK/reproduce.json``, written
before any work: the tier's whole settings, the publication's fingerprints, and every
cell started there. A work directory made for another tier (or another publication's
fingerprints), or holding files but no such record, is refused (use a fresh ``--work``);
so is one inside the publication or holding it. Reusing the same work directory for the
same tier continues it: finished stages are not redone, and a cell finished there
earlier is compared again without rerunning it (the output says when it finished; delete
its ``cell-*`` directory to run it again).

Verdict (exit status):
  0  identical: every compared value (success, mean_return, auc, success_curve,
     loss_curve, first_grad_norm, trainable_params) equal, as on the same kind of CPU.
  3  equal within float rounding: every success count (the final success and every point
     of the success curve) and trainable_params identical, and every continuous value
     (mean_return, auc, the curves' returns and losses, first_grad_norm) within a relative
     1e-3 or an absolute 1e-6 of the published one: what another CPU kind can give.
  4  consistent: trainable_params and the evaluation and logging steps identical, and the
     rerun's final success count k' of n episodes (n: the tier's final evaluation
     episodes) not distinguishable from the published k of n by a two-sided Fisher exact
     test at the 5% level (p >= 0.05); the other values may differ.
  1  different: anything else, or a published record that contradicts itself (its AUC,
     final success or return not those of its own success curve).
  2  bad input (an argument, a malformed or inconsistent publication, a work directory
     made for something else).

Example:
    python scripts/reproduce.py --results docs/results/bench --method eva --task hammer --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.protocols import Cell, run_cell
from agents.reports import load_results
from agents.runs import (
    RECORD_FILE,
    experiment_differences,
    is_finite,
    is_int,
    prepare_run_dir,
    read_record,
    run_dir_of,
    task_dir_of,
)
from agents.tiers import (
    FINGERPRINTS_FILE,
    TIER_FILE,
    Tier,
    collect_tier_data,
    describe_machine,
    explain_base_difference,
    fingerprints,
    pretrain_tier,
    read_fingerprints,
    read_tier_file,
    single_experiment,
    tuned_config,
)
from agents.tuning import read_choice
from envs import resolve_task
from eva_rl.io import check_writable, read_versioned_json, sha256_file, write_json_atomic
from eva_rl.metrics import success_auc
from eva_rl.runlock import LOCK_FILE, RunLock

from script_cli import InputError, ScriptParser, script_main

COMPARED = ("success", "mean_return", "auc", "success_curve", "loss_curve", "first_grad_norm",
            "trainable_params")
RESULTS_FILE = Path("single") / "results.json"
WORK_FILE = "reproduce.json"
WORK_FORMAT = "eva-rl-reproduce-work"
MAX_REWARD = 10.0  # Meta-World's (v2) rewards lie in [0, 10] per step

EXIT_IDENTICAL, EXIT_DIFFERENT, EXIT_ROUNDING, EXIT_CONSISTENT = 0, 1, 3, 4
GRADES = {"identical": EXIT_IDENTICAL, "equal within float rounding": EXIT_ROUNDING,
          "consistent": EXIT_CONSISTENT, "different": EXIT_DIFFERENT}
REL_TOL, ABS_TOL, ALPHA = 1e-3, 1e-6, 0.05

# the compared values by what may differ between two honest runs of one cell:
# schedules and sizes never; success counts only by evaluation noise; the rest by rounding
STRUCTURE = ("trainable_params", "success_curve.steps", "loss_curve.steps")
COUNTS = ("success", "success_curve.success")
CONTINUOUS = ("mean_return", "auc", "success_curve.return", "loss_curve.loss",
              "first_grad_norm")
CURVE_KEYS = {"success_curve": ("steps", "success", "return"), "loss_curve": ("steps", "loss")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""  # None under python -OO
    verdicts = doc.find("Verdict (exit status):")
    p = ScriptParser(description=doc.split("\n")[0],
                     epilog=doc[verdicts:doc.find("Example:")] if verdicts >= 0 else None,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="a published tier, e.g. docs/results/bench")
    p.add_argument("--method", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--work", default=None,
                   help="where data, the pretrained model and the cell go (default "
                        f"runs/reproduce-<tier>); it records its tier in {WORK_FILE}")
    p.add_argument("--workers", type=int, default=2, help="collection: tasks in parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# ------------------------------------------------------------------ the publication


def record_problem(rec: Any, tier: Tier, task: str) -> str | None:
    """What is wrong with a published `single` record of ``task`` (None if nothing): its
    keys, types, finite values and ranges, as `agents.finetune.finetune_task` writes them."""
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    missing = [k for k in ("index", "final_episodes", *COMPARED) if k not in rec]
    if missing:
        return f"missing keys: {', '.join(missing)}"
    n = tier.finetune.final_episodes
    max_return = MAX_REWARD * tier.finetune.max_episode_steps
    index = tier.tasks.index(task)
    if rec["index"] != index or not is_int(rec["index"]):
        return f"index {rec['index']!r} is not {task}'s place in the tier ({index})"
    if rec["final_episodes"] != n or not is_int(rec["final_episodes"]):
        return f"final_episodes {rec['final_episodes']!r} is not the tier's {n}"
    for key, low, high in (("success", 0.0, 1.0), ("auc", 0.0, 1.0),
                           ("mean_return", 0.0, max_return)):
        if not is_finite(rec[key]) or not low <= rec[key] <= high:
            return f"{key} {rec[key]!r} is not a finite number in [{low:g}, {high:g}]"
    if abs(rec["success"] * n - round(rec["success"] * n)) > 1e-6:
        return f"success {rec['success']!r} is not a count of {n} episodes"
    if not is_int(rec["trainable_params"]) or rec["trainable_params"] < 0:
        return f"trainable_params {rec['trainable_params']!r} is not a count"
    grad = rec["first_grad_norm"]
    if grad is not None and not (is_finite(grad) and grad >= 0):
        return f"first_grad_norm {grad!r} is not a finite number >= 0 (or null)"
    for name, keys in CURVE_KEYS.items():
        problem = _curve_problem(rec[name], keys, max_return)
        if problem:
            return f"{name}: {problem}"
    if not rec["success_curve"]["steps"]:
        return "success_curve: no evaluation"
    return None


def _curve_problem(curve: Any, keys: tuple[str, ...], max_return: float) -> str | None:
    if not isinstance(curve, dict) or set(curve) != set(keys):
        return f"expected an object with exactly {', '.join(keys)}, got {curve!r:.120}"
    lengths = {len(v) if isinstance(v, list) else -1 for v in curve.values()}
    if len(lengths) != 1 or -1 in lengths:
        return f"{', '.join(keys)} must be lists of one length"
    steps = curve["steps"]
    if not all(is_int(s) and s >= 0 for s in steps) or any(
            b <= a for a, b in zip(steps, steps[1:], strict=False)):
        return f"steps {steps!r:.120} are not increasing whole numbers >= 0"
    ranges = {"success": (0.0, 1.0), "return": (0.0, max_return), "loss": (-math.inf, math.inf)}
    for key in keys[1:]:
        low, high = ranges[key]
        bad = [v for v in curve[key] if not (is_finite(v) and low <= v <= high)]
        if bad:
            return f"{key} holds {bad[0]!r}, not a finite number in [{low:g}, {high:g}]"
    return None


def published_record(results_dir: Path, tier: Tier, method: str, task: str,
                     seed: int) -> dict[str, Any]:
    """The record of ``method`` x ``task`` x ``seed`` in the published `single` results,
    checked (`record_problem`); a malformed file, a missing or a duplicated cell is an
    `InputError` naming the file."""
    path = results_dir / RESULTS_FILE
    results = load_results(path)
    found, cells = [], set()
    for i, run in enumerate(results["runs"]):
        if not isinstance(run, dict) or not isinstance(run.get("per_task"), list) \
                or not is_int(run.get("seed")) or not isinstance(run.get("method"), str):
            raise InputError(f"{path}: runs[{i}] is not a run (method, seed and a per_task "
                             "list)")
        if run.get("protocol") != "single":
            continue
        cells.add((run["method"], run["seed"]))
        if run["method"] != method or run["seed"] != seed:
            continue
        for rec in run["per_task"]:
            if not isinstance(rec, dict):
                raise InputError(f"{path}: runs[{i}]: a per_task entry is not an object")
            if rec.get("task") == task:
                found.append((run, rec))
    label = f"{method} x {task} x seed {seed}"
    if not found:
        raise InputError(f"{path}: no finished cell {label} (method/seed pairs there: "
                         f"{', '.join(f'{m}/{s}' for m, s in sorted(cells))})")
    if len(found) > 1:
        raise InputError(f"{path}: {len(found)} records of {label}: which one is published "
                         "is ambiguous")
    run, rec = found[0]
    problem = record_problem(rec, tier, task)
    if problem is None:
        problem = next((f"{key} {rec[key]!r} is not the cell's ({want!r})" for key, want in
                        (("method", method), ("seed", seed)) if rec.get(key, want) != want),
                       None)
    if problem:
        raise InputError(f"{path}: record {label}: {problem}")
    config = run.get("config")
    tuned = tuned_config(tier, results_dir, tier.methods)  # a tuned tier: its chosen settings
    changed = experiment_differences(config, tuned.to_dict()) \
        if isinstance(config, dict) else ["no config"]
    if changed:
        raise InputError(f"{path}: the run of {label} was not made with the tier's fine-tuning "
                         f"settings ({'; '.join(changed[:6])})")
    return rec


def read_publication(results_dir: Path, method: str, task_name: str, seed: int
                     ) -> tuple[Tier, str, dict[str, Any], dict[str, Any] | None]:
    """The tier, the resolved task, its published record and the fingerprints (None where
    the publication has none), all checked before anything is made."""
    tier = read_tier_file(results_dir / TIER_FILE)
    task = resolve_task(task_name)
    for value, options, what in ((task, tier.tasks, "task"), (method, tier.methods, "method"),
                                 (seed, tier.seeds, "seed")):
        if value not in options:
            raise InputError(f"{value} is not a {what} of tier {tier.name}; its {what}s: "
                             f"{', '.join(map(str, options))}")
    published = published_record(results_dir, tier, method, task, seed)
    saved = read_fingerprints(results_dir)
    if saved is not None:
        missing = [t for t in dict.fromkeys(tier.pretrain_tasks + (task,))
                   if t not in saved["data"]]
        if missing:
            raise InputError(f"{results_dir / FINGERPRINTS_FILE}: no dataset digest of "
                             f"{', '.join(missing)}")
    return tier, task, published, saved


# ------------------------------------------------------------------ the work directory


def check_apart(results_dir: Path, work: Path) -> None:
    """``--work`` must neither be nor lie inside the publication, nor hold it (through
    symlinks too): the rerun must not read what it writes, nor write what it reads."""
    pub, dest = results_dir.resolve(), work.resolve()
    sources = [pub / TIER_FILE, pub / RESULTS_FILE, pub / FINGERPRINTS_FILE]
    inside = [p for p in (pub, *(s.resolve() for s in sources))
              if p == dest or dest in p.parents]
    if dest == pub or pub in dest.parents or inside:
        raise InputError(f"--work {work} overlaps the publication {results_dir} (resolved: "
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
    record = _task_dir(run, key) / RECORD_FILE
    if not record.is_file() or sha256_file(record) != entry.get("record_sha256"):
        raise ValueError(f"{record} was changed or removed since this work directory "
                         f"finished it ({entry['finished']}); delete {run} to rerun the cell")
    return str(entry["finished"])


def _task_dir(run: Path, key: str) -> Path:
    method, task, seed, index = key.split("/")
    return task_dir_of(run_dir_of(run, method, int(seed)), int(index), task)


# ------------------------------------------------------------------ the comparison


def fisher_exact(k1: int, k2: int, n: int) -> float:
    """Two-sided p-value of Fisher's exact test that ``k1`` of ``n`` and ``k2`` of ``n``
    successes come from one success rate (tables as or less likely than the observed
    one, exact integer arithmetic)."""
    total = k1 + k2
    weight = [math.comb(n, x) * math.comb(n, total - x)
              for x in range(max(0, total - n), min(n, total) + 1)]
    observed = math.comb(n, k1) * math.comb(n, total - k1)
    return sum(w for w in weight if w <= observed) / math.comb(2 * n, total)


def _values(rec: dict[str, Any], key: str) -> list[Any] | None:
    value: Any = rec
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return None
    return list(value) if isinstance(value, list) else [value]


def deviation(published: dict[str, Any], rerun: dict[str, Any], key: str
              ) -> tuple[float, float] | None:
    """The largest absolute and relative difference of ``key`` (dotted for a curve's
    list) between the records; None where they do not line up (a missing value, another
    length, a value that is not a number)."""
    a, b = _values(published, key), _values(rerun, key)
    if a is None or b is None:
        return (0.0, 0.0) if a == b else None
    if len(a) != len(b) or not all(is_finite(v) for v in a + b):
        return None
    absolute = max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
    relative = max((abs(x - y) / max(abs(x), abs(y)) for x, y in zip(a, b, strict=True)
                    if x != y), default=0.0)
    return absolute, relative


def _within(published: dict[str, Any], rerun: dict[str, Any], key: str, rel_tol: float,
            abs_tol: float) -> bool:
    a, b = _values(published, key), _values(rerun, key)
    if a is None or b is None or deviation(published, rerun, key) is None:
        return a == b
    return all(abs(x - y) <= max(rel_tol * max(abs(x), abs(y)), abs_tol)
               for x, y in zip(a, b, strict=True))


def self_contradictions(rec: dict[str, Any], who: str) -> list[str]:
    """Where a record disagrees with its own success curve (its AUC by Continual World's
    rule, its final success and return are the curve's last point): no run writes that."""
    curve = rec.get("success_curve")
    try:
        steps, success, returns = curve["steps"], curve["success"], curve["return"]
        auc = success_auc(success, steps) if len(steps) > 1 else float(success[0])
    except (KeyError, TypeError, ValueError, IndexError):
        return [f"{who} success_curve is not a curve"]
    out = []
    if not is_finite(rec.get("auc")) or abs(rec["auc"] - auc) > 1e-9:
        out.append(f"{who} auc {rec.get('auc')!r} is not its success curve's ({auc!r})")
    if rec.get("success") != success[-1]:
        out.append(f"{who} success {rec.get('success')!r} is not its success curve's last "
                   f"point ({success[-1]!r})")
    if rec.get("mean_return") != returns[-1]:
        out.append(f"{who} mean_return {rec.get('mean_return')!r} is not its success "
                   f"curve's last return ({returns[-1]!r})")
    return out


@dataclass(frozen=True)
class Verdict:
    """How a rerun compares with the published record: a grade of `GRADES`, why, and
    the largest deviation of every compared value."""

    grade: str
    reasons: tuple[str, ...]
    deviations: dict[str, tuple[float, float] | None]

    @property
    def exit_code(self) -> int:
        return GRADES[self.grade]

    def deviation_line(self) -> str:
        """``key abs A rel R`` for every compared value."""
        parts = []
        for key, dev in self.deviations.items():
            if dev is None:
                parts.append(f"{key} (does not line up)")
            elif dev == (0.0, 0.0):
                parts.append(f"{key} 0")
            else:
                parts.append(f"{key} abs {dev[0]:.3g} rel {dev[1]:.3g}")
        return "; ".join(parts)


def grade(published: dict[str, Any], rerun: dict[str, Any], episodes: int,
          rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL, alpha: float = ALPHA) -> Verdict:
    """The verdict of ``rerun`` against ``published`` (task records), ``episodes`` being
    the final evaluation's: identical; equal within float rounding (every success count
    and the structure identical, continuous values within ``rel_tol`` or ``abs_tol``);
    consistent (the structure identical and the final success counts not told apart by a
    two-sided Fisher exact test at level ``alpha``); else different. See the module
    docstring for the exit codes."""
    devs = {key: deviation(published, rerun, key) for key in STRUCTURE + COUNTS + CONTINUOUS}
    if all(json.dumps(published.get(k), sort_keys=True) == json.dumps(rerun.get(k),
                                                                      sort_keys=True)
           for k in COMPARED):
        return Verdict("identical", (f"equal: {', '.join(COMPARED)}",), devs)
    broken = self_contradictions(published, "published") + self_contradictions(rerun, "rerun")
    broken += [f"{key} differs ({_show(published, key)} vs {_show(rerun, key)})"
               for key in STRUCTURE if _values(published, key) != _values(rerun, key)]
    broken += [f"{key} does not line up" for key in COUNTS + CONTINUOUS if devs[key] is None]
    if broken:
        return Verdict("different", tuple(broken), devs)
    counts_equal = all(_values(published, k) == _values(rerun, k) for k in COUNTS)
    outside = [f"{key} (abs {devs[key][0]:.3g}, rel {devs[key][1]:.3g})"
               for key in CONTINUOUS if not _within(published, rerun, key, rel_tol, abs_tol)]
    if counts_equal and not outside:
        return Verdict("equal within float rounding", (
            "every success count and trainable_params identical; every continuous value "
            f"within rel {rel_tol:g} or abs {abs_tol:g}",), devs)
    why = (["success counts differ"] if not counts_equal else []) + \
        [f"beyond rel {rel_tol:g} / abs {abs_tol:g}: {', '.join(outside)}"] * bool(outside)
    k1, k2 = (round(r["success"] * episodes) for r in (published, rerun))
    if any(abs(r["success"] * episodes - k) > 1e-6 for r, k in ((published, k1), (rerun, k2))):
        return Verdict("different", (*why, f"a success is not a count of {episodes} episodes"),
                       devs)
    p = fisher_exact(k1, k2, episodes)
    test = (f"final success {k1}/{episodes} published vs {k2}/{episodes} rerun: two-sided "
            f"Fisher exact p = {p:.3g}")
    if p >= alpha:
        return Verdict("consistent", (*why, f"{test} >= {alpha:g} (within evaluation noise)"),
                       devs)
    return Verdict("different", (*why, f"{test} < {alpha:g} (beyond evaluation noise)"), devs)


def _show(rec: dict[str, Any], key: str) -> str:
    value = _values(rec, key)
    return f"{value!r:.80}"


def differences(published: dict[str, Any], rerun: dict[str, Any]) -> list[str]:
    """The compared fields that differ, each with both values."""
    out = []
    for key in COMPARED:
        if json.dumps(published.get(key), sort_keys=True) != json.dumps(rerun.get(key),
                                                                        sort_keys=True):
            out.append(f"{key}: published {published.get(key)!r:.300} vs rerun "
                       f"{rerun.get(key)!r:.300}")
    return out


def fingerprint_notes(results_dir: Path, saved: dict[str, Any] | None, work: Path,
                      tasks: Sequence[str]) -> list[str]:
    """Where the remade datasets / pretrained model differ from the published fingerprints
    (``saved``, as `read_fingerprints` returned them) and why they may."""
    if saved is None:
        return [f"{results_dir / FINGERPRINTS_FILE} is missing: datasets and pretrained model "
                "not compared (the verdict rests on the cell alone)"]
    now = fingerprints(work, tasks)
    notes = [f"dataset {t}: differs from the published one" for t in tasks
             if saved["data"].get(t) != now["data"].get(t)]
    if saved["pretrained"] != now["pretrained"]:
        notes.append("pretrained model: its weights differ from the published run's (made on "
                     f"{describe_machine(saved.get('machine'))}; this one on "
                     f"{describe_machine(now['machine'])}: "
                     f"{explain_base_difference(saved.get('machine'), now['machine'])}; "
                     "so the cell's numbers may differ too)")
    return notes


def report(published: dict[str, Any], rerun: dict[str, Any], verdict: Verdict) -> None:
    """Print the numbers side by side and the verdict with its reasons."""
    print(f"{'':>14} {'published':>10} {'rerun':>10}")
    for key in ("success", "auc", "mean_return"):
        print(f"{key:>14} {published[key]:>10.4f} {rerun[key]:>10.4f}")
    if verdict.grade == "identical":
        print(f"identical ({', '.join(COMPARED)})")
    elif verdict.grade == "different":
        print(f"DIFFERENT (exit {verdict.exit_code}): {'; '.join(verdict.reasons)}\n  "
              + "\n  ".join(differences(published, rerun)))
    else:
        print(f"{verdict.grade} (exit {verdict.exit_code}): {'; '.join(verdict.reasons)}")
    print(f"largest deviation per key: {verdict.deviation_line()}")


# ------------------------------------------------------------------ main


@script_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results_dir = Path(args.results)
    tier, task, published, saved = read_publication(results_dir, args.method, args.task,
                                                    args.seed)
    # a tuned tier's cells train with the settings its tuning stage chose (published)
    chosen = read_choice(results_dir, tier) if tier.tuning is not None else None
    if args.work is None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tier.name):
        raise InputError(f"tier name {tier.name!r} cannot name a directory; pass --work")
    work = Path(args.work or f"runs/reproduce-{tier.name}")
    check_apart(results_dir, work)
    identity = work_identity(tier, saved)
    check_work(work, identity)  # before anything is written
    check_writable(work)
    progress = not args.no_progress
    t0 = time.perf_counter()
    with RunLock(work):
        rec = check_work(work, identity) or {**identity, "made": _now(), "cells": {}}
        write_work_record(work, rec)
        needed = list(dict.fromkeys(tier.pretrain_tasks + (task,)))
        collect_tier_data(tier, work, needed, workers=args.workers, progress=progress)
        pretrain_tier(tier, work, progress)

        exp = single_experiment(tier, work, chosen)
        exp.config = exp.config.replace(progress=progress)
        index = tier.tasks.index(task)
        run = work / f"cell-{args.method}-{task}-seed{args.seed}"
        key = f"{args.method}/{task}/{args.seed}/{index}"
        reused = claim_cell(work, rec, key, run)
        if reused is None:
            prepare_run_dir(run, exp, resume=True)
            run_cell(exp, run, Cell(args.method, args.seed, index))
        record_path = _task_dir(run, key) / RECORD_FILE
        record = read_record(record_path.parent)
        if record is None:
            raise ValueError(f"{record_path}: the cell finished without its record")
        rerun = record if isinstance(record, dict) else record.to_dict()
        if reused is None:
            rec["cells"][key].update(finished=_now(), record_sha256=sha256_file(record_path))
            write_work_record(work, rec)
        notes = fingerprint_notes(results_dir, saved, work, needed)

    print(f"{tier.name}: {args.method} x {task} x seed {args.seed} "
          f"({time.perf_counter() - t0:.0f} s, data and pretraining included)")
    if reused is not None:
        print(f"reused the cell finished at {reused} in {run} (this work directory, this "
              "tier); delete that directory to run it again")
    verdict = grade(published, rerun, tier.finetune.final_episodes)
    report(published, rerun, verdict)
    for note in notes:
        print(f"note: {note}")
    return verdict.exit_code


if __name__ == "__main__":
    sys.exit(main())
