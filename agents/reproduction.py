"""One cell of a published tier, read as untrusted input before it is rerun
(`scripts/reproduce.py`), and where the remade datasets and base model differ from the
published ones.

    tier, task, published, saved = read_publication(Path("docs/results/bench"), "lora",
                                                    "push-wall", 0)

Everything is checked before anything is made: a file that is missing, not JSON, of the
wrong shape, a cell record holding a value of the wrong type, not finite or out of range,
two records of the cell, or a run made with other fine-tuning settings than the tier's, is
a ``ValueError`` naming the file. The work directory of a rerun is
`agents.reproduction_work`; the comparison `agents.reproduction_verdict`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.reports import load_results
from agents.reproduction_verdict import COMPARED
from agents.runs import is_finite, is_int
from agents.tiers import (
    FINGERPRINTS_FILE,
    TIER_FILE,
    Tier,
    describe_machine,
    explain_base_difference,
    fingerprints,
    read_fingerprints,
    read_tier_file,
    tuned_config,
)
from envs import resolve_task

RESULTS_FILE = Path("single") / "results.json"
MAX_REWARD = 10.0  # Meta-World's (v2) rewards lie in [0, 10] per step
CURVE_KEYS = {"success_curve": ("steps", "success", "return"), "loss_curve": ("steps", "loss")}


def record_problem(rec: Any, tier: Tier, task: str) -> str | None:
    """What is wrong with a published `single` record of ``task`` (None if nothing): its
    keys, types, finite values and ranges, as `agents.finetune.finetune_task` writes them."""
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    missing = [k for k in ("index", "final_episodes", *COMPARED) if k not in rec]
    if missing:
        return f"missing keys: {', '.join(missing)}"
    n = tier.finetune.eval.final_episode_count
    max_return = MAX_REWARD * tier.finetune.eval.max_episode_steps
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
    checked (`record_problem`); a malformed file, a missing or a duplicated cell is a
    ``ValueError`` naming the file."""
    path = results_dir / RESULTS_FILE
    results = load_results(path)
    found, cells = [], set()
    for i, run in enumerate(results["runs"]):
        if not isinstance(run, dict) or not isinstance(run.get("per_task"), list) \
                or not is_int(run.get("seed")) or not isinstance(run.get("method"), str):
            raise ValueError(f"{path}: runs[{i}] is not a run (method, seed and a per_task "
                             "list)")
        if run.get("protocol") != "single":
            continue
        cells.add((run["method"], run["seed"]))
        if run["method"] != method or run["seed"] != seed:
            continue
        for rec in run["per_task"]:
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: runs[{i}]: a per_task entry is not an object")
            if rec.get("task") == task:
                found.append((run, rec))
    label = f"{method} x {task} x seed {seed}"
    if not found:
        raise ValueError(f"{path}: no finished cell {label} (method/seed pairs there: "
                         f"{', '.join(f'{m}/{s}' for m, s in sorted(cells))})")
    if len(found) > 1:
        raise ValueError(f"{path}: {len(found)} records of {label}: which one is published "
                         "is ambiguous")
    run, rec = found[0]
    problem = record_problem(rec, tier, task)
    if problem is None:
        problem = next((f"{key} {rec[key]!r} is not the cell's ({want!r})" for key, want in
                        (("method", method), ("seed", seed)) if rec.get(key, want) != want),
                       None)
    if problem:
        raise ValueError(f"{path}: record {label}: {problem}")
    config = run.get("config")
    tuned = tuned_config(tier, results_dir, tier.methods)  # a tuned tier: its chosen settings
    changed = tuned.differences(config) if isinstance(config, dict) else ["no config"]
    if changed:
        raise ValueError(f"{path}: the run of {label} was not made with the tier's fine-tuning "
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
            raise ValueError(f"{value} is not a {what} of tier {tier.name}; its {what}s: "
                             f"{', '.join(map(str, options))}")
    published = published_record(results_dir, tier, method, task, seed)
    saved = read_fingerprints(results_dir)
    if saved is not None:
        missing = [t for t in dict.fromkeys(tier.pretrain_tasks + (task,))
                   if t not in saved["data"]]
        if missing:
            raise ValueError(f"{results_dir / FINGERPRINTS_FILE}: no dataset digest of "
                             f"{', '.join(missing)}")
    return tier, task, published, saved


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
