#!/usr/bin/env bash
# How the `bench` tier's fine-tuning settings were chosen: on the five MT40 tasks that the
# tier holds out of pretraining (agents/tiers.py: tuning_tasks), never on CW10.
# Needs the tier's data and pretrained model:
#   python scripts/tier.py --tier bench --out runs/bench --stages collect,pretrain
# One learning rate for every adapter method (tuned with lora, the baseline) and one for
# fft; 2000 updates with the success curve every 250 updates shows where success saturates.
# (Tried first, lr 1e-3 / fft 3e-4 with lora, eva and fft, stopped after the lora cells:
#  lora reached 0.00 / 0.00 / 0.35 / 1.00 / 1.00 on the five tasks at 2000 updates and was
#  still rising; see README.md of this directory.)
set -euo pipefail
ROOT=${ROOT:-runs/bench}
TUNE=stick-push,peg-insert-side,sweep-into,coffee-push,door-close
for pair in "3e-3 1e-3" "1e-2 3e-3"; do
  set -- $pair
  python scripts/finetune.py --pretrained $ROOT/pretrained --data $ROOT/data --protocol single \
      --methods lora,fft --tasks $TUNE --seeds 0 --config bench \
      --steps 2000 --lr $1 --fft-lr $2 --eval-every 250 --eval-episodes 10 \
      --final-eval-episodes 20 --executor ray --no-progress --out $ROOT/tuning/lr$1 --resume
done
