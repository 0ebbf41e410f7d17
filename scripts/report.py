"""Combine fine-tuning runs into one comparison: results.json, CSV, report.md, plots, tb.

Give a `sequential` run together with `single` runs of the same methods to get forward
transfer; runs of the same (protocol, method, seed) given twice keep the later one. The
report compares methods as rliable does (mean, IQM, probability of improvement over lora,
95% stratified bootstrap intervals with a fixed seed) and gives Continual World's metrics.

Example:
    python scripts/report.py runs/cw10-single runs/cw10-seq --out runs/cw10-report
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agents.reports import format_table, load_results, merge_results, summarize, write_report
from agents.reports.statistics import BOOTSTRAP_REPS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or their results.json)")
    p.add_argument("--out", required=True, help="directory for the combined report")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--bootstrap-reps", type=int, default=BOOTSTRAP_REPS,
                   help="resamples per 95%% interval of the comparison (rliable); more is "
                        "steadier and slower, rliable's README uses 50000 for aggregates "
                        f"(default {BOOTSTRAP_REPS})")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.bootstrap_reps < 1:
        print(f"error: --bootstrap-reps must be positive, got {args.bootstrap_reps}",
              file=sys.stderr)
        return 2
    if any(Path(r).resolve() == out for r in args.runs):
        print("error: --out must not be one of the input runs (its results would be replaced)",
              file=sys.stderr)
        return 2
    try:
        results = merge_results([load_results(r) for r in args.runs])
        summary = summarize(results, bootstrap_reps=args.bootstrap_reps)
        paths = write_report(results, out, tensorboard=not args.no_tensorboard,
                             summary=summary)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"\nreport: {paths['report']}\nplots: {paths['plots']}\n"
          f"tensorboard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
