r"""Evaluate a pretrained or fine-tuned run: success rate per task, batched rollouts.

`--run` is a pretraining run (`DTAgent.load`: base model plus any `RUN/adapters/<task>/`)
or a fine-tuning run (`scripts/finetune.py --out`; pick one of its runs with `--method` and
`--seed`: the pretrained base with every finished task's adapter). Runs
`--episodes` episodes per task in parallel envs and prints a table; `--out` also writes
the results as JSON.

`--routing eva|obs|embedding|arrow` does not tell the agent the tasks (a `RoutedAgent`,
agents.routed_agent): every episode chooses its adapter itself after `--routing-after`
observations (agents.routing). eva, obs and embedding read the run's task signatures
(scripts/signatures.py writes them for a run that did not route); ``arrow`` needs none,
only the adapters' weights (`--arrow-top-k`, `--arrow-temperature`);
the table and JSON then hold the routing accuracy overall and per task, the unknown-task
rate and the confusion matrix (true task x chosen adapter). `--routing oracle` (default)
gives each task its own adapter.

A task the run has no target return for (e.g. a CW10 task, zero-shot, from an MT40
model) is conditioned on `--target-return` (default: the largest target return the run
knows for any task; Decision Transformers are conditioned on high returns).

Examples:
    python scripts/evaluate.py --run runs/pretrain-small --tasks MT40 --episodes 10 \
        --seed 0 --out runs/pretrain-small/results.json
    python scripts/evaluate.py --run runs/pretrain-small --tasks CW10        # zero-shot
    python scripts/evaluate.py --run runs/cw10-seq --method eva --seed 0 --tasks CW10 \
        --routing eva --out r.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from agents.dt_agent import DTAgent
from agents.evaluation import evaluate
from agents.finetuned import is_finetune_run, load_finetuned_agent, read_signatures
from agents.reports.results import format_accuracy
from agents.routed_agent import RoutedAgent
from agents.routing import (
    BEFORE_DECISION,
    ROUTERS,
    RouterConfig,
    needs_signatures,
    routing_summary,
)
from envs import resolve_tasks
from eva_rl.io import write_json_atomic
from eva_rl.routing import SCORES
from eva_rl.threads import DEFAULT_THREADS, THREADS_HELP, set_threads
from eva_rl.training.run import ADAPTERS_DIR, CONFIG_FILE, WEIGHTS_FILE

from script_cli import ScriptParser, script_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True,
                   help=f"pretraining run ({CONFIG_FILE}, {WEIGHTS_FILE}, {ADAPTERS_DIR}/<task>/) "
                        "or fine-tuning run directory")
    p.add_argument("--method", default=None, help="fine-tuning run: which method's adapters")
    p.add_argument("--seed-run", dest="run_seed", type=int, default=None,
                   help="fine-tuning run: which seed's adapters (default: --seed)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="suite names (CW10, MT40, ...) and/or task names (default for a "
                        "fine-tuning run: its finished tasks)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="env i of the batch gets seed + i; "
                   "also the fine-tuning run's seed unless --seed-run")
    p.add_argument("--max-steps", type=int, default=200, help="episode horizon")
    p.add_argument("--target-return", type=float, default=None,
                   help="target return of tasks the run has none for (default: the largest "
                        "target return the run knows)")
    p.add_argument("--stop-on-success", action="store_true",
                   help="end each episode at its first success (same success rates, fewer "
                        "env steps; returns and lengths up to the success)")
    p.add_argument("--routing", choices=ROUTERS, default="oracle",
                   help="how episodes pick their adapter (oracle: told the task)")
    p.add_argument("--routing-after", type=int, default=RouterConfig.decide_after,
                   help="observations seen before the router decides (the base acts before)")
    p.add_argument("--routing-score", choices=SCORES, default=RouterConfig.score,
                   help="how the eva router scores a window under a task (eva_rl.routing)")
    p.add_argument("--routing-before", choices=BEFORE_DECISION, default=RouterConfig.before,
                   help="who acts before the decision: the best guess so far, or the base model")
    p.add_argument("--routing-redecide", action="store_true",
                   help="let the router decide again at every later step")
    p.add_argument("--arrow-top-k", type=int, default=RouterConfig.arrow_top_k,
                   help="arrow router: adapters sharing each token's weight")
    p.add_argument("--arrow-temperature", type=float, default=RouterConfig.arrow_temperature,
                   help="arrow router: softmax temperature of the token weights")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=THREADS_HELP)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before anything is loaded or written (one-line ValueError)."""
    for name in ("episodes", "max_steps", "routing_after", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.target_return is not None and not torch.isfinite(torch.tensor(args.target_return)):
        raise ValueError(f"--target-return must be finite, got {args.target_return}")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists (pass --overwrite to replace it)")
    if args.out is not None and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory, not a file")


def load_agent(args: argparse.Namespace) -> DTAgent:
    """The agent of --run (a fine-tuning run needs --method)."""
    if is_finetune_run(args.run):
        if args.method is None:
            raise ValueError(f"{args.run} is a fine-tuning run: pass --method (and --seed-run "
                             "if its seed differs from --seed)")
        return load_finetuned_agent(args.run, args.method, run_seed(args), device=args.device)
    if args.method is not None or args.run_seed is not None:
        raise ValueError(f"{args.run} is not a fine-tuning run: --method/--seed-run do not apply")
    return DTAgent.load(args.run, device=args.device)


def run_seed(args: argparse.Namespace) -> int:
    """The seed of the fine-tuning run's adapters: --seed-run, else --seed."""
    return args.seed if args.run_seed is None else args.run_seed


def policy_of(args: argparse.Namespace, agent: DTAgent) -> DTAgent | RoutedAgent:
    """The agent told the tasks (--routing oracle), else a `RoutedAgent` with the --routing
    settings and, for a fine-tuning run and a router that needs them, its signatures."""
    routing = RouterConfig(router=args.routing, decide_after=args.routing_after,
                           redecide=args.routing_redecide, score=args.routing_score,
                           before=args.routing_before, arrow_top_k=args.arrow_top_k,
                           arrow_temperature=args.arrow_temperature)  # checks every value
    if args.routing == "oracle":
        return agent
    signatures = None
    if needs_signatures(args.routing) and is_finetune_run(args.run):
        signatures = read_signatures(args.run, args.method, run_seed(args), agent.fingerprint())
    return RoutedAgent(agent, routing, signatures)


def fill_target_returns(agent: DTAgent, tasks: list[str], target: float | None) -> list[str]:
    """Give every task without a target return `target` (default: the largest known);
    returns the tasks that got one."""
    missing = [t for t in tasks if t not in agent.target_returns]
    if missing:
        if target is None:
            if not agent.target_returns:
                raise ValueError("the run knows no target return: pass --target-return")
            target = max(agent.target_returns.values())
        for t in missing:
            agent.target_returns[t] = float(target)
    return missing


@script_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_args(args)
    set_threads(args.threads)
    agent = load_agent(args)
    specs = args.tasks or (agent.run_config or {}).get("tasks")
    if not specs:
        raise ValueError("pass --tasks (the run lists none)")
    tasks = list(dict.fromkeys(resolve_tasks(
        [t for spec in specs for t in spec.split(",") if t])))
    assumed = fill_target_returns(agent, tasks, args.target_return)
    policy = policy_of(args, agent)
    t0 = time.perf_counter()
    results = evaluate(policy, tasks, n_episodes=args.episodes, seed=args.seed,
                       max_episode_steps=args.max_steps, stop_on_success=args.stop_on_success)
    seconds = time.perf_counter() - t0
    env_steps = int(sum(sum(r["lengths"]) for r in results.values()))
    summary = routing_summary(results, agent.adapter_names) if args.routing != "oracle" else None
    width = max(len(t) for t in results)
    route_head = "  routing acc" if summary else ""
    print(f"{'task':<{width}}  success  mean return  mean length  adapter{route_head}")
    for task, r in results.items():
        acc = f"  {format_accuracy(summary['per_task'][task], 11)}" if summary else ""
        print(f"{task:<{width}}  {r['success_rate']:7.2f}  {r['mean_return']:11.1f}  "
              f"{r['mean_length']:11.1f}  {(r['adapter'] or '-'):<7}{acc}")
    mean = sum(r["success_rate"] for r in results.values()) / len(results)
    print(f"{'mean':<{width}}  {mean:7.2f}   ({args.episodes} episodes per task, seed {args.seed}; "
          f"{env_steps} env steps in {seconds:.1f} s)")
    if summary:
        print(f"routing {args.routing} after {args.routing_after} observations: accuracy "
              f"{format_accuracy(summary['accuracy'])} (of the episodes that decided; "
              f"undecided {summary['undecided_rate']:.2f}), unknown rate "
              f"{summary['unknown_rate']:.2f}")
    if assumed:
        print(f"target return {agent.target_returns[assumed[0]]:.1f} assumed for "
              f"{', '.join(assumed)}")
    if args.out is not None:
        payload = {"run": str(args.run), "method": args.method, "episodes": args.episodes,
                   "seed": args.seed, "max_episode_steps": args.max_steps,
                   "routing": args.routing, "routing_after": args.routing_after,
                   "routing_redecide": args.routing_redecide,
                   "routing_score": args.routing_score,
                   "routing_before": args.routing_before,
                   **({"arrow_top_k": args.arrow_top_k,
                       "arrow_temperature": args.arrow_temperature}
                      if args.routing == "arrow" else {}),
                   "stop_on_success": args.stop_on_success, "assumed_target_return": assumed,
                   "mean_success": mean, "seconds": seconds, "env_steps": env_steps,
                   "tasks": results}
        if summary:
            payload.update(routing_accuracy=summary["accuracy"],
                           routing_per_task=summary["per_task"],
                           unknown_rate=summary["unknown_rate"], confusion=summary["confusion"])
        write_json_atomic(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
