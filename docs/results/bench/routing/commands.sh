#!/usr/bin/env bash
# Routing without task labels at the `bench` tier (issue: EVA-subspace routing): the ten
# CW10 adapters of the tier's `eva` run, seed 0 (`single` protocol: one adapter per task on
# the frozen base, each with its signature), evaluated without telling the agent the task.
# ROOT: the tier's run directory (python scripts/tier.py --tier bench --out $ROOT ...).
set -euo pipefail
ROOT=${ROOT:-runs/bench}
OUT=${OUT:-docs/results/bench/routing}
run() {  # router, k
  python scripts/evaluate.py --run $ROOT/single --method eva --seed-run 0 --tasks CW10 \
      --episodes 20 --seed 100000 --stop-on-success --threads 1 \
      --routing $1 --routing-after $2 --out $OUT/$1-k$2.json --force
}
run oracle 5
for k in 1 5 20; do run eva $k; done
run obs 5
run embedding 5
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for path in sorted(out.glob("*-k*.json")):
    r = json.loads(path.read_text())
    per = r.get("routing_per_task") or {}
    worst = min(per.values()) if per else None
    rows.append((r["routing"], r["routing_after"], r["mean_success"], r.get("routing_accuracy"),
                 worst, r.get("unknown_rate")))
lines = ["| router | k | mean success | routing accuracy | worst task's accuracy | unknown rate |",
         "|---|---|---|---|---|---|"]
fmt = lambda v: "–" if v is None else f"{v:.2f}"
for router, k, succ, acc, worst, unknown in rows:
    lines.append(f"| {router} | {k} | {succ:.2f} | {fmt(acc)} | {fmt(worst)} | {fmt(unknown)} |")
(out / "routing.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
