r"""Routing without task labels: accuracy per task and router for several k, success beside
the oracle's, CW20-like repeats, and the added evaluation time.

Builds (or reuses, in --out) scripted-expert data for a few MT40 and CW10 tasks, a DT
pretrained on the MT40 part, and one `sequential` fine-tuning run over the CW10 tasks
(`cpu` config with --steps updates; the oracle's, so every task's signature is written
after the run, `agents.finetuned.write_signatures`, as scripts/signatures.py does).
Then evaluates the run's adapters with every router (``oracle``, ``eva``, ``obs``,
``embedding``) deciding after k observations for each k of --ks, on the same episodes.
Repeats: every task gets a second adapter (a copy) whose signature comes from a fresh
pass over the same data with another seed, as CW20's second visit would make; the ``eva``
router's choices between the two copies are counted.

Example (the figures in docs/benchmarks.md; ~20 minutes on the shared 2-core machine):
    python scripts/bench/bench_routing.py --out /tmp/bench-routing
    # smoke run (the test suite's): tiny sizes
    python scripts/bench/bench_routing.py --out /tmp/r --pretrain-tasks reach \
        --tasks faucet-close,window-close --collect-episodes 2 --collect-steps 30 \
        --preset tiny --pretrain-steps 5 --steps 4 --eval-episodes 1 --max-episode-steps 8 \
        --ks 1,3 --eva-batches 4
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agents.collection import collect_datasets
from agents.evaluation import evaluate
from agents.experts import ScriptedCollector
from agents.finetune_config import get_config
from agents.finetuned import load_finetuned_agent, read_signatures, write_signatures
from agents.protocols import Experiment, run_experiment
from agents.reports.results import format_accuracy
from agents.routed_agent import RoutedAgent
from agents.routing import RouterConfig, routing_summary, task_signature
from envs import resolve_tasks
from eva_rl.adapters import load_adapter, save_adapter
from eva_rl.data import open_datasets
from eva_rl.eva import EvaConfig
from eva_rl.io import write_json_atomic
from eva_rl.training import WEIGHTS_FILE, PretrainConfig, pretrain, pretrain_train_config

from common import NOISY

ROUTED = ("eva", "obs", "embedding")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="work directory (reused when run again)")
    p.add_argument("--pretrain-tasks", default="reach,door-open,drawer-close,button-press")
    p.add_argument("--tasks", default="faucet-close,window-close,drawer-open,push,"
                                      "button-press-topdown")
    p.add_argument("--collect-episodes", type=int, default=10)
    p.add_argument("--collect-steps", type=int, default=200)
    p.add_argument("--preset", default="small", help="DT preset (tiny | small)")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--method", default="lora")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning updates per task")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--max-episode-steps", type=int, default=200)
    p.add_argument("--ks", default="1,5,20", help="observations before the decision")
    p.add_argument("--eva-batches", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_run(args: argparse.Namespace, out: Path) -> tuple[Path, float]:
    """Data, pretrained model and the sequential run (each reused when finished)."""
    pre_tasks = resolve_tasks(args.pretrain_tasks)
    tasks = resolve_tasks(args.tasks)
    data, pre, seq = out / "data", out / "pretrain", out / "seq"
    t0 = time.perf_counter()
    collector = ScriptedCollector(noise=(0.0, 0.1, 0.3), max_episode_steps=args.collect_steps)
    collect_datasets(pre_tasks + tasks, collector, args.collect_episodes, data, seed=args.seed,
                     progress=False)
    if not (pre / WEIGHTS_FILE).is_file():
        pretrain(data, pre_tasks, pre, PretrainConfig(preset=args.preset, train=(
            pretrain_train_config(args.pretrain_steps, batch_size=64, lr=1e-3,
                                  checkpoint_every=0, seed=args.seed, device="cpu",
                                  progress=False))), resume=True)
    config = get_config("cpu").replace(steps=args.steps, warmup_steps=max(1, args.steps // 10),
                                       checkpoint_every=max(1, args.steps), eval_every=0,
                                       eval_at_start=False, eval_episodes=args.eval_episodes,
                                       max_episode_steps=args.max_episode_steps,
                                       eva_max_batches=args.eva_batches, device="cpu",
                                       progress=False)
    exp = Experiment(pretrained=str(pre), data=str(data), tasks=tasks, methods=(args.method,),
                     seeds=(args.seed,), protocol="sequential", config=config)
    run_experiment(exp, seq, resume=True, report=False)
    write_signatures(seq, args.method, args.seed, device="cpu")  # those there are kept
    return seq, time.perf_counter() - t0


def timed_eval(policy, tasks, args) -> tuple[dict, float]:
    """`evaluate` of the agent (told the tasks) or a `RoutedAgent`, and its seconds."""
    t0 = time.perf_counter()
    res = evaluate(policy, tasks, n_episodes=args.eval_episodes, seed=10_000 + args.seed,
                   max_episode_steps=args.max_episode_steps, progress=False)
    return res, time.perf_counter() - t0


def add_repeats(routed: RoutedAgent, tasks, args, out: Path) -> dict[str, str]:
    """A second adapter per task (a copy) with a signature from another pass: {copy: task}."""
    agent = routed.agent
    datasets = open_datasets(out / "data", dict.fromkeys(tasks))
    copies = {}
    for task in tasks:
        name = f"{task}-repeat"
        d = out / "repeat" / task
        save_adapter(agent.model, task, d, overwrite=True)
        load_adapter(agent.model, d, name=name)
        sig = task_signature(agent, task, datasets[task],
                             eva_config=EvaConfig(rank=4, rho=1.0, max_batches=args.eva_batches,
                                                  seed=args.seed + 1),
                             max_batches=args.eva_batches, seed=args.seed + 31)
        routed.add_signature(sig, name)
        agent.target_returns[name] = agent.target_returns[task]
        copies[name] = task
    return copies


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    ks = [int(k) for k in args.ks.split(",")]
    seq, build_seconds = build_run(args, out)
    agent = load_finetuned_agent(seq, args.method, args.seed, device="cpu")
    signatures = read_signatures(seq, args.method, args.seed, agent.fingerprint())
    tasks = agent.run_config["tasks"]
    print(f"# bench_routing: {args.preset} DT pretrained {args.pretrain_steps} updates on "
          f"{args.pretrain_tasks}; {args.method} sequential over {len(tasks)} tasks, "
          f"{args.steps} updates each; {args.eval_episodes} episodes x "
          f"{args.max_episode_steps} steps per task; built in {build_seconds:.0f} s ({NOISY})")
    rows: dict = {"config": vars(args), "routers": {}}
    oracle, t_oracle = timed_eval(agent, tasks, args)
    rows["oracle"] = {"success": {t: oracle[t]["success_rate"] for t in tasks},
                      "seconds": t_oracle}
    short = [t[:-3][:12] for t in tasks]
    print(f"\n{'router':<10} {'k':>3}  " + "  ".join(f"{s:>12}" for s in short)
          + "    all  unknown  success  oracle  eval s  +time")
    o_mean = float(np.mean([oracle[t]["success_rate"] for t in tasks]))
    for router in ROUTED:
        for k in ks:
            routed = RoutedAgent(agent, RouterConfig(router=router, decide_after=k), signatures)
            res, secs = timed_eval(routed, tasks, args)
            s = routing_summary(res, agent.adapter_names)
            succ = float(np.mean([res[t]["success_rate"] for t in tasks]))
            rows["routers"][f"{router}@{k}"] = {
                **s, "success": {t: res[t]["success_rate"] for t in tasks},
                "mean_success": succ, "seconds": secs}
            print(f"{router:<10} {k:>3}  "
                  + "  ".join(format_accuracy(s["per_task"][t], 12) for t in tasks)
                  + f"  {format_accuracy(s['accuracy'], 5)}  {s['unknown_rate']:7.2f}  "
                    f"{succ:7.2f}  {o_mean:6.2f}  "
                    f"{secs:6.1f}  {100 * (secs / t_oracle - 1):+5.1f}%")
    k = 5 if 5 in ks else ks[0]
    routed = RoutedAgent(agent, RouterConfig(router="eva", decide_after=k), signatures)
    copies = add_repeats(routed, tasks, args, out)
    res, secs = timed_eval(routed, tasks, args)
    print(f"\nrepeats (two adapters per task, eva router, k={k}): task-level accuracy "
          "(either copy) and share of episodes on the second copy")
    rep = {}
    for t in tasks:
        chosen = res[t]["routing"]["chosen"]
        either = np.mean([c in (t, f"{t}-repeat") for c in chosen])
        second = np.mean([c == f"{t}-repeat" for c in chosen])
        rep[t] = {"either": float(either), "second_copy": float(second),
                  "success": res[t]["success_rate"]}
        print(f"  {t:<28} either {either:.2f}  second copy {second:.2f}  "
              f"success {res[t]['success_rate']:.2f}")
    rows["repeats"] = {"k": k, "per_task": rep, "copies": copies}
    write_json_atomic(out / "bench_routing.json", rows)
    print(f"\nwrote {out / 'bench_routing.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
