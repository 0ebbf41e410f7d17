"""The results dict: empty, load, merge, per-run helpers, CSV and the JSON/text files.

A *results* dict (what :mod:`agents.protocols` writes and ``scripts/report.py`` merges)::

    {"format": "eva-rl-results", "version": 1,
     "runs": [{"protocol": "single" | "sequential", "method": "lora", "seed": 0,
               "pretrained": "<pretraining run>",  # forward transfer pairs equal ones
               "tasks": [task, ...],               # training order
               "per_task": [record, ...],          # one per finished task, same order
               "success_matrix": [[...]] | None,   # sequential: row i = after task i
               "return_matrix": [[...]] | None,
               "config": {...}}],
     "config": {...}}

A task *record* holds ``task``, ``index``, ``success`` and ``mean_return`` (on that task
right after its own training), ``trainable_params``, ``finetune_seconds``, ``train_seconds``,
``eval_seconds``, ``eva_seconds``, ``eva_share``, ``first_grad_norm``, ``loss_curve``
(``{"steps": [...], "loss": [...]}``), ``success_curve`` (``{"steps", "success"}``),
``auc`` and ``eva_ranks`` (``{layer: rank}`` or None).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl import metrics
from eva_rl.io import read_versioned_json, to_json_safe, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "eva-rl-results"
RESULTS_VERSION = 1

CSV_FIELDS = (
    "protocol", "method", "seed", "index", "task", "success_final", "success",
    "mean_return", "trainable_params", "finetune_seconds", "train_seconds", "eval_seconds",
    "eva_seconds", "eva_share", "first_grad_norm", "auc",
)  # fmt: skip


# ---------------------------------------------------------------------------- files


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary sibling + rename)."""
    return write_text_atomic(path, text)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (NaN and inf written as ``null``)."""
    return write_json_atomic(path, to_json_safe(obj))


def empty_results(config: dict | None = None) -> dict:
    """A results dict with no runs yet."""
    return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "runs": [],
            "config": config or {}}


def load_results(path: str | os.PathLike) -> dict:
    """Read ``results.json`` (a run directory or the file itself), checking its format."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no results.json at {file}")
    results = read_versioned_json(file, RESULTS_FORMAT, RESULTS_VERSION, "results file")
    if not isinstance(results.get("runs"), list):
        raise ValueError(f"{file} has no 'runs' list")
    return results


def merge_results(results: Sequence[dict]) -> dict:
    """Combine several results dicts; a later duplicate (protocol, method, seed) wins."""
    runs: dict[tuple, dict] = {}
    for res in results:
        for run in res["runs"]:
            key = (run["protocol"], run["method"], run["seed"], tuple(run["tasks"]))
            if key in runs:
                logger.warning("duplicate run %s: keeping the later one", key[:3])
            runs[key] = run
    merged = empty_results({"merged_from": [r.get("config", {}) for r in results]})
    merged["runs"] = list(runs.values())
    return merged


# ---------------------------------------------------------------------------- one run


def short_name(task: str) -> str:
    """``hammer-v3`` -> ``hammer`` (for table headers)."""
    return task[:-3] if task.endswith("-v3") else task


def format_accuracy(value: float | None, width: int = 0) -> str:
    """A routing accuracy for tables: ``0.93``, or ``undecided`` where no episode decided
    (`agents.routing.routing_summary` gives None then, not 0)."""
    return f"{value:{width}.2f}" if value is not None else f"{'undecided':>{width}}"


def is_complete(run: dict) -> bool:
    """True if every task of the run has a record."""
    return len(run["per_task"]) == len(run["tasks"])


def final_success(run: dict) -> list[float]:
    """Success per task at the end of the run (last matrix row if there is a matrix)."""
    matrix = run.get("success_matrix")
    if run["protocol"] == "sequential" and matrix and len(matrix) == len(run["tasks"]):
        return [float(v) for v in matrix[-1]]
    return [float(r["success"]) for r in run["per_task"]]


def task_auc(record: dict) -> float:
    """The task's AUC by Continual World's rule (:func:`eva_rl.metrics.success_auc`: the
    mean of the evaluations during its training), recomputed from its ``success_curve``
    so results written under an older AUC rule report the same number."""
    curve = record["success_curve"]
    try:
        return metrics.success_auc(curve["success"], curve["steps"])
    except ValueError as err:
        raise ValueError(f"task {record['task']} (index {record['index']}): {err}") from err


def mean_success_curves(results: dict, protocol: str = "single") -> dict[str, dict]:
    """Per method, the success curve averaged over every task and seed of ``protocol``:
    ``{"steps": [...], "mean": [...], "stderr": [...], "n": records}`` at the updates every
    record was evaluated at (all of them, in one experiment)."""
    records: dict[str, list[dict]] = {}
    for run in results["runs"]:
        if run["protocol"] == protocol:
            records.setdefault(run["method"], []).extend(run["per_task"])
    curves = {}
    for method, recs in records.items():
        if not recs:
            continue
        steps = sorted(set.intersection(*(set(r["success_curve"]["steps"]) for r in recs)))
        table = np.array([[dict(zip(r["success_curve"]["steps"], r["success_curve"]["success"],
                                    strict=True))[s] for s in steps] for r in recs])
        stderr = table.std(0, ddof=1) / np.sqrt(len(recs)) if len(recs) > 1 else None
        curves[method] = {"steps": steps, "mean": table.mean(0).tolist(),
                          "stderr": None if stderr is None else stderr.tolist(), "n": len(recs)}
    return curves


# ---------------------------------------------------------------------------- CSV


def results_to_csv(results: dict) -> str:
    """One row per (protocol, method, seed, task); ``auc`` by Continual World's rule."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for run in results["runs"]:
        finals = final_success(run) if is_complete(run) else [None] * len(run["per_task"])
        for rec, fin in zip(run["per_task"], finals, strict=False):
            row = {k: rec.get(k) for k in CSV_FIELDS}
            row.update(protocol=run["protocol"], method=run["method"], seed=run["seed"],
                       success_final=fin, auc=task_auc(rec))
            writer.writerow(row)
    return buf.getvalue()
