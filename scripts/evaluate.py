r"""Evaluate a pretrained (or fine-tuned) run: success rate per task, batched rollouts.

Loads the run directory with `DTAgent.load` (base model plus any task adapters under
`RUN/adapters/<task>/`; the format is `eva_rl.training.run`'s), runs `--episodes` episodes
per task in parallel envs and prints a table; `--out` also writes the results as JSON.

Example:
    python scripts/evaluate.py --run runs/pretrain-small --tasks MT40 --episodes 10 \
        --seed 0 --out runs/pretrain-small/results.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from agents.dt_agent import DTAgent
from agents.evaluation import evaluate
from eva_rl.io import write_json_atomic
from eva_rl.training.run import ADAPTERS_DIR, CONFIG_FILE, WEIGHTS_FILE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True,
                   help=f"run directory ({CONFIG_FILE}, {WEIGHTS_FILE}, {ADAPTERS_DIR}/<task>/)")
    p.add_argument("--tasks", required=True, nargs="+",
                   help="suite names (CW10, MT40, ...) and/or task names")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--seed", type=int, default=0, help="env i of the batch gets seed + i")
    p.add_argument("--max-steps", type=int, default=200, help="episode horizon")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; 1 is often fastest for small CPU models "
                   "on a busy machine (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out is not None and args.out.exists() and not args.force:
        print(f"error: {args.out} exists (pass --force to replace it)", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        agent = DTAgent.load(args.run, device=args.device)
        tasks = [t for spec in args.tasks for t in spec.split(",") if t]
        results = evaluate(agent, tasks, n_episodes=args.episodes, seed=args.seed,
                           max_episode_steps=args.max_steps)
    except ValueError as err:  # an unusable run (CheckpointError), unknown task, no target
        print(f"error: {err}", file=sys.stderr)
        return 2
    width = max(len(t) for t in results)
    print(f"{'task':<{width}}  success  mean return  mean length  adapter")
    for task, r in results.items():
        print(f"{task:<{width}}  {r['success_rate']:7.2f}  {r['mean_return']:11.1f}  "
              f"{r['mean_length']:11.1f}  {r['adapter'] or '-'}")
    mean = sum(r["success_rate"] for r in results.values()) / len(results)
    print(f"{'mean':<{width}}  {mean:7.2f}   ({args.episodes} episodes per task, seed {args.seed})")
    if args.out is not None:
        payload = {"run": str(args.run), "episodes": args.episodes, "seed": args.seed,
                   "max_episode_steps": args.max_steps, "mean_success": mean, "tasks": results}
        write_json_atomic(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
