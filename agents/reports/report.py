"""The written report: ``report.md``, the terminal table, tensorboard, and
:func:`write_report`, which writes every file of a report at once."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from agents.reports.plots import build_figures, save_figures
from agents.reports.results import (
    final_success,
    format_accuracy,
    is_complete,
    mean_success_curves,
    results_to_csv,
    short_name,
    task_auc,
    write_json,
    write_text,
)
from agents.reports.statistics import (
    BOOTSTRAP_REPS,
    DEFINITIONS,
    ONE_SEED_NOTE,
    REFERENCE_METHOD,
    balanced_reference,
    reference_aucs,
    summarize,
)
from envs import CW10
from eva_rl import metrics
from eva_rl.io import atomic_dir, read_json_object

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

ONE_SEED = "n/a (1 seed)"


# ---------------------------------------------------------------------------- formatting


def _fmt(stats: dict | None, digits: int = 2) -> str:
    """``mean ± s.e.`` (the mean alone where there is no standard error)."""
    if stats is None:
        return "–"
    mean, se = stats["mean"], stats["stderr"]
    if se is None or not math.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _fmt_ci(stats: dict | None) -> str:
    """``mean [low, high]`` of a 90% interval over seeds; no interval from one seed."""
    if stats is None:
        return "–"
    if stats["n"] < 2:
        return f"{stats['mean']:.2f} [{ONE_SEED}]"
    low, high = stats["ci90"]
    return f"{stats['mean']:.2f} [{low:.2f}, {high:.2f}]"


def _fmt_estimate(est: dict | None) -> str:
    """An rliable estimate: ``value [low, high]``, or the value and ``n/a (1 seed)``."""
    if est is None:
        return "–"
    if est["ci"] is None:
        return f"{est['value']:.2f} [{ONE_SEED}]"
    low, high = est["ci"]
    return f"{est['value']:.2f} [{low:.2f}, {high:.2f}]"


def _fmt_improvement(method: str, comparison: dict) -> str:
    if method == REFERENCE_METHOD:
        return "(reference)"
    return _fmt_estimate(comparison["p_improvement"])


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------------------- markdown


def render_markdown(results: dict, summary: dict, plots: Sequence[str] = ()) -> str:
    """The report: Table-23 layout per protocol, rliable's comparison of methods,
    Continual World's metrics, success matrices, costs, definitions."""
    out = ["# eva-rl fine-tuning report", ""]
    n_runs = len(results["runs"])
    n_done = sum(is_complete(r) for r in results["runs"])
    out += [f"{n_done} of {n_runs} runs complete (method × seed × protocol). "
            "Success = fraction of evaluation episodes with `info['success']` at any step; "
            "cells are mean ± standard error over seeds. Definitions at the end.", ""]
    for protocol, methods in summary.items():
        tasks = next(iter(methods.values()))["tasks"]
        title = ("after its own fine-tuning, each task from the pretrained model"
                 if protocol == "single" else "at the end of the sequence")
        out += [f"## Success per task — `{protocol}` protocol ({title})", ""]
        # the paper's numbers are CW10 averages: beside anything else they would mislead
        with_paper = protocol == "single" and tuple(tasks) == CW10
        header = ["method", *(short_name(t) for t in tasks), "avg",
                  *(["paper avg"] if with_paper else []), "seeds"]
        rows = []
        for method, e in methods.items():
            paper = PAPER_AVG_SUCCESS.get(method)
            rows.append([method, *(_fmt(e["per_task"][t]) for t in tasks), _fmt(e["average"]),
                         *([f"{paper:.2f}" if paper is not None else "–"] if with_paper
                           else []), str(len(e["seeds"]))])
        out += _table(header, rows) + [""]
        if with_paper:
            out += ["`paper avg`: the EVA paper's Table 23 (best rank per method, 100k updates "
                    "per task on ~2M transitions with a 12M-parameter DT); not comparable in "
                    "scale to a CPU run.", ""]
        out += _comparison_section(protocol, methods)
        if protocol == "single":
            out += _curve_section(results)
        if protocol == "sequential":
            out += _continual_section(methods, tasks)
        out += [f"## Cost per method — `{protocol}`", ""]
        rows = [[m, f"{e['trainable_params']:,.0f}", _fmt(e["finetune_seconds"], 1),
                 f"{100 * e['eva_share']:.1f}%"] for m, e in methods.items()]
        out += _table(["method", "trainable params / task", "fine-tuning seconds (all tasks)",
                       "EVA init share"], rows) + [""]
    out += _routing_section(results)
    out += ["## Definitions", ""]
    out += [f"- **{name}**: {text}." for name, text in DEFINITIONS.items()] + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(out)


def _comparison_section(protocol: str, methods: dict) -> list[str]:
    out = [f"## Comparison of methods — `{protocol}` (rliable, 95% stratified bootstrap "
           "intervals over (task, seed) runs)", ""]
    rows = [[m, f"{c['runs']} × {c['tasks']}", _fmt_estimate(c["mean"]),
             _fmt_estimate(c["iqm"]), _fmt_improvement(m, c), _fmt(e["auc"])]
            for m, e in methods.items() for c in [e["comparison"]]]
    out += _table(["method", "seeds × tasks", "mean success [95% CI]", "IQM [95% CI]",
                   f"P(improvement over {REFERENCE_METHOD}) [95% CI]",
                   "success AUC (mean ± s.e.)"], rows)
    out += ["", "Final success per (task, seed) run. Bootstrap: rliable's "
            "`get_interval_estimates`, runs resampled within each task, fixed seed."]
    if REFERENCE_METHOD not in methods:
        out += ["", f"No `{REFERENCE_METHOD}` runs under this protocol: no probability of "
                "improvement."]
    if any(e["comparison"]["runs"] < 2 for e in methods.values()):
        out += ["", f"`{ONE_SEED}`: {ONE_SEED_NOTE}."]
    return out + [""]


def _curve_section(results: dict) -> list[str]:
    """Mean success over tasks and seeds at each evaluation during fine-tuning."""
    curves = mean_success_curves(results, "single")
    steps = sorted({s for c in curves.values() for s in c["steps"]})
    if len(steps) < 2:
        return []
    rows = []
    for method, c in curves.items():
        at = dict(zip(c["steps"], c["mean"], strict=True))
        rows.append([method, *(f"{at[s]:.2f}" if s in at else "–" for s in steps),
                     str(c["n"])])
    out = ["## Success vs updates — `single` (mean over tasks and seeds)", ""]
    out += _table(["method", *(f"{s} updates" for s in steps), "runs"], rows)
    return out + ["", "A method can be faster (higher early) and end lower, or the reverse: "
                  "the success AUC (mean of these evaluations) and the final success "
                  "together tell both.", ""]


def _continual_section(methods: dict, tasks: Sequence[str]) -> list[str]:
    out = ["## Continual metrics — `sequential` (Continual World's definitions; mean "
           "[90% bootstrap CI] over seeds)", ""]
    rows = [[m, _fmt_ci(e["average_performance"]), _fmt_ci(e["forgetting"]),
             _fmt_ci(e["forward_transfer"])] for m, e in methods.items()]
    out += _table(["method", "average performance", "forgetting (over all T tasks)",
                   "forward transfer (ratio of seed means)"], rows)
    out += ["", "Forward transfer needs `single` runs of the same method from the same "
            "pretrained model in the same report (`scripts/report.py SEQ_RUN "
            "SINGLE_RUN`); `–` where there are none. Its interval resamples the seeds of "
            "the sequential and of the reference runs independently, as Continual World "
            "does. summary.json also holds the older variants (`variants`)."]
    if any(e["average_performance"]["n"] < 2 for e in methods.values()):
        out += ["", f"`{ONE_SEED}`: one seed leaves the bootstrap over seeds nothing to "
                "resample; its interval would have zero width."]
    out += [""]
    for method, e in methods.items():
        out += [f"### Success matrix — {method} (row: after training task i; "
                "column: success on task j)", ""]
        rows = [[f"{i}: {short_name(tasks[i])}", *(f"{v:.2f}" for v in row)]
                for i, row in enumerate(e["success_matrix"])]
        out += _table(["after \\ on", *(short_name(t) for t in tasks)], rows) + [""]
    return out


def routed_runs(results: dict) -> list[dict]:
    """Sequential runs whose evaluations routed (their records hold ``routing``)."""
    return [r for r in results["runs"] if r["protocol"] == "sequential" and r["per_task"]
            and r["per_task"][-1].get("routing")]


def _routing_section(results: dict) -> list[str]:
    out = []
    for run in routed_runs(results):
        last = run["per_task"][-1]
        rt = last["routing"]
        tasks = list(dict.fromkeys(run["tasks"]))
        oracle = dict(zip(run["tasks"], last["oracle_success_row"], strict=True))
        routed = dict(zip(run["tasks"], last["success_row"], strict=True))
        out += [f"## Routing — {run['method']} seed {run['seed']} (router `{rt['router']}`, "
                f"decision after {rt['decide_after']} observations"
                f"{', re-decided every step' if rt['redecide'] else ''}; after the last task)",
                ""]
        rows = [[short_name(t), format_accuracy(rt["per_task"][t]),
                 f"{rt['unknown_per_task'][t]:.2f}", f"{routed[t]:.2f}", f"{oracle[t]:.2f}"]
                for t in tasks]
        rows.append(["**all**", format_accuracy(rt["accuracy"]), f"{rt['unknown_rate']:.2f}",
                     f"{np.mean([routed[t] for t in tasks]):.2f}",
                     f"{np.mean([oracle[t] for t in tasks]):.2f}"])
        out += _table(["task", "routing accuracy", "unknown rate",
                       f"success ({rt['router']})", "success (oracle)"], rows) + [""]
        conf = rt["confusion"]
        out += ["Confusion (episodes; row: true task, column: adapter chosen; `none`: "
                "unknown or undecided, the base model acted):", ""]
        out += _table(["true \\ chosen", *(short_name(c) for c in conf["cols"])],
                      [[short_name(t), *(str(v) for v in counts)]
                       for t, counts in zip(conf["rows"], conf["counts"], strict=True)])
        out += ["", "Routing accuracy: share of an episode's decisions that chose the task's "
                "own adapter (none, for a task without one yet), over the episodes that "
                "decided; `undecided`: every episode ended before its decision."]
        out += [""]
    return out


# ---------------------------------------------------------------------------- tensorboard


def _run_tag(run: dict) -> str:
    return f"{run['protocol']}_{run['method']}_seed{run['seed']}"


def write_tensorboard(results: dict, summary: dict, figures: dict[str, Figure],
                      tb_dir: str | os.PathLike) -> Path:
    """Scalars and figures in tensorboard, one sub-directory per run (rebuilt from scratch).

    Tags: ``eval/<task>/success`` (step = position in the sequence), ``cl/average_success``,
    ``cl/forgetting``, ``cl/forward_transfer`` (step = position in the sequence; Continual
    World's definitions over the tasks so far; forward transfer of this seed against the
    reference runs' seed mean),
    ``finetune/<task>/{loss,success,first_grad_norm,eva_seconds,trainable_params}``,
    and for routed runs ``routing/accuracy``, ``routing/unknown_rate``,
    ``routing/<task>/accuracy`` (step = position in the sequence).
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
                    w.add_scalar(f"{protocol}/{method}/iqm_success",
                                 e["comparison"]["iqm"]["value"], 0)
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
        aucs = [task_auc(rec) for rec in run["per_task"]]
        ref = reference_aucs(all_runs, run["method"], tasks, run.get("pretrained"))
        if ref is not None and aucs:
            ref_matrix = balanced_reference(ref, tasks)[:, : len(aucs)]
            ft = metrics.forward_transfer_per_task(aucs, ref_matrix)
            for i in range(len(ft)):
                w.add_scalar("cl/forward_transfer", float(np.mean(ft[: i + 1])), i)
    else:
        for rec in run["per_task"]:
            w.add_scalar(f"eval/{rec['task']}/success", rec["success"], rec["index"])
        if is_complete(run):
            w.add_scalar("cl/average_success", float(np.mean(final_success(run))),
                         len(tasks) - 1)
    for i, rec in enumerate(run["per_task"]):
        routing = rec.get("routing")
        if routing:  # no accuracy where no episode decided
            if routing["accuracy"] is not None:
                w.add_scalar("routing/accuracy", routing["accuracy"], i)
            w.add_scalar("routing/unknown_rate", routing["unknown_rate"], i)
            for task, acc in routing["per_task"].items():
                if acc is not None:
                    w.add_scalar(f"routing/{task}/accuracy", acc, i)
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


def write_report(results: dict, out_dir: str | os.PathLike, tensorboard: bool = True, *,
                 summary: dict | None = None, bootstrap_reps: int = BOOTSTRAP_REPS
                 ) -> dict[str, Path]:
    """Write ``results.json``, ``summary.json``, ``results.csv``, ``report.md``,
    ``plots/*.png`` and ``tb/``.

    ``summary`` is :func:`summarize`'s of ``results`` if the caller has it already (its
    bootstraps are the slow part), else it is computed with ``bootstrap_reps`` resamples
    per rliable interval.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if summary is None:
        summary = summarize(results, bootstrap_reps=bootstrap_reps)
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


def read_summary(out_dir: str | os.PathLike) -> dict:
    """The ``summary.json`` that `write_report` wrote in ``out_dir`` (what `format_table`
    prints), without bootstrapping again; a clear error naming the file if it is missing
    or corrupt."""
    return read_json_object(Path(out_dir) / "summary.json", "report summary")


def format_table(summary: dict) -> str:
    """A plain-text table for the terminal: per-task and average success, rliable's
    comparison (mean, IQM, P(improvement over lora) with 95% intervals) and, for
    `sequential`, Continual World's metrics."""
    lines = []
    for protocol, methods in summary.items():
        tasks = next(iter(methods.values()))["tasks"]
        names = "  ".join(f"{short_name(t)[:10]:>10}" for t in tasks)
        lines.append(f"{f'[{protocol}]':<12} {names}        avg  paper")
        for method, e in methods.items():
            paper = PAPER_AVG_SUCCESS.get(method) if protocol == "single" else None
            cells = "  ".join(f"{e['per_task'][t]['mean']:>10.2f}" for t in tasks)
            lines.append(f"{method:<12} {cells}  {_fmt(e['average']):>9}  "
                         f"{'' if paper is None else f'{paper:.2f}'}")
        lines.append(f"{'':<12} {'mean [95% CI]':<24} {'IQM [95% CI]':<24} "
                     f"P(> {REFERENCE_METHOD}) [95% CI]")
        for method, e in methods.items():
            c = e["comparison"]
            lines.append(f"{method:<12} {_fmt_estimate(c['mean']):<24} "
                         f"{_fmt_estimate(c['iqm']):<24} {_fmt_improvement(method, c)}")
        if protocol == "sequential":
            for method, e in methods.items():
                lines.append(f"{method:<12} average performance "
                             f"{_fmt_ci(e['average_performance'])}"
                             f"  forgetting {_fmt_ci(e['forgetting'])}"
                             f"  forward transfer {_fmt_ci(e['forward_transfer'])}")
        if any(e["comparison"]["runs"] < 2 for e in methods.values()):
            lines.append(f"(n/a: {ONE_SEED_NOTE})")
    return "\n".join(lines)
