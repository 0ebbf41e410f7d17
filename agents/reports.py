"""Fine-tuning results: ``results.json``, CSV, ``report.md``, PNG plots, tensorboard.

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
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from eva_rl import metrics
from eva_rl.io import (
    atomic_dir,
    atomic_write,
    read_versioned_json,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "eva-rl-results"
RESULTS_VERSION = 1

# Table 23 of the EVA paper (best rank per method): mean success over CW10, `single` protocol.
PAPER_AVG_SUCCESS: dict[str, float] = {
    "fft": 0.92,
    "lora": 0.86,
    "pissa": 0.85,
    "olora": 0.88,
    "eva": 0.90,
    "dora": 0.93,
    "eva_dora": 0.94,
}

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
    return write_json_atomic(path, _json_safe(obj))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


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


# ---------------------------------------------------------------------------- summary


def short_name(task: str) -> str:
    """``hammer-v3`` -> ``hammer`` (for table headers)."""
    return task[:-3] if task.endswith("-v3") else task


def final_success(run: dict) -> list[float]:
    """Success per task at the end of the run (last matrix row if there is a matrix)."""
    matrix = run.get("success_matrix")
    if run["protocol"] == "sequential" and matrix and len(matrix) == len(run["tasks"]):
        return [float(v) for v in matrix[-1]]
    return [float(r["success"]) for r in run["per_task"]]


def is_complete(run: dict) -> bool:
    """True if every task of the run has a record."""
    return len(run["per_task"]) == len(run["tasks"])


def _stats(values: Sequence[float]) -> dict:
    mean, se = metrics.mean_and_stderr(values)
    low, high = metrics.bootstrap_ci(values, confidence=0.9)
    return {"mean": mean, "stderr": se, "ci90": [low, high], "n": len(values)}


def _reference_auc(runs: Sequence[dict], method: str, seed: int, tasks: Sequence[str],
                   pretrained: str | None = None):
    """Per-task AUC of `single` runs of ``method`` from the same pretrained model: same
    seed if present, else the mean over seeds; None if some task has no such run."""
    singles = [r for r in runs if r["protocol"] == "single" and r["method"] == method
               and is_complete(r) and r.get("pretrained") == pretrained]
    by_task: dict[str, list[float]] = defaultdict(list)
    same_seed: dict[str, float] = {}
    for run in singles:
        for rec in run["per_task"]:
            by_task[rec["task"]].append(rec["auc"])
            if run["seed"] == seed:
                same_seed[rec["task"]] = rec["auc"]
    if not all(t in by_task for t in tasks):
        return None
    return [same_seed.get(t, float(np.mean(by_task[t]))) for t in tasks]


def summarize(results: dict) -> dict:
    """Per protocol and method: success per task and on average over seeds, continual metrics.

    Only complete runs count. Returns ``{protocol: {method: {...}}}`` with ``tasks``,
    ``seeds``, ``per_task`` (``{task: stats}``), ``average`` (stats of the per-seed mean),
    ``trainable_params``, ``finetune_seconds``, ``eva_share`` and, for ``sequential``,
    ``average_performance``, ``forgetting``, ``forward_transfer`` (stats; None without a
    ``single`` reference) and ``success_matrix`` (mean over seeds).
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
    for (protocol, method), group in sorted(groups.items()):
        tasks = group[0]["tasks"]
        group = [r for r in group if r["tasks"] == tasks]
        finals = np.array([final_success(r) for r in group])  # (seeds, tasks)
        entry: dict[str, Any] = {
            "tasks": tasks,
            "seeds": [r["seed"] for r in group],
            "per_task": {t: _stats(finals[:, j]) for j, t in enumerate(tasks)},
            "average": _stats(finals.mean(axis=1)),
            "trainable_params": float(np.mean([rec["trainable_params"] for r in group
                                               for rec in r["per_task"]])),
            "finetune_seconds": _stats([sum(rec["finetune_seconds"] for rec in r["per_task"])
                                        for r in group]),
            "eva_share": float(np.mean([rec["eva_share"] for r in group
                                        for rec in r["per_task"]])),
        }
        if protocol == "sequential":
            matrices = [np.asarray(r["success_matrix"], dtype=np.float64) for r in group]
            entry["success_matrix"] = np.mean(matrices, axis=0).tolist()
            entry["average_performance"] = _stats([metrics.average_performance(S)
                                                   for S in matrices])
            entry["forgetting"] = _stats([metrics.forgetting(S) for S in matrices])
            fts = []
            for run in group:
                ref = _reference_auc(runs, method, run["seed"], tasks, run.get("pretrained"))
                if ref is not None:
                    auc = [rec["auc"] for rec in run["per_task"]]
                    fts.append(metrics.forward_transfer(auc, ref))
            entry["forward_transfer"] = _stats(fts) if fts else None
        summary[protocol][method] = entry
    return dict(summary)


# ---------------------------------------------------------------------------- CSV / markdown


def results_to_csv(results: dict) -> str:
    """One row per (protocol, method, seed, task)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for run in results["runs"]:
        finals = final_success(run) if is_complete(run) else [None] * len(run["per_task"])
        for rec, fin in zip(run["per_task"], finals, strict=False):
            row = {k: rec.get(k) for k in CSV_FIELDS}
            row.update(protocol=run["protocol"], method=run["method"], seed=run["seed"],
                       success_final=fin)
            writer.writerow(row)
    return buf.getvalue()


def _fmt(stats: dict | None, digits: int = 2) -> str:
    if stats is None:
        return "–"
    mean, se = stats["mean"], stats["stderr"]
    if se is None or not math.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _fmt_ci(stats: dict | None) -> str:
    if stats is None:
        return "–"
    low, high = stats["ci90"]
    return f"{stats['mean']:.2f} [{low:.2f}, {high:.2f}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(results: dict, summary: dict, plots: Sequence[str] = ()) -> str:
    """The report: Table-23 layout per protocol, continual metrics, success matrices, costs."""
    out = ["# eva-rl fine-tuning report", ""]
    n_runs = len(results["runs"])
    n_done = sum(is_complete(r) for r in results["runs"])
    out += [f"{n_done} of {n_runs} runs complete (method × seed × protocol). "
            "Success = fraction of evaluation episodes with `info['success']` at any step; "
            "cells are mean ± standard error over seeds.", ""]
    for protocol, methods in summary.items():
        tasks = next(iter(methods.values()))["tasks"]
        title = ("after its own fine-tuning, each task from the pretrained model"
                 if protocol == "single" else "at the end of the sequence")
        out += [f"## Success per task — `{protocol}` protocol ({title})", ""]
        header = ["method", *(short_name(t) for t in tasks), "avg", "paper avg", "seeds"]
        rows = []
        for method, e in methods.items():
            paper = PAPER_AVG_SUCCESS.get(method)
            rows.append([method, *(_fmt(e["per_task"][t]) for t in tasks), _fmt(e["average"]),
                         f"{paper:.2f}" if paper is not None and protocol == "single" else "–",
                         str(len(e["seeds"]))])
        out += _table(header, rows) + [""]
        if protocol == "single":
            out += ["`paper avg`: the EVA paper's Table 23 (best rank per method, 100k updates "
                    "per task on ~2M transitions with a 12M-parameter DT); not comparable in "
                    "scale to a CPU run.", ""]
        if protocol == "sequential":
            out += ["## Continual metrics — `sequential` (mean [90% bootstrap CI] over seeds)",
                    ""]
            rows = [[m, _fmt_ci(e["average_performance"]), _fmt_ci(e["forgetting"]),
                     _fmt_ci(e["forward_transfer"])] for m, e in methods.items()]
            out += _table(["method", "average performance", "forgetting", "forward transfer"],
                          rows)
            out += ["", "Forward transfer needs `single` runs of the same method from the same "
                    "pretrained model in the same report (`scripts/report.py SEQ_RUN "
                    "SINGLE_RUN`); `–` where there are none.", ""]
            for method, e in methods.items():
                out += [f"### Success matrix — {method} (row: after training task i; "
                        "column: success on task j)", ""]
                rows = [[f"{i}: {short_name(tasks[i])}", *(f"{v:.2f}" for v in row)]
                        for i, row in enumerate(e["success_matrix"])]
                out += _table(["after \\ on", *(short_name(t) for t in tasks)], rows) + [""]
        out += [f"## Cost per method — `{protocol}`", ""]
        rows = [[m, f"{e['trainable_params']:,.0f}", _fmt(e["finetune_seconds"], 1),
                 f"{100 * e['eva_share']:.1f}%"] for m, e in methods.items()]
        out += _table(["method", "trainable params / task", "fine-tuning seconds (all tasks)",
                       "EVA init share"], rows) + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots


def _heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str,
             vmax: float | None = 1.0, fmt: str = ".2f", cmap: str = "viridis") -> Figure:
    fig = Figure(figsize=(max(5.0, 2.0 + 0.7 * len(cols)), max(2.5, 1.2 + 0.4 * len(rows))),
                 layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(matrix, vmin=0.0, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    top = vmax if vmax is not None else (matrix.max() or 1.0)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                color="white" if v < 0.6 * top else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def figure_success_matrix(entry: dict, method: str) -> Figure:
    """Heatmap of the (seed-mean) success matrix of a sequential run."""
    tasks = [short_name(t) for t in entry["tasks"]]
    fig = _heatmap(np.asarray(entry["success_matrix"]), [f"after {t}" for t in tasks], tasks,
                   f"{method}: success on each task (column)\nafter training task i (row)")
    return fig


def figure_success_over_sequence(entry: dict, method: str) -> Figure:
    """One line per task: its success after each training stage of the sequence."""
    S = np.asarray(entry["success_matrix"])
    tasks = [short_name(t) for t in entry["tasks"]]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for j, task in enumerate(tasks):
        ax.plot(range(S.shape[0]), S[:, j], marker="o", label=task)
    ax.axhline(metrics.average_performance(S), color="black", linestyle="--", linewidth=1,
               label="final average")
    ax.set_xticks(range(S.shape[0]), [f"{i}:{t}" for i, t in enumerate(tasks)], rotation=45,
                  ha="right", fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("after training task")
    ax.set_ylabel("success rate")
    ax.set_title(f"{method}: success per task across the sequence", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return fig


def figure_success_per_task(methods: dict, protocol: str) -> Figure:
    """Grouped bars: final success per task for every method (mean ± s.e. over seeds)."""
    tasks = next(iter(methods.values()))["tasks"]
    fig = Figure(figsize=(max(6, 0.9 * len(tasks) + 2), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    for k, (method, e) in enumerate(methods.items()):
        means = [e["per_task"][t]["mean"] for t in tasks]
        errs = [np.nan_to_num(e["per_task"][t]["stderr"] or 0.0) for t in tasks]
        x = np.arange(len(tasks)) + (k - (len(methods) - 1) / 2) * width
        ax.bar(x, means, width, yerr=errs, label=f"{method} ({e['average']['mean']:.2f})")
    ax.set_xticks(range(len(tasks)), [short_name(t) for t in tasks], rotation=45, ha="right",
                  fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title(f"success per task — {protocol} protocol", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def eva_rank_table(run: dict) -> tuple[list[str], list[str], np.ndarray] | None:
    """(layers, tasks, ranks (layers, tasks)) of the EVA allocations in a run, or None."""
    recs = [r for r in run["per_task"] if r.get("eva_ranks")]
    if not recs:
        return None
    layers = list(dict.fromkeys(layer for r in recs for layer in r["eva_ranks"]))  # model order
    ranks = np.array([[r["eva_ranks"].get(layer, 0) for r in recs] for layer in layers],
                     dtype=np.float64)
    return layers, [short_name(r["task"]) for r in recs], ranks


def figure_eva_ranks(run: dict) -> Figure | None:
    """Heatmap of EVA's rank per adapted layer (rows) for each task (columns)."""
    table = eva_rank_table(run)
    if table is None:
        return None
    layers, tasks, ranks = table
    fig = _heatmap(ranks, layers, tasks, f"{run['method']} (seed {run['seed']}, "
                   f"{run['protocol']}):\nEVA rank per layer and task", vmax=None, fmt=".0f",
                   cmap="magma")
    return fig


def build_figures(results: dict, summary: dict) -> dict[str, Figure]:
    """Every plot of the report, keyed by file stem."""
    figures: dict[str, Figure] = {}
    for protocol, methods in summary.items():
        figures[f"success_per_task_{protocol}"] = figure_success_per_task(methods, protocol)
        if protocol == "sequential":
            for method, entry in methods.items():
                figures[f"success_matrix_{method}"] = figure_success_matrix(entry, method)
                figures[f"success_over_sequence_{method}"] = figure_success_over_sequence(
                    entry, method)
    seen = set()
    for run in results["runs"]:
        key = (run["protocol"], run["method"])
        if key in seen:
            continue
        fig = figure_eva_ranks(run)
        if fig is not None:
            seen.add(key)
            figures[f"eva_ranks_{run['protocol']}_{run['method']}"] = fig
    return figures


def save_figures(figures: dict[str, Figure], plot_dir: str | os.PathLike) -> list[Path]:
    """PNG files (atomic: rendered to a temporary name, renamed into place)."""
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in figures.items():
        path = plot_dir / f"{stem}.png"
        paths.append(atomic_write(path, lambda tmp, f=fig: f.savefig(tmp, dpi=110, format="png")))
    return paths


# ---------------------------------------------------------------------------- tensorboard


def _run_tag(run: dict) -> str:
    return f"{run['protocol']}_{run['method']}_seed{run['seed']}"


def write_tensorboard(results: dict, summary: dict, figures: dict[str, Figure],
                      tb_dir: str | os.PathLike) -> Path:
    """Scalars and figures in tensorboard, one sub-directory per run (rebuilt from scratch).

    Tags: ``eval/<task>/success`` (step = position in the sequence), ``cl/average_success``,
    ``cl/forgetting``, ``cl/forward_transfer`` (step = position in the sequence),
    ``finetune/<task>/{loss,success,first_grad_norm,eva_seconds,trainable_params}``.
    The directory is written next to its final place and swapped in, so re-running a
    report never appends duplicate events.
    """
    from torch.utils.tensorboard import SummaryWriter

    tb_dir = Path(tb_dir)
    with atomic_dir(tb_dir, overwrite=True) as tmp:
        for run in results["runs"]:
            with SummaryWriter(str(tmp / _run_tag(run))) as w:
                _write_run_scalars(w, run, results["runs"])
        with SummaryWriter(str(tmp / "summary")) as w:
            for protocol, methods in summary.items():
                for method, e in methods.items():
                    w.add_scalar(f"{protocol}/{method}/average_success", e["average"]["mean"], 0)
            for stem, fig in figures.items():
                w.add_figure(f"plots/{stem}", fig, 0, close=False)
    return tb_dir


def _write_run_scalars(w, run: dict, all_runs: Sequence[dict]) -> None:
    tasks = run["tasks"]
    matrix = run.get("success_matrix")
    if run["protocol"] == "sequential" and matrix:
        for i, row in enumerate(matrix):
            for j, task in enumerate(tasks):
                w.add_scalar(f"eval/{task}/success", row[j], i)
            S = np.asarray(matrix[: i + 1], dtype=np.float64)[:, : i + 1]
            w.add_scalar("cl/average_success", float(np.mean(matrix[i])), i)
            w.add_scalar("cl/forgetting", metrics.forgetting(S), i)
        aucs = [rec["auc"] for rec in run["per_task"]]
        ref = _reference_auc(all_runs, run["method"], run["seed"], tasks,
                             run.get("pretrained"))
        if ref is not None and aucs:
            ft = metrics.forward_transfer_per_task(aucs, ref[: len(aucs)])
            for i in range(len(ft)):
                w.add_scalar("cl/forward_transfer", float(np.mean(ft[: i + 1])), i)
    else:
        for rec in run["per_task"]:
            w.add_scalar(f"eval/{rec['task']}/success", rec["success"], rec["index"])
        if is_complete(run):
            w.add_scalar("cl/average_success", float(np.mean(final_success(run))),
                         len(tasks) - 1)
    for rec in run["per_task"]:
        prefix = f"finetune/{rec['task']}"
        for step, loss in zip(rec["loss_curve"]["steps"], rec["loss_curve"]["loss"],
                              strict=True):
            w.add_scalar(f"{prefix}/loss", loss, step)
        for step, succ in zip(rec["success_curve"]["steps"], rec["success_curve"]["success"],
                              strict=True):
            w.add_scalar(f"{prefix}/success", succ, step)
        for key in ("first_grad_norm", "eva_seconds", "trainable_params", "finetune_seconds"):
            if rec.get(key) is not None:
                w.add_scalar(f"{prefix}/{key}", rec[key], 0)


# ---------------------------------------------------------------------------- all together


def write_report(results: dict, out_dir: str | os.PathLike, tensorboard: bool = True
                 ) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``report.md``, ``plots/*.png`` and ``tb/``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    figures = build_figures(results, summary)
    plot_paths = save_figures(figures, out_dir / "plots")
    paths = {
        "results": write_json(out_dir / "results.json", results),
        "summary": write_json(out_dir / "summary.json", summary),
        "csv": write_text(out_dir / "results.csv", results_to_csv(results)),
        "report": write_text(
            out_dir / "report.md",
            render_markdown(results, summary,
                            [p.relative_to(out_dir).as_posix() for p in plot_paths])),
        "plots": out_dir / "plots",
    }
    if tensorboard:
        paths["tensorboard"] = write_tensorboard(results, summary, figures, out_dir / "tb")
    return paths


def format_table(summary: dict) -> str:
    """A plain-text table for the terminal: method, average success, per-task success."""
    lines = []
    for protocol, methods in summary.items():
        tasks = next(iter(methods.values()))["tasks"]
        lines.append(f"[{protocol}]  " + "  ".join(f"{short_name(t)[:10]:>10}" for t in tasks)
                     + "        avg  paper")
        for method, e in methods.items():
            paper = PAPER_AVG_SUCCESS.get(method) if protocol == "single" else None
            cells = "  ".join(f"{e['per_task'][t]['mean']:>10.2f}" for t in tasks)
            lines.append(f"{method:<10} {cells}  {_fmt(e['average']):>9}  "
                         f"{'' if paper is None else f'{paper:.2f}'}")
        if protocol == "sequential":
            for method, e in methods.items():
                ft = e["forward_transfer"]
                lines.append(f"{method:<10} average performance {_fmt_ci(e['average_performance'])}"
                             f"  forgetting {_fmt_ci(e['forgetting'])}"
                             f"  forward transfer {_fmt_ci(ft)}")
    return "\n".join(lines)
