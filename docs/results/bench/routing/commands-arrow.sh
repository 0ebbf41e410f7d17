#!/usr/bin/env bash
# Arrow beside EVA at the `bench` tier: weight-only routing (eva_rl.arrow; PEFT's Arrow,
# Ostapenko et al. 2024): per adapted layer, each task adapter's prototype is the top
# right-singular vector of its update B A; the base model's input rows of the episode's
# window score each adapter by |row . prototype|, top-k softmax per row, the weights summed
# over the window's rows and the layers choose the episode's adapter (agents.routing). It
# reads no signatures. Same adapters and flags as commands.sh (the `eva` adapters of seed
# $SEED, `single` protocol, CW10), at k = 1, 5, 20 observations before the decision; the
# oracle and EVA's best (rank-24 signatures, k = 20) rerun beside it on the same adapters
# and machine, into $OUT/arrow-baselines/ (commands.sh's own files are left alone).
#
# $RUN: a `single` run holding METHOD's adapters of seed $SEED. Absent, it is remade from the
# tier run $ROOT (python scripts/tier.py --tier bench --out $ROOT --stages collect,pretrain):
# only METHOD's cells of seed SEED, with the tier's own fine-tuning settings; their records
# are then compared with the published ones ($PUBLISHED) where those exist.
# At tiny size (CI): ROOT=<a tiny tier run> RUN=<its single run> TASKS=<its tasks>
#   EPISODES=2 MAX_STEPS=10 OUT=<a scratch dir> bash commands-arrow.sh
set -euo pipefail
ROOT=${ROOT:-runs/bench}
SEED=${SEED:-2}
METHOD=${METHOD:-eva}
RUN=${RUN:-runs/bench-$METHOD-s$SEED}
TASKS=${TASKS:-CW10}
EPISODES=${EPISODES:-20}
MAX_STEPS=${MAX_STEPS:-200}
OUT=${OUT:-docs/results/bench/routing}
PUBLISHED=${PUBLISHED:-docs/results/bench/single/results.json}
PY=${PY:-python}
mkdir -p "$OUT/arrow-baselines"
if [ ! -f "$RUN/results.json" ]; then
  $PY - "$ROOT" "$RUN" "$METHOD" "$SEED" <<'PY'
import dataclasses, sys, torch
from agents.protocols import run_experiment
from agents.tiers import read_tier_file, single_experiment
root, run, method, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tier = read_tier_file(f"{root}/tier.json")
torch.set_num_threads(tier.threads)
exp = dataclasses.replace(single_experiment(tier, root), methods=(method,), seeds=(seed,))
run_experiment(exp, run, resume=True, report=False)
PY
fi
if [ -f "$PUBLISHED" ]; then  # the remade records against the published tier's
  $PY - "$RUN/results.json" "$PUBLISHED" "$METHOD" "$SEED" <<'PY'
import json, sys
mine, published, method, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def records(path):
    runs = json.load(open(path))["runs"]
    run = next((r for r in runs if r["method"] == method and r["seed"] == seed), None)
    return {} if run is None else {t["task"]: t for t in run["per_task"]}
a, b = records(mine), records(published)
for task in (t for t in a if t in b):
    differ = [k for k in ("success", "auc", "mean_return") if a[task][k] != b[task][k]]
    print(f"{task}: success {a[task]['success']:.2f} (published {b[task]['success']:.2f}), "
          f"auc {a[task]['auc']:.3f} ({b[task]['auc']:.3f}), mean return "
          f"{a[task]['mean_return']:.1f} ({b[task]['mean_return']:.1f}): "
          + ("equal" if not differ else "differ in " + ", ".join(differ)))
PY
fi
run() {  # name, router, k, extra flags
  $PY scripts/evaluate.py --run "$RUN" --method "$METHOD" --seed-run "$SEED" --tasks $TASKS \
      --episodes "$EPISODES" --max-steps "$MAX_STEPS" --seed 100000 --stop-on-success \
      --threads 1 --routing $2 --routing-after $3 "${@:4}" --out "$OUT/$1.json" --overwrite
}
for k in 1 5 20; do run arrow-k$k arrow $k; done
run arrow-baselines/oracle-k5 oracle 5
$PY scripts/signatures.py --run "$RUN" --method "$METHOD" --seed "$SEED" --rank 24 --overwrite
run arrow-baselines/eva-r24-k20 eva 20
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("arrow-k*.json"),
                                                       key=lambda p: int(p.stem[7:]))}
runs.update({p.stem: json.loads((out / "arrow-baselines" / f"{p}.json").read_text())
             for p in map(Path, ("eva-r24-k20", "oracle-k5"))})
oracle = runs["oracle-k5"]
per_step = lambda r: r["seconds"] / r["env_steps"]
fmt = lambda v: "–" if v is None else f"{v:.2f}"
lines = ["| run | router | k | routing accuracy | worst task | unknown rate | mean success | "
         "time per env step vs oracle |", "|---|---|---|---|---|---|---|---|"]
for name, r in runs.items():
    per = {t: v for t, v in (r.get("routing_per_task") or {}).items() if v is not None}
    lines.append(f"| {name} | {r['routing']} | {r['routing_after']} | "
                 f"{fmt(r.get('routing_accuracy'))} | {fmt(min(per.values()) if per else None)} | "
                 f"{fmt(r.get('unknown_rate'))} | {r['mean_success']:.2f} | "
                 f"{per_step(r) / per_step(oracle):.2f}x |")
tasks = list(oracle["tasks"])
head = ["| run | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " |",
        "|---" * (len(tasks) + 1) + "|"]
lines += ["", "Routing accuracy per task:", "", *head]
for name, r in runs.items():
    if r.get("routing_per_task"):
        lines.append(f"| {name} | " + " | ".join(fmt(r["routing_per_task"][t]) for t in tasks)
                     + " |")
lines += ["", "Success per task:", "", *head]
for name, r in runs.items():
    lines.append(f"| {name} | " + " | ".join(f"{r['tasks'][t]['success_rate']:.2f}" for t in tasks)
                 + " |")
for name in (n for n in runs if n.startswith("arrow-k")):
    c = runs[name]["confusion"]
    lines += ["", f"Confusion of {name} (true task x chosen adapter):", "",
              "| true \\ chosen | " + " | ".join(x.removesuffix("-v3") for x in c["cols"]) + " |",
              "|---" * (len(c["cols"]) + 1) + "|"]
    for row, counts in zip(c["rows"], c["counts"]):
        lines.append(f"| {row.removesuffix('-v3')} | " + " | ".join(map(str, counts)) + " |")
(out / "arrow.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
