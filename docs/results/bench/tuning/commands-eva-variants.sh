#!/usr/bin/env bash
# EVA's variants for the Decision Transformer's interleaved tokens on the held-out MT40 tasks
# that carry signal (never CW10). Needs the tier's data and pretrained model:
#   python scripts/tier.py --tier bench --out runs/bench --stages collect,pretrain
set -euo pipefail
ROOT=${ROOT:-runs/bench}
OUT=${OUT:-runs/heldout/lr1e-2}
python scripts/finetune.py --pretrained $ROOT/pretrained --data $ROOT/data --protocol single \
    --methods lora,eva,eva_state,eva_type_centered,eva_lora_norm \
    --tasks peg-insert-side,sweep-into,coffee-push,door-close --seeds 0,1,2 --config bench \
    --lr 0.01 --no-progress --out $OUT
