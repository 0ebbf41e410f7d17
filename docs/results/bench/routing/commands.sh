#!/usr/bin/env bash
# Routing without task labels at the `bench` tier (issue: EVA-subspace routing): the ten
# CW10 adapters of the tier's `eva` run of seed $SEED (`single` protocol: one adapter per
# task on the frozen base), evaluated without telling the agent the task. Their signatures
# are rewritten first at $RANK components per layer (24: chosen on the MT40 tasks held out
# of pretraining, starts-mt40-heldout.json; 4: the adapters' own rank), thresholds
# calibrated on episode starts as this code does. Before its decision an episode is
# played by the best guess so far (the default; `-base`: by the bare base model).
#   the choice: python scripts/bench/bench_routing_starts.py --pretrained $ROOT/pretrained \
#     --data $ROOT/data \
#     --tasks stick-push,peg-insert-side,sweep-into,coffee-push,door-close \
#     --out $OUT/starts-mt40-heldout.json
# ROOT: the tier's run directory (python scripts/tier.py --tier bench --out $ROOT ...).
set -euo pipefail
ROOT=${ROOT:-runs/bench}
SEED=${SEED:-2}
OUT=${OUT:-docs/results/bench/routing}
PY=${PY:-python}
run() {  # name, router, k, extra flags
  $PY scripts/evaluate.py --run $ROOT/single --method eva --seed-run $SEED --tasks CW10 \
      --episodes 20 --seed 100000 --stop-on-success --threads 1 \
      --routing $2 --routing-after $3 "${@:4}" --out $OUT/$1.json --overwrite
}
for RANK in 24 4; do  # the rank-4 signatures stay in the run for the baselines below
  $PY scripts/signatures.py --run $ROOT/single --method eva --seed $SEED --rank $RANK --overwrite
  for k in 1 5 20; do run eva-r$RANK-k$k eva $k; done
  if [ $RANK = 24 ]; then run eva-r24-k5-base eva 5 --routing-before base; fi
done
run eva-ppca-r4-k5 eva 5 --routing-score ppca
run oracle-k5 oracle 5
run obs-k5 obs 5
run embedding-k5 embedding 5
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*-k*.json"))}
oracle = runs["oracle-k5"]
per_step = lambda r: r["seconds"] / r["env_steps"]
lines = ["| run | router | k | routing accuracy | worst task | unknown rate | mean success | "
         "time per env step vs oracle |", "|---|---|---|---|---|---|---|---|"]
fmt = lambda v: "–" if v is None else f"{v:.2f}"
for name, r in runs.items():
    per = r.get("routing_per_task") or {}
    worst = min(per.values()) if per else None
    lines.append(f"| {name} | {r['routing']} | {r['routing_after']} | "
                 f"{fmt(r.get('routing_accuracy'))} | {fmt(worst)} | {fmt(r.get('unknown_rate'))} | "
                 f"{r['mean_success']:.2f} | {per_step(r) / per_step(oracle):.2f}x |")
tasks = list(oracle["tasks"])
lines += ["", "Routing accuracy per task:", "",
          "| run | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " |",
          "|---" * (len(tasks) + 1) + "|"]
for name, r in runs.items():
    if r.get("routing_per_task"):
        lines.append(f"| {name} | " + " | ".join(f"{r['routing_per_task'][t]:.2f}" for t in tasks)
                     + " |")
lines += ["", "Success per task:", "",
          "| run | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " |",
          "|---" * (len(tasks) + 1) + "|"]
for name, r in runs.items():
    lines.append(f"| {name} | " + " | ".join(f"{r['tasks'][t]['success_rate']:.2f}" for t in tasks)
                 + " |")
best = runs["eva-r24-k5"]["confusion"]
lines += ["", "Confusion of eva-r24-k5 (true task x chosen adapter):", "",
          "| true \\ chosen | " + " | ".join(c.removesuffix("-v3") for c in best["cols"]) + " |",
          "|---" * (len(best["cols"]) + 1) + "|"]
for row, counts in zip(best["rows"], best["counts"]):
    lines.append(f"| {row.removesuffix('-v3')} | " + " | ".join(map(str, counts)) + " |")
(out / "routing.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
