#!/usr/bin/env bash
# The EVA family's token handling at the learning rate the bench-tuned tier chose (3e-2),
# on its held-out tuning tasks and seeds, with its tuning cells' evaluation (one, after
# 500 updates, 20 episodes); never CW10. The tier's grid tried every-token EVA at 1e-2
# only, so at the chosen point token handling and learning rate were confounded; this runs
# both at 3e-2 on one base model. Needs a tier run's data and pretrained model:
#   python scripts/tier.py --tier bench-tuned --out runs/bench-tuned --stages collect,pretrain
set -euo pipefail
ROOT=${ROOT:-runs/bench-tuned}
OUT=${OUT:-runs/heldout/eva-tokens-3e-2}
COMMON=(--pretrained "$ROOT/pretrained" --data "$ROOT/data" --protocol single
        --methods eva,eva_dora,eva_reverse --tasks peg-insert-side,sweep-into,coffee-push
        --seeds 0,1,2 --config bench --lr 0.03 --eval-every 0 --no-eval-at-start
        --final-eval-episodes 20 --executor "${EXECUTOR:-local}" --no-progress)
python scripts/finetune.py "${COMMON[@]}" --out "$OUT/all-tokens"
python scripts/finetune.py "${COMMON[@]}" --eva-token-types state --out "$OUT/state-tokens"
