#!/usr/bin/env bash
# Does a longer-pretrained base model fine-tune better? On the five MT40 tasks the `bench`
# tier holds out of pretraining (never on CW10): the tier's base model (10k updates) against
# the same recipe pretrained 30k updates (the cosine schedule stretched to 30k), each
# fine-tuned with the tier's settings (`--config bench`: 500 updates, lora lr 1e-2, fft lr
# 1e-3), seed 0. ROOT: the tier's run directory (its data and pretrained model).
set -euo pipefail
ROOT=${ROOT:-runs/bench}
OUT=${OUT:-runs/explore}
PY=${PY:-python}
TUNE=stick-push,peg-insert-side,sweep-into,coffee-push,door-close
$PY - "$ROOT" "$OUT/pre30k" <<'PY'
import dataclasses, sys
import torch
from agents.tiers import get_tier, tier_paths
from eva_rl.training import pretrain
root, out = sys.argv[1], sys.argv[2]
tier = get_tier("bench")
torch.set_num_threads(tier.threads)
train = dataclasses.replace(tier.pretrain.train, steps=30_000, progress=False)
pretrain(tier_paths(root).data, tier.pretrain_tasks, out,
         dataclasses.replace(tier.pretrain, train=train), resume=True)
PY
for pre in "pre10k $ROOT/pretrained" "pre30k $OUT/pre30k"; do
  set -- $pre
  $PY scripts/finetune.py --pretrained $2 --data $ROOT/data --protocol single \
      --methods lora,fft --tasks $TUNE --seeds 0 --config bench --executor ray \
      --no-progress --out $OUT/ft-$1 --resume
done
