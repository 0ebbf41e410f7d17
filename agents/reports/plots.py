"""The report's figures (matplotlib ``Figure`` objects, no pyplot state) and their PNGs."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from agents.reports.results import mean_success_curves, short_name
from agents.reports.statistics import REFERENCE_METHOD
from eva_rl import metrics
from eva_rl.io import atomic_write

# One colour per method in every plot of every report (matplotlib's tab10), so a method
# keeps its colour whichever methods a report holds and in whatever order.
METHOD_COLORS: dict[str, str] = {
    "lora": "tab:blue", "eva": "tab:orange", "dora": "tab:green", "eva_dora": "tab:red",
    "pissa": "tab:purple", "olora": "tab:brown", "adalora": "tab:pink", "fft": "tab:gray",
    "eva_reverse": "tab:olive", "eva_state": "tab:cyan", "eva_type_centered": "navy",
    "eva_lora_norm": "teal", "corda_ipm": "goldenrod", "corda_kpm": "sienna",
    "lora_ga": "indigo",
}
# methods registered elsewhere: a fixed colour per name (a checksum, not Python's salted hash)
_OTHER_COLORS = ("crimson", "olivedrab", "orchid", "darkslategray", "peru", "slateblue",
                 "darkkhaki", "lightcoral", "cadetblue", "rosybrown")

SE_BAND_LABEL = "band: ± one standard error over (task, seed) runs"


def method_color(method: str) -> str:
    """The colour of ``method`` in every plot (`METHOD_COLORS`; another name gets a fixed
    colour of its own, derived from the name)."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _OTHER_COLORS[zlib.crc32(method.encode()) % len(_OTHER_COLORS)]


def by_score(scores: dict[str, float]) -> list[str]:
    """Method names, best score first (ties by name), the order of every method plot."""
    return sorted(scores, key=lambda m: (-scores[m], m))


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
    """Grouped bars: final success per task for every method (mean ± one standard error
    over seeds), methods by their average success, best first."""
    tasks = next(iter(methods.values()))["tasks"]
    fig = Figure(figsize=(max(6, 0.9 * len(tasks) + 2), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    order = by_score({m: e["average"]["mean"] for m, e in methods.items()})
    for k, method in enumerate(order):
        e = methods[method]
        means = [e["per_task"][t]["mean"] for t in tasks]
        errs = [np.nan_to_num(e["per_task"][t]["stderr"] or 0.0) for t in tasks]
        x = np.arange(len(tasks)) + (k - (len(methods) - 1) / 2) * width
        ax.bar(x, means, width, yerr=errs, color=method_color(method),
               label=f"{method} ({e['average']['mean']:.2f})")
    ax.set_xticks(range(len(tasks)), [short_name(t) for t in tasks], rotation=45, ha="right",
                  fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title(f"success per task — {protocol} protocol\n(error bars: ± one standard "
                 "error over seeds; legend: average success)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def figure_success_curves(curves: dict[str, dict], protocol: str) -> Figure:
    """Mean success over tasks and seeds against fine-tuning updates, one line per method,
    methods by their final mean success, best first (band: ± one standard error over the
    (task, seed) runs, named in the legend)."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    banded = False
    for method in by_score({m: c["mean"][-1] for m, c in curves.items()}):
        c = curves[method]
        steps, mean = np.asarray(c["steps"]), np.asarray(c["mean"])
        color = method_color(method)
        ax.plot(steps, mean, marker="o", color=color, label=f"{method} ({mean[-1]:.2f})")
        if c["stderr"] is not None:
            err = np.asarray(c["stderr"])
            ax.fill_between(steps, mean - err, mean + err, color=color, alpha=0.15)
            banded = True
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("fine-tuning updates")
    ax.set_ylabel("mean success over tasks and seeds")
    ax.set_title(f"success vs updates — {protocol} protocol", fontsize=9)
    handles, _ = ax.get_legend_handles_labels()
    if banded:
        handles.append(Patch(color="grey", alpha=0.3, label=SE_BAND_LABEL))
    ax.legend(handles=handles, fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
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


def figure_comparison(methods: dict, protocol: str) -> Figure:
    """rliable's interval plot: per method (rows) its mean, IQM and probability of
    improvement over the reference (panels), point estimates with their 95% intervals;
    methods by their mean success, best on top."""
    names = by_score({m: e["comparison"]["mean"]["value"] if e["comparison"]["mean"]
                      else e["average"]["mean"] for m, e in methods.items()})
    panels = (("mean", "mean success"), ("iqm", "IQM success"),
              ("p_improvement", f"P(method > {REFERENCE_METHOD})"))
    fig = Figure(figsize=(10, 1.2 + 0.45 * len(names)), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    no_interval = False
    for ax, (key, label) in zip(axes, panels, strict=True):
        for row, method in enumerate(names):
            est = methods[method]["comparison"][key]
            if est is None:
                if key == "p_improvement" and method == REFERENCE_METHOD:
                    ax.text(0.5, row, "reference", ha="center", va="center", fontsize=8,
                            bbox={"facecolor": "white", "edgecolor": "none"})
                continue
            color = method_color(method)
            if est["ci"] is None:
                no_interval = True
                ax.plot(est["value"], row, marker="o", markerfacecolor="none", color=color)
            else:
                low, high = est["ci"]
                ax.plot([low, high], [row, row], color=color, linewidth=6, alpha=0.6,
                        solid_capstyle="butt")
                ax.plot(est["value"], row, marker="|", markersize=14, color="black")
        if key == "p_improvement":
            ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel(label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].set_ylim(len(names) - 0.5, -0.5)  # first method on top
    seeds = sorted({e["comparison"]["runs"] for e in methods.values()})
    note = "bars: 95% stratified bootstrap intervals (rliable) over (task, seed) runs"
    if no_interval:
        note += "; hollow marker: one seed, no interval"
    fig.suptitle(f"{protocol} protocol, {'/'.join(map(str, seeds))} seeds per method\n{note}",
                 fontsize=9)
    return fig


def figure_routing_confusion(run: dict) -> Figure:
    """Heatmap of the last routed evaluation's confusion: true task x chosen adapter, as
    shares of each task's episodes."""
    conf = run["per_task"][-1]["routing"]["confusion"]
    counts = np.asarray(conf["counts"], dtype=np.float64)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    router = run["per_task"][-1]["routing"]["router"]
    return _heatmap(shares, [short_name(t) for t in conf["rows"]],
                    [short_name(c) for c in conf["cols"]],
                    f"{run['method']} seed {run['seed']}: router {router}\n"
                    "true task (row) x adapter chosen (column)")


def build_figures(results: dict, summary: dict) -> dict[str, Figure]:
    """Every plot of the report, keyed by file stem."""
    figures: dict[str, Figure] = {}
    curves = mean_success_curves(results, "single")
    if curves:
        figures["success_curves_single"] = figure_success_curves(curves, "single")
    for protocol, methods in summary.items():
        figures[f"success_per_task_{protocol}"] = figure_success_per_task(methods, protocol)
        figures[f"comparison_{protocol}"] = figure_comparison(methods, protocol)
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
    for run in results["runs"]:
        if run["protocol"] == "sequential" and run["per_task"] and \
                run["per_task"][-1].get("routing"):
            figures[f"routing_confusion_{run['method']}_seed{run['seed']}"] = \
                figure_routing_confusion(run)
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
