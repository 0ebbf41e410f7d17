r"""How the ``eva`` router's settings (score, signature rank) route episode starts, from the
data alone: no env, no fine-tuning, seconds per setting.

For each task: its signature on a pretrained base (`agents.finetune.method_task_signature`,
the code fine-tuning runs, at each --ranks), then the windows a router would decide on after k
observations (k of --ks) of the last --episodes episodes of every task's dataset,
conditioned as a rollout is on the largest target return of the tasks (the task is not
known yet). Prints routing accuracy (mean over tasks and the worst task) and the unknown
rate per score, rank and k; --out writes them as JSON. The episodes are also in the data the
signatures were computed from (in-sample): this is for choosing settings, the rollouts of
`scripts/evaluate.py --routing eva` are the measurement.

The bench tier's router settings were chosen with it on the MT40 tasks held out of the
tier's pretraining, never on CW10 (docs/benchmarks.md):
    python scripts/bench/bench_routing_starts.py --pretrained runs/bench/pretrained \
        --data runs/bench/data --tasks stick-push,peg-insert-side,sweep-into,coffee-push,door-close
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from agents.dt_agent import DTAgent
from agents.finetune import method_task_signature
from agents.finetune_config import get_config
from agents.methods import get_method
from agents.routing import base_features, episode_prefix_batch
from envs import resolve_tasks
from eva_rl.data import open_datasets
from eva_rl.routing import SCORES, SignaturePool
from eva_rl.training.run import default_target_return

from common import NOISY


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", type=Path, required=True, help="pretraining run directory")
    p.add_argument("--data", type=Path, required=True, help="dataset root, one directory per task")
    p.add_argument("--tasks", required=True, help="tasks to route among (names or a suite)")
    p.add_argument("--config", default="bench", help="fine-tuning config of the EVA settings")
    p.add_argument("--ranks", default="4,12,24", help="signature ranks")
    p.add_argument("--ks", default="1,5,20", help="observations before the decision")
    p.add_argument("--episodes", type=int, default=30, help="last episodes of each task")
    p.add_argument("--out", type=Path, help="write the table as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    tasks = resolve_tasks(args.tasks)
    agent = DTAgent.load(args.pretrained, device="cpu")
    datasets = open_datasets(args.data, dict.fromkeys(tasks))
    config = get_config(args.config)
    target = max(default_target_return(d) for d in datasets.values())
    ks = [int(k) for k in args.ks.split(",")]
    print(f"# bench_routing_starts: {len(tasks)} tasks, last {args.episodes} episodes each, "
          f"target return {target:.0f} before the decision ({NOISY})")
    print(f"{'score':<9} {'rank':>4} {'k':>3}  accuracy  worst task           unknown")
    rows = []
    for rank in (int(r) for r in args.ranks.split(",")):
        pool = SignaturePool()
        at_rank = config.replace(signature_rank=rank)
        for task in tasks:  # as fine-tuning writes them for an adapter method (not EVA's own)
            pool.add(method_task_signature(agent, task, datasets[task], get_method("lora"),
                                           at_rank, seed=0))
        layers = list(next(iter(pool.signatures.values())).layers)
        for k in ks:
            feats = {}
            for task in tasks:
                n = datasets[task].n_episodes
                episodes = range(max(0, n - args.episodes), n)
                batch = episode_prefix_batch(agent, datasets[task], episodes, k, target)
                feats[task] = base_features(agent.model, layers, batch)
            for score in SCORES:
                per_task, unknown = {}, []
                for task, (rows_, window, keys) in feats.items():
                    chosen = pool.route_subspace(rows_, window, len(keys["obs"]), score)
                    per_task[task] = float(np.mean([c == task for c in chosen]))
                    unknown += [c is None for c in chosen]
                worst = min(per_task, key=per_task.get)
                row = {"score": score, "rank": rank, "k": k, "per_task": per_task,
                       "accuracy": float(np.mean(list(per_task.values()))),
                       "unknown_rate": float(np.mean(unknown))}
                rows.append(row)
                print(f"{score:<9} {rank:>4} {k:>3}  {row['accuracy']:8.2f}  "
                      f"{per_task[worst]:.2f} {worst[:14]:<14}  {row['unknown_rate']:7.2f}",
                      flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"tasks": tasks, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
