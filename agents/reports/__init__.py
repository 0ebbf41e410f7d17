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

from agents.lazy import lazy_exports

# plots and the written report import matplotlib: only when asked for (a Ray worker that
# runs a cell writes records, never plots)
_EXPORTS = {
    **dict.fromkeys(("build_figures", "figure_comparison", "save_figures"), "agents.reports.plots"),
    **dict.fromkeys(("PAPER_AVG_SUCCESS", "format_table", "read_summary", "render_markdown",
                     "write_report",
                     "write_tensorboard"), "agents.reports.report"),
    **dict.fromkeys(("RESULTS_FORMAT", "RESULTS_VERSION", "empty_results", "final_success",
                     "is_complete", "load_results", "mean_success_curves", "merge_results",
                     "results_to_csv",
                     "short_name", "task_auc", "write_json", "write_text"),
                    "agents.reports.results"),
    **dict.fromkeys(("DEFINITIONS", "REFERENCE_METHOD", "compare", "summarize"),
                    "agents.reports.statistics"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
