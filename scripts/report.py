"""Combine fine-tuning runs into one comparison: results.json, CSV, report.md, plots, tb.

Give a `sequential` run together with `single` runs of the same methods to get forward
transfer; runs of the same (protocol, method, seed) given twice keep the later one. The
report compares methods as rliable does (mean, IQM, probability of improvement over lora,
95% stratified bootstrap intervals with a fixed seed) and gives Continual World's metrics.

Example:
    python scripts/report.py runs/cw10-single runs/cw10-seq --out runs/cw10-report
"""

from __future__ import annotations

import sys
from pathlib import Path

from agents.reports import format_table, load_results, merge_results, summarize, write_report
from agents.reports.report_dir import check_report_dir, prepare_report_dir
from agents.reports.statistics import BOOTSTRAP_REPS
from eva_rl.runlock import RunLock

from script_cli import InputError, ScriptParser, script_main


def results_file(run: str) -> str:
    """The ``results.json`` a run argument names (a run directory or the file), absolute."""
    path = Path(run).resolve()
    return str(path / "results.json" if path.is_dir() else path)


@script_main
def main(argv: list[str] | None = None) -> int:
    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or their results.json)")
    p.add_argument("--out", required=True, help="directory for the combined report")
    p.add_argument("--overwrite", action="store_true",
                   help="move what --out holds (another run or report) aside to "
                        "OUT.old-<time> instead of refusing")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over --out although a process on another host holds its lock")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--bootstrap-reps", type=int, default=BOOTSTRAP_REPS,
                   help="resamples per 95%% interval of the comparison (rliable); more is "
                        "steadier and slower, rliable's README uses 50000 for aggregates "
                        f"(default {BOOTSTRAP_REPS})")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.bootstrap_reps < 1:
        raise InputError(f"--bootstrap-reps must be positive, got {args.bootstrap_reps}")
    if any(Path(r).resolve() in (out, out / "results.json") for r in args.runs):
        raise InputError("--out must not be one of the input runs (its results would be "
                         "replaced)")
    inputs = [results_file(r) for r in args.runs]
    # everything is checked before the first write: the inputs, then --out
    results = merge_results([load_results(r) for r in args.runs])
    check_report_dir(out, inputs, overwrite=args.overwrite)
    summary = summarize(results, bootstrap_reps=args.bootstrap_reps)
    with RunLock(out, force=args.force_unlock):
        prepare_report_dir(out, inputs, overwrite=args.overwrite)
        paths = write_report(results, out, tensorboard=not args.no_tensorboard,
                             summary=summary)
    print(format_table(summary))
    print(f"\nreport: {paths['report']}\nplots: {paths['plots']}\n"
          f"tensorboard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
