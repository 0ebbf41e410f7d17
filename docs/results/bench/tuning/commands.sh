#!/usr/bin/env bash
# How the `bench` tier's fine-tuning settings were chosen: on the five MT40 tasks that the
# tier holds out of pretraining (agents/tiers.py: tuning_tasks), never on CW10.
# Needs the tier's data and pretrained model: python scripts/tier.py --tier bench --out runs/bench --stages collect,pretrain
set -euo pipefail
ROOT=${ROOT:-runs/bench}
TUNE=stick-push,peg-insert-side,sweep-into,coffee-push,door-close
# one learning rate for every adapter method (measured with lora and eva), one for fft;
# 2000 updates with the success curve every 250 updates shows where success saturates
for pair in "1e-3 3e-4" "3e-3 1e-3" "1e-2 3e-3"; do
  set -- $pair
  python scripts/finetune.py --pretrained $ROOT/pretrained --data $ROOT/data --protocol single \
      --methods lora,eva,fft --tasks $TUNE --seeds 0 --config bench \
      --steps 2000 --lr $1 --fft-lr $2 \
      --eval-every 250 --eval-episodes 10 --final-eval-episodes 20 \
      --executor ray --no-progress --out $ROOT/tuning/lr$1 --resume
done
