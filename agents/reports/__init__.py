"""Fine-tuning results and their reports: ``results.json``, CSV, ``report.md``, plots, tb.

One module per idea:

- :mod:`~agents.reports.results`: the results dict (format in its docstring): empty, load,
  merge, per-run helpers, CSV, JSON/text files;
- :mod:`~agents.reports.statistics`: per-method summaries, Continual World's metrics,
  rliable's comparisons (IQM, stratified bootstrap intervals, probability of improvement);
- :mod:`~agents.reports.plots`: the figures;
- :mod:`~agents.reports.report`: ``report.md``, the terminal table, tensorboard and
  :func:`write_report`.

The names below are importable from ``agents.reports`` itself.
"""

from agents.reports.plots import build_figures, figure_comparison, save_figures
from agents.reports.report import (
    PAPER_AVG_SUCCESS,
    format_table,
    render_markdown,
    write_report,
    write_tensorboard,
)
from agents.reports.results import (
    RESULTS_FORMAT,
    RESULTS_VERSION,
    empty_results,
    final_success,
    is_complete,
    load_results,
    merge_results,
    results_to_csv,
    short_name,
    task_auc,
    write_json,
    write_text,
)
from agents.reports.statistics import DEFINITIONS, REFERENCE_METHOD, compare, summarize

__all__ = [
    "DEFINITIONS", "PAPER_AVG_SUCCESS", "REFERENCE_METHOD", "RESULTS_FORMAT", "RESULTS_VERSION",
    "build_figures", "compare", "empty_results", "figure_comparison", "final_success",
    "format_table", "is_complete", "load_results", "merge_results", "render_markdown",
    "results_to_csv", "save_figures", "short_name", "summarize", "task_auc", "write_json",
    "write_report", "write_tensorboard", "write_text",
]
