"""A tier's tuning stage: every method's own settings chosen on the MT40 tasks held out of
pretraining (never on the tasks reported), with the same number of trials for every method
and one selection rule fixed before any result is seen.

A tier with a tuning grid (`agents.tiers.Tier.tuning`: per method, a list of settings of
one length) runs trial ``t`` as an ordinary `single` experiment over the tuning tasks and
seeds, each method with its ``t``-th settings (`FinetuneConfig.method_settings`), in
``ROOT/tuning/trial_<t>/``: resume, checksums and executors work as for every other run.
`choose` then applies `SELECTION_RULE` mechanically and `write_tuning_report` writes
``ROOT/tuning/choice.json`` (what the `single` and `sequential` stages train with),
``tuning.md`` (every trial of every method) and a plot of success and AUC against the
learning rate per method.

    for t in range(n_trials(tier)):
        exp, run_dir = trial_experiment(tier, tier_paths(root), t)
        run_experiment(exp, run_dir, resume=True)
    write_tuning_report(tier, tier_paths(root))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.protocols import Experiment
from agents.runs import RunResults
from eva_rl.io import read_versioned_json, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from agents.tiers import Tier, TierPaths

TUNING_DIR = "tuning"
CHOICE_FILE = "choice.json"
CHOICE_FORMAT = "eva-rl-tuning-choice"
REPORT_FILE = "tuning.md"
PLOT_FILE = "lr_sensitivity.png"
SELECTION_RULE = ("the highest mean final success over every (tuning task, seed) cell; a "
                  "tie (within 1e-9) goes to the higher mean AUC, then to the earlier trial")


def n_trials(tier: Tier) -> int:
    """Trials per method of ``tier``'s grid (0 without one)."""
    return len(next(iter(tier.tuning.values()))) if tier.tuning else 0


def check_grid(grid: Mapping[str, Sequence[Mapping[str, Any]]], methods: Sequence[str]
               ) -> None:
    """A tuning grid: every method of ``methods`` with the same number (>= 1) of settings,
    each valid for that method (`FinetuneConfig.method_settings`); a ``ValueError``
    naming the method otherwise."""
    from agents.finetune_config import FinetuneConfig

    missing = [m for m in methods if m not in grid]
    extra = [m for m in grid if m not in methods]
    if missing or extra:
        raise ValueError(f"tuning grid: methods without trials: {', '.join(missing) or '-'}; "
                         f"trials of methods the tier does not run: {', '.join(extra) or '-'}")
    counts = {m: len(trials) if isinstance(trials, (list, tuple)) else -1
              for m, trials in grid.items()}
    if len(set(counts.values())) != 1 or min(counts.values()) < 1:
        raise ValueError("tuning grid: every method gets the same number (>= 1) of trials, "
                         f"got {counts}")
    for method, trials in grid.items():
        for settings in trials:
            if not isinstance(settings, Mapping):
                raise ValueError(f"tuning grid: a trial of {method} is not an object of "
                                 f"settings: {settings!r:.80}")
            FinetuneConfig(method_settings={method: dict(settings)})  # names, values


def trial_dir(root: str | Path, index: int) -> Path:
    """Where trial ``index`` of a tier run in ``root`` is run."""
    return Path(root) / TUNING_DIR / f"trial_{index:02d}"


def trial_experiment(tier: Tier, paths: TierPaths, index: int) -> tuple[Experiment, Path]:
    """Trial ``index`` of a tier run (`agents.tiers.tier_paths`): every method over the
    tuning tasks and seeds with its ``index``-th settings, and its run directory."""
    settings = {m: dict(trials[index]) for m, trials in tier.tuning.items()}
    exp = Experiment(pretrained=str(paths.pretrained), data=str(paths.data),
                     tasks=tier.tuning_tasks, methods=tuple(tier.tuning),
                     seeds=tier.tuning_seeds, protocol="single",
                     config=tier.finetune.replace(method_settings=settings,
                                                  **(tier.tuning_eval or {})))
    return exp, trial_dir(paths.root, index)


def tuning_rows(tier: Tier, paths: TierPaths) -> list[dict[str, Any]]:
    """One row per method and trial: its settings, finished cells, mean final success and
    mean AUC over them (None before any finished)."""
    rows = []
    for index in range(n_trials(tier)):
        exp, run_dir = trial_experiment(tier, paths, index)
        runs = RunResults(run_dir, exp).to_dict()["runs"] if run_dir.is_dir() else []
        for method in tier.tuning:
            records = [r for run in runs if run["method"] == method for r in run["per_task"]]
            rows.append({
                "method": method, "trial": index, "settings": dict(tier.tuning[method][index]),
                "cells": len(records),
                "success": _mean([r["success"] for r in records]),
                "auc": _mean([r["auc"] for r in records])})
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def choose(rows: Sequence[Mapping[str, Any]], cells: int) -> dict[str, dict[str, Any]]:
    """Per method, the row `SELECTION_RULE` picks among its trials, each of which must have
    all ``cells`` cells finished."""
    chosen: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["cells"] != cells:
            raise ValueError(f"tuning: trial {row['trial']} of {row['method']} has "
                             f"{row['cells']} of its {cells} cells; run the tune stage to "
                             "the end first")
        best = chosen.get(row["method"])
        if best is None or _better(row, best):
            chosen[row["method"]] = dict(row)
    return chosen


def _better(row: Mapping[str, Any], best: Mapping[str, Any]) -> bool:
    if not math.isclose(row["success"], best["success"], rel_tol=0, abs_tol=1e-9):
        return row["success"] > best["success"]
    if not math.isclose(row["auc"], best["auc"], rel_tol=0, abs_tol=1e-9):
        return row["auc"] > best["auc"]
    return False  # the earlier trial stays


def write_tuning_report(tier: Tier, paths: TierPaths) -> dict[str, dict[str, Any]]:
    """Choose every method's settings and write ``choice.json``, ``tuning.md`` and the
    learning-rate plot into ``ROOT/tuning/``; returns the choice."""
    rows = tuning_rows(tier, paths)
    cells = len(tier.tuning_tasks) * len(tier.tuning_seeds)
    chosen = choose(rows, cells)
    out = paths.root / TUNING_DIR
    write_json_atomic(out / CHOICE_FILE, {
        "format": CHOICE_FORMAT, "version": 1, "rule": SELECTION_RULE,
        "tasks": list(tier.tuning_tasks), "seeds": list(tier.tuning_seeds),
        "chosen": {m: {k: row[k] for k in ("trial", "settings", "success", "auc")}
                   for m, row in chosen.items()}})
    write_text_atomic(out / REPORT_FILE, format_tuning(tier, rows, chosen))
    plot_lr_sensitivity(rows, out / PLOT_FILE)
    return chosen


def format_tuning(tier: Tier, rows: Sequence[Mapping[str, Any]],
                  chosen: Mapping[str, Mapping[str, Any]]) -> str:
    """The tuning table as markdown: every trial of every method, the chosen ones in bold."""
    lines = [f"# Tier {tier.name}: tuning on held-out MT40 tasks", "",
             f"Tasks: {', '.join(tier.tuning_tasks)}; seeds: "
             f"{', '.join(map(str, tier.tuning_seeds))}; every method {n_trials(tier)} "
             "trials.", "", f"Selection rule (fixed before the runs): {SELECTION_RULE}.", "",
             "| method | trial | settings | mean success | mean AUC |", "|---|---|---|---|---|"]
    for row in rows:
        mark = "**" if chosen[row["method"]]["trial"] == row["trial"] else ""
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "(shared)"
        lines.append(f"| {row['method']} | {row['trial']} | {settings} | "
                     f"{mark}{row['success']:.3f}{mark} | {row['auc']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_lr_sensitivity(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Mean success and AUC against the learning rate, one line per method and other
    settings (``lr``, or ``fft_lr`` for full fine-tuning; rows without one are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agents.reports.plots import method_color

    lines: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for row in rows:
        settings = dict(row["settings"])
        lr = settings.pop("lr", settings.pop("fft_lr", None))
        if lr is None:
            continue
        rest = ", ".join(f"{k}={v}" for k, v in settings.items())
        lines.setdefault((row["method"], rest), []).append((lr, row["success"], row["auc"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for (method, rest), points in sorted(lines.items()):
        points.sort()
        label = f"{method} ({rest})" if rest else method
        for ax, k in zip(axes, (1, 2), strict=True):
            ax.plot([p[0] for p in points], [p[k] for p in points], marker="o", label=label,
                    color=method_color(method), alpha=0.9 if not rest else 0.6)
    for ax, name in zip(axes, ("mean final success", "mean AUC"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("Held-out MT40 tasks: sensitivity to the learning rate")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_choice(root: str | Path, tier: Tier) -> dict[str, dict[str, Any]]:
    """Every method's chosen settings from ``ROOT/tuning/choice.json`` (a tier run's or a
    publication's), checked against ``tier``; a ``ValueError`` naming the file if it is
    missing, corrupt, or not this tier's choice."""
    path = Path(root) / TUNING_DIR / CHOICE_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no tuning choice yet; run the tune stage first (add it to "
                         "--stages)")
    obj = read_versioned_json(path, CHOICE_FORMAT, 1, "tuning choice")
    chosen = obj.get("chosen")
    if not isinstance(chosen, dict) or set(chosen) != set(tier.tuning):
        raise ValueError(f"{path}: holds no choice for this tier's methods "
                         f"({', '.join(tier.tuning)})")
    settings = {}
    for method, entry in chosen.items():
        trial = entry.get("trial") if isinstance(entry, dict) else None
        if not (isinstance(trial, int) and 0 <= trial < n_trials(tier)
                and entry.get("settings") == dict(tier.tuning[method][trial])):
            raise ValueError(f"{path}: the choice of {method} is not one of this tier's trials")
        settings[method] = dict(entry["settings"])
    return settings
