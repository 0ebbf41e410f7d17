"""Per-method summaries of a results dict: success, Continual World's metrics, comparisons.

Two kinds of numbers, each as the field computes it:

- Continual World's metrics of the `sequential` protocol (:mod:`eva_rl.metrics`: average
  performance, forgetting over all T tasks, forward transfer as a ratio of seed means, AUC
  as the mean of the evaluations during training) with 90% percentile bootstrap intervals
  over seeds, as in Continual World's ``results_processing/tables.py``.
- Comparisons between methods as rliable computes them (Agarwal et al., NeurIPS 2021):
  the mean and the interquartile mean (IQM) of the final success over all (task, seed)
  runs and the probability of improvement over ``lora``, with 95% stratified bootstrap
  intervals (runs resampled within each task) from ``rliable`` itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from agents.reports.results import final_success, is_complete, task_auc
from eva_rl import metrics

logger = logging.getLogger(__name__)

REFERENCE_METHOD = "lora"
"""The baseline every method's probability of improvement is measured against."""
COMPARISON_CONFIDENCE = 0.95
BOOTSTRAP_REPS = 2000
"""Resamples per rliable interval. rliable's README uses 2000 for the probability of
improvement (50000 for aggregates); 2000 everywhere keeps a 9-method CW10 report within
about a minute on 2 cores (the P(improvement) bootstrap is the slow one)."""
BOOTSTRAP_SEED = 0
"""Seed of every bootstrap, so a report is reproducible and a method's interval does not
depend on which other methods are in it."""

DEFINITIONS: dict[str, str] = {
    "success": "fraction of evaluation episodes with `info['success']` at any step",
    "average performance": "mean over tasks of the success at the end of the sequence",
    "forgetting": "per task, success after its own training minus success at the end of "
                  "the sequence, averaged over all T tasks (the last task's 0 included), "
                  "as Continual World's tables.py; `forgetting_excluding_last` in "
                  "summary.json divides by T - 1 instead",
    "AUC": "mean of the success evaluations during the task's training (none at step 0), "
           "Continual World's rule",
    "forward transfer": "per task (mean AUC - mean AUC_ref) / (1 - mean AUC_ref), means "
                        "over seeds, AUC_ref from `single` runs of the same method and "
                        "pretrained model, then averaged over tasks (Continual World); a "
                        "task whose mean AUC_ref is 1 leaves no room to improve and the "
                        "ratio is undefined, so it counts the plain difference mean AUC - 1 "
                        "(0 or negative; `eva_rl.metrics.forward_transfer_per_task`); "
                        "`forward_transfer_mean_of_ratios` in summary.json is the mean of "
                        "per-seed ratios instead",
    "IQM": "interquartile mean of the final success over all (task, seed) runs (rliable)",
    "P(improvement)": f"probability that a run of the method beats a run of "
                      f"`{REFERENCE_METHOD}` on a task, averaged over tasks (rliable)",
}

ONE_SEED_NOTE = ("with one seed per task the stratified bootstrap has no run to resample, so "
                 "its interval would have zero width; it is not computed")


# ---------------------------------------------------------------------------- summary


def summarize(results: dict, *, bootstrap_reps: int = BOOTSTRAP_REPS,
              bootstrap_seed: int = BOOTSTRAP_SEED) -> dict:
    """Per protocol and method: success per task and on average over seeds, continual
    metrics, comparisons with other methods.

    Only complete runs count. Returns ``{protocol: {method: {...}}}`` with ``tasks``,
    ``seeds``, ``per_task`` (``{task: stats}``), ``average`` (stats of the per-seed mean),
    ``auc`` (stats of the per-seed mean AUC), ``comparison`` (see :func:`compare`),
    ``trainable_params``, ``finetune_seconds``, ``eva_share`` and, for ``sequential``,
    ``average_performance``, ``forgetting``, ``forward_transfer`` (stats; None without a
    ``single`` reference), ``variants`` (the same under older definitions) and
    ``success_matrix`` (mean over seeds). *stats* are ``{"mean", "stderr", "ci90", "n"}``.
    """
    runs = results["runs"]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in runs:
        if is_complete(run):
            groups[(run["protocol"], run["method"])].append(run)
        else:
            logger.info("skipping unfinished run %s/%s/seed %s", run["protocol"], run["method"],
                        run["seed"])
    summary: dict[str, dict[str, dict]] = defaultdict(dict)
    scores: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for (protocol, method), group in sorted(groups.items()):
        tasks = group[0]["tasks"]
        group = [r for r in group if r["tasks"] == tasks]
        finals = score_matrix(group)
        aucs = np.array([[task_auc(rec) for rec in r["per_task"]] for r in group])
        entry: dict[str, Any] = {
            "tasks": tasks,
            "seeds": [r["seed"] for r in group],
            "per_task": {t: seed_stats(finals[:, j]) for j, t in enumerate(tasks)},
            "average": seed_stats(finals.mean(axis=1)),
            "auc": seed_stats(aucs.mean(axis=1)),
            "trainable_params": float(np.mean([rec["trainable_params"] for r in group
                                               for rec in r["per_task"]])),
            "finetune_seconds": seed_stats([sum(rec["finetune_seconds"] for rec in r["per_task"])
                                            for r in group]),
            "eva_share": float(np.mean([rec["eva_share"] for r in group
                                        for rec in r["per_task"]])),
        }
        if protocol == "sequential":
            entry.update(continual_metrics(group, runs))
        summary[protocol][method] = entry
        scores[protocol][method] = finals
    for protocol, methods in summary.items():
        reference = scores[protocol].get(REFERENCE_METHOD)
        for method, entry in methods.items():
            # P(lora > lora) is 0.5 by construction: not worth its (slow) bootstrap
            against = (method != REFERENCE_METHOD and REFERENCE_METHOD in methods
                       and methods[REFERENCE_METHOD]["tasks"] == entry["tasks"])
            entry["comparison"] = compare(scores[protocol][method],
                                          reference if against else None,
                                          reps=bootstrap_reps, seed=bootstrap_seed)
    return dict(summary)


def score_matrix(group: Sequence[dict]) -> np.ndarray:
    """Final success of runs over the same tasks, shape ``(runs = seeds, tasks)``."""
    return np.array([final_success(r) for r in group], dtype=np.float64)


def seed_stats(values: Sequence[float]) -> dict:
    """Mean, standard error and 90% percentile bootstrap interval over seeds."""
    mean, se = metrics.mean_and_stderr(values)
    low, high = metrics.bootstrap_ci(values, confidence=0.9)
    return {"mean": mean, "stderr": se, "ci90": [low, high], "n": len(values)}


# ---------------------------------------------------------------------------- Continual World


def continual_metrics(group: Sequence[dict], all_runs: Sequence[dict]) -> dict:
    """Continual World's metrics of the sequential runs of one method (same tasks).

    ``all_runs`` is searched for the `single` reference runs of forward transfer.
    """
    run0 = group[0]
    tasks, method = run0["tasks"], run0["method"]
    matrices = [np.asarray(r["success_matrix"], dtype=np.float64) for r in group]
    out: dict[str, Any] = {
        "success_matrix": np.mean(matrices, axis=0).tolist(),
        "average_performance": seed_stats([metrics.average_performance(S) for S in matrices]),
        "forgetting": seed_stats([metrics.forgetting(S) for S in matrices]),
        "forward_transfer": None,
        "variants": {
            "forgetting_excluding_last": seed_stats(
                [metrics.forgetting_excluding_last(S) for S in matrices]),
            "forward_transfer_mean_of_ratios": None,
        },
    }
    pretrained = {r.get("pretrained") for r in group}
    if len(pretrained) != 1:
        logger.warning("%s: sequential runs from different pretrained models; no forward "
                       "transfer", method)
        return out
    ref = reference_aucs(all_runs, method, tasks, pretrained.pop())
    if ref is None:
        return out
    auc = np.array([[task_auc(rec) for rec in r["per_task"]] for r in group])  # (seeds, T)
    ref_matrix = balanced_reference(ref, tasks)
    low, high = metrics.forward_transfer_ci(auc, ref_matrix)
    out["forward_transfer"] = {"mean": metrics.forward_transfer(auc, ref_matrix),
                               "stderr": None, "ci90": [low, high], "n": len(group),
                               "n_reference": len(ref_matrix)}
    paired = np.array([paired_reference(ref, r["seed"], tasks) for r in group])
    ratios = [metrics.forward_transfer_mean_of_ratios(a, p) for a, p in zip(auc, paired,
                                                                              strict=True)]
    out["variants"]["forward_transfer_mean_of_ratios"] = seed_stats(ratios)
    return out


def reference_aucs(runs: Sequence[dict], method: str, tasks: Sequence[str],
                   pretrained: str | None) -> dict[str, dict[int, float]] | None:
    """``{task: {seed: AUC}}`` of the complete `single` runs of ``method`` from the same
    pretrained model; None if some task has no such run."""
    by_task: dict[str, dict[int, float]] = defaultdict(dict)
    for run in runs:
        if (run["protocol"] == "single" and run["method"] == method and is_complete(run)
                and run.get("pretrained") == pretrained):
            for rec in run["per_task"]:
                by_task[rec["task"]][run["seed"]] = task_auc(rec)
    if not all(t in by_task for t in tasks):
        return None
    return {t: by_task[t] for t in tasks}


def balanced_reference(ref: dict[str, dict[int, float]], tasks: Sequence[str]) -> np.ndarray:
    """Reference AUCs as ``(runs, tasks)``: every task cut to the smallest number of runs
    any task has, lowest seeds first, as Continual World's task-balanced baseline data."""
    n = min(len(ref[t]) for t in tasks)
    if any(len(ref[t]) > n for t in tasks):
        logger.warning("reference runs per task cut to %d, the fewest any task has", n)
    return np.array([[ref[t][s] for s in sorted(ref[t])[:n]] for t in tasks]).T


def paired_reference(ref: dict[str, dict[int, float]], seed: int,
                     tasks: Sequence[str]) -> list[float]:
    """Per task the reference AUC of the same seed, else the mean over its seeds."""
    return [ref[t].get(seed, float(np.mean(list(ref[t].values())))) for t in tasks]


# ---------------------------------------------------------------------------- rliable


def compare(scores: np.ndarray, reference: np.ndarray | None, *, reps: int = BOOTSTRAP_REPS,
            seed: int = BOOTSTRAP_SEED, confidence: float = COMPARISON_CONFIDENCE) -> dict:
    """rliable's estimates for one method's ``(seeds, tasks)`` final-success matrix.

    Returns ``{"runs", "tasks", "confidence", "mean", "iqm", "p_improvement", "reference"}``
    where each estimate is ``{"value", "ci"}``; ``ci`` is ``[low, high]``, or None with
    one seed (see :data:`ONE_SEED_NOTE`). ``p_improvement`` is None without ``reference``
    (the ``lora`` matrix over the same tasks; :func:`summarize` gives none to ``lora``).
    """
    from rliable import metrics as rl_metrics  # rliable imports pandas and arch (~1.5 s)

    if reps < 1:
        raise ValueError(f"bootstrap reps must be positive, got {reps}")
    scores = _check_scores(scores, "scores")
    out: dict[str, Any] = {"runs": int(scores.shape[0]), "tasks": int(scores.shape[1]),
                           "confidence": confidence, "reference": REFERENCE_METHOD}
    for name, aggregate in (("mean", rl_metrics.aggregate_mean),
                            ("iqm", rl_metrics.aggregate_iqm)):
        out[name] = interval_estimate(lambda s, f=aggregate: np.array([f(s)]), [scores],
                                      reps=reps, seed=seed, confidence=confidence)
    out["p_improvement"] = None
    if reference is not None:
        reference = _check_scores(reference, "reference scores")
        if reference.shape[1] != scores.shape[1]:
            raise ValueError(f"scores have {scores.shape[1]} tasks, the reference "
                             f"{reference.shape[1]}")
        out["p_improvement"] = interval_estimate(
            lambda x, y: np.array([rl_metrics.probability_of_improvement(x, y)]),
            [scores, reference], reps=reps, seed=seed, confidence=confidence)
    return out


def interval_estimate(func: Callable[..., np.ndarray], arrays: Sequence[np.ndarray], *,
                      reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED,
                      confidence: float = COMPARISON_CONFIDENCE) -> dict:
    """``{"value", "ci"}`` of ``func(*arrays)`` from ``rliable.library.get_interval_estimates``
    (stratified bootstrap; one array: ``StratifiedBootstrap``, two:
    ``StratifiedIndependentBootstrap``). ``ci`` is None when an array has a single run."""
    from rliable import library as rly

    value = float(func(*arrays)[0])
    if min(a.shape[0] for a in arrays) < 2:
        return {"value": value, "ci": None}
    data = arrays[0] if len(arrays) == 1 else list(arrays)
    with _seeded_global_numpy(seed), _quiet_absl():
        _, intervals = rly.get_interval_estimates({"x": data}, func, reps=reps,
                                                  confidence_interval_size=confidence)
    low, high = np.asarray(intervals["x"], dtype=np.float64).ravel()
    return {"value": value, "ci": [float(low), float(high)]}


@contextlib.contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    """rliable 1.2 draws its bootstrap indices from numpy's global RNG (its
    ``random_state`` argument does not reach them), so a fixed seed has to go there; the
    caller's global state is restored afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """rliable logs "Calculating estimates for ..." at INFO through absl on every call."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.WARNING)
    try:
        yield
    finally:
        absl.setLevel(level)


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"{name} must be a non-empty (runs, tasks) matrix, got shape "
                         f"{scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} contain NaN or inf")
    return scores
