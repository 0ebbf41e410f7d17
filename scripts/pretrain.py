r"""Pretrain a Decision Transformer on offline task datasets and write a run directory.

Opens ``DATA/<task>`` for every task, computes state-normalisation statistics and
per-task target returns (the maximum episode return in each dataset), trains, and
writes ``OUT/config.json``, ``OUT/model.safetensors``, ``OUT/tb/`` and
``OUT/checkpoints/`` (docs/CONTRACTS.md, "Run directory").

Example:
    python scripts/pretrain.py --data data/mt40 --tasks MT40 --preset small \
        --steps 20000 --out runs/pretrain-small
    # continue it (e.g. after an interruption, or to more steps):
    python scripts/pretrain.py --data data/mt40 --tasks MT40 --steps 30000 \
        --out runs/pretrain-small --resume
    # two processes (gloo on CPU, nccl on GPUs), same global batch:
    torchrun --nproc_per_node 2 scripts/pretrain.py --data data/mt40 --tasks MT40 ...
"""

from __future__ import annotations

import argparse
import logging
import sys

import envs
from eva_rl.models import PRESETS
from eva_rl.threads import DEFAULT_THREADS, THREADS_HELP, set_threads
from eva_rl.training import PretrainConfig, init_distributed, pretrain, pretrain_train_config
from eva_rl.training.distributed import cleanup

from script_cli import ScriptParser, script_main

DEFAULTS = PretrainConfig()  # every default below comes from here
TRAIN = DEFAULTS.train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset root holding one directory per task")
    p.add_argument("--tasks", required=True, help="suite name (MT40) or comma list of tasks")
    p.add_argument("--preset", default=DEFAULTS.preset, choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, required=True, help="optimizer updates in total")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its saved model and training "
                        "settings (only --steps may change)")
    p.add_argument("--batch-size", type=int, default=TRAIN.batch_size,
                   help="global batch (all processes)")
    p.add_argument("--grad-accum", type=int, default=TRAIN.grad_accum)
    p.add_argument("--lr", type=float, default=TRAIN.lr)
    p.add_argument("--min-lr", type=float, default=TRAIN.min_lr)
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up updates (default: min(4000, steps // 10))")
    p.add_argument("--weight-decay", type=float, default=TRAIN.weight_decay)
    p.add_argument("--grad-clip", type=float, default=TRAIN.grad_clip)
    p.add_argument("--precision", default=TRAIN.precision, choices=["auto", "fp32", "bf16"])
    p.add_argument("--checkpoint-every", type=int, default=TRAIN.checkpoint_every)
    p.add_argument("--keep-checkpoints", type=int, default=TRAIN.keep_checkpoints)
    p.add_argument("--log-every", type=int, default=TRAIN.log_every)
    p.add_argument("--context-len", type=int, default=DEFAULTS.context_len,
                   help="override the preset's")
    p.add_argument("--dropout", type=float, default=DEFAULTS.dropout,
                   help="override the preset's")
    p.add_argument("--reward-scale", type=float, default=DEFAULTS.reward_scale)
    p.add_argument("--mixing", default=DEFAULTS.mixing, choices=["uniform", "proportional"])
    p.add_argument("--seed", type=int, default=TRAIN.seed)
    p.add_argument("--device", default=TRAIN.device,
                   help="auto (cuda when present), cpu, cuda, cuda:<index>")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over --out although a process on another host holds its lock")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=THREADS_HELP)
    return p.parse_args(argv)


def pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    """The `PretrainConfig` the command line describes."""
    train = pretrain_train_config(
        args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr=args.min_lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, precision=args.precision,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every, seed=args.seed, device=args.device,
        progress=not args.no_progress,
    )
    return PretrainConfig(preset=args.preset, context_len=args.context_len,
                          dropout=args.dropout, reward_scale=args.reward_scale,
                          mixing=args.mixing, train=train)


@script_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    # settings, tasks and the device are checked before the process group or any file
    config = pretrain_config(args)
    tasks = envs.resolve_tasks(args.tasks)
    dist = init_distributed(args.device)
    try:
        result = pretrain(args.data, tasks, args.out, config, resume=args.resume,
                          force_unlock=args.force_unlock)
    finally:
        cleanup()
    if dist.is_main and result.history:
        step, loss, _ = result.history[-1]
        print(f"step {step}: loss {loss:.4f}; {result.seconds:.1f} s this session "
              f"({result.precision}); wrote {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
