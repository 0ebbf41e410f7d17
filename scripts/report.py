"""Combine fine-tuning runs into one comparison: results.json, CSV, report.md, plots, tb.

Give a `sequential` run together with `single` runs of the same methods to get forward
transfer; runs of the same (protocol, method, seed) given twice keep the later one.

Example:
    python scripts/report.py runs/cw10-single runs/cw10-seq --out runs/cw10-report
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agents.reports import format_table, load_results, merge_results, summarize, write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or their results.json)")
    p.add_argument("--out", required=True, help="directory for the combined report")
    p.add_argument("--no-tensorboard", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if any(Path(r).resolve() == out for r in args.runs):
        print("error: --out must not be one of the input runs (its results would be replaced)",
              file=sys.stderr)
        return 2
    try:
        results = merge_results([load_results(r) for r in args.runs])
        paths = write_report(results, out, tensorboard=not args.no_tensorboard)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(summarize(results)))
    print(f"\nreport: {paths['report']}\nplots: {paths['plots']}\n"
          f"tensorboard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
