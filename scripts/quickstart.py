"""The whole experiment in miniature, in a few minutes on 2 CPU cores.

1. collect a small scripted-expert dataset (noise spread 0-0.5) for a few MT40 tasks and
   two CW10 tasks;
2. pretrain a tiny Decision Transformer on the MT40 part (`eva_rl.training.pretrain`);
3. fine-tune `lora`, `eva` and `eva_dora` sequentially on the two CW10 tasks, evaluate
   after each task (success matrix), and write the report, plots and tensorboard logs;
4. print, per method and task, the success before fine-tuning (the success curve's
   update-0 point: for these adapter methods the pretrained model's zero-shot success) and
   after it, side by side.

Re-runnable: a second run reuses every finished step (datasets, the pretrained model,
finished tasks) and continues an interrupted one, wherever it was interrupted (even
before pretraining's first checkpoint). Every setting and --out are checked before step 1.

Example:
    python scripts/quickstart.py --out runs/quickstart
    tensorboard --logdir runs/quickstart
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from agents.collection import collect_datasets
from agents.experts import ScriptedCollector
from agents.finetune_config import get_config
from agents.protocols import Experiment, run_experiment
from agents.reports import format_table, summarize, write_report
from eva_rl.io import check_writable, write_json_atomic
from eva_rl.threads import DEFAULT_THREADS, THREADS_HELP, set_threads
from eva_rl.training import WEIGHTS_FILE, PretrainConfig, pretrain, pretrain_train_config

from script_cli import InputError, ScriptParser, script_main

PRETRAIN_TASKS = ("reach-v3", "door-open-v3", "drawer-close-v3", "button-press-v3",
                  "plate-slide-v3", "window-open-v3")
FINETUNE_TASKS = ("faucet-close-v3", "window-close-v3")
METHODS = ("lora", "eva", "eva_dora")
# Chosen by measurement when the quickstart was made: with 10 expert episodes per task,
# `eva` and `eva_dora` solve window-close (zero-shot 0.1-0.2) within ~100 updates at lr
# 3e-3, while longer runs or 30 episodes of data made its success swing between 0 and 1.
# What it prints on the development machine: docs/benchmarks.md, "The quickstart".
FINETUNE_STEPS = 100
FINETUNE_LR = 3e-3
EVAL_EPISODES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/quickstart", help="where everything goes")
    p.add_argument("--episodes", type=int, default=10, help="expert episodes per task")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=FINETUNE_STEPS,
                   help="fine-tuning updates per task")
    p.add_argument("--lr", type=float, default=FINETUNE_LR,
                   help="peak learning rate of the adapters")
    p.add_argument("--eval-episodes", type=int, default=EVAL_EPISODES,
                   help="episodes per task and evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def pretrain_settings(steps: int, seed: int, quiet: bool) -> PretrainConfig:
    """The tiny DT's pretraining (validated: bad --pretrain-steps fail here)."""
    return PretrainConfig(preset="tiny", train=pretrain_train_config(
        steps, batch_size=64, lr=1e-3, checkpoint_every=500, seed=seed, device="cpu",
        progress=not quiet))


def pretrain_base(data: Path, out: Path, config: PretrainConfig) -> float:
    """Pretrain the tiny DT (skipped when finished, resumed when interrupted); seconds."""
    if (out / WEIGHTS_FILE).is_file():
        print(f"[2/3] pretrained model exists: {out}")
        return 0.0
    print(f"[2/3] pretraining a tiny DT for {config.train.steps} steps ...")
    result = pretrain(data, PRETRAIN_TASKS, out, config, resume=True)
    if result.history:
        print(f"      loss {result.history[-1][1]:.4f} after {result.history[-1][0]} updates")
    return result.seconds


def effect_table(results: dict, episodes: int) -> str:
    """Per method and task: success at update 0 (zero-shot), after fine-tuning, the gain."""
    lines = [f"success before / after fine-tuning ({episodes} episodes each; before = update 0, "
             "the pretrained model's zero-shot success for these adapter methods)",
             f"{'method':<10} {'task':<18} {'zero-shot':>9} {'fine-tuned':>10} {'gain':>6}"]
    best: tuple[float, str, str] | None = None
    for run in results["runs"]:
        for rec in run["per_task"]:
            curve = rec["success_curve"]
            if not curve["steps"] or curve["steps"][0] != 0:
                continue  # no update-0 point (eval_at_start off)
            before, after = curve["success"][0], rec["success"]
            lines.append(f"{run['method']:<10} {rec['task']:<18} {before:>9.2f} {after:>10.2f} "
                         f"{after - before:>+6.2f}")
            if best is None or after - before > best[0]:
                best = (after - before, run["method"], rec["task"])
    if best is not None:
        lines.append(f"largest gain: {best[0]:+.2f} ({best[1]} on {best[2]})")
    return "\n".join(lines)


@script_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("eva_rl.progress").setLevel(logging.INFO)  # progress lines off a terminal
    set_threads(args.threads)
    out = Path(args.out)
    data, pre, ft = out / "data", out / "pretrain", out / "finetune"
    # every setting and the output location, before step 1 writes anything
    if args.episodes < 1:
        raise InputError(f"--episodes must be >= 1, got {args.episodes}")
    check_writable(out)
    collector = ScriptedCollector(noise=(0.0, 0.1, 0.3, 0.5), max_episode_steps=200)
    pre_config = pretrain_settings(args.pretrain_steps, args.seed, args.no_progress)
    config = get_config("quick").replace(steps=args.steps, lr=args.lr, eval_every=args.steps,
                                         eval_episodes=args.eval_episodes, device="cpu",
                                         progress=not args.no_progress)
    exp = Experiment(pretrained=str(pre), data=str(data), tasks=FINETUNE_TASKS, methods=METHODS,
                     seeds=(args.seed,), protocol="sequential", config=config)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    print(f"[1/3] collecting {args.episodes} expert episodes for {len(PRETRAIN_TASKS)} MT40 "
          f"and {len(FINETUNE_TASKS)} CW10 tasks ...")
    t0 = time.perf_counter()
    summaries = collect_datasets(PRETRAIN_TASKS + FINETUNE_TASKS, collector, args.episodes,
                                 data, seed=args.seed, workers=2,
                                 progress=not args.no_progress)
    times["collect"] = time.perf_counter() - t0
    for s in summaries:
        print(f"      {s.task:<20} {s.status:<9} {s.n_episodes} episodes, "
              f"success {s.success_rate:.2f}, mean return {s.mean_return:.0f}")

    times["pretrain"] = pretrain_base(data, pre, pre_config)

    print(f"[3/3] fine-tuning {', '.join(METHODS)} sequentially on {', '.join(FINETUNE_TASKS)} "
          f"({config.train.steps} updates per task) ...")
    t0 = time.perf_counter()
    results = run_experiment(exp, ft, resume=True, report=False)
    summary = summarize(results)  # the bootstraps are the slow part: once for both
    write_report(results, ft, summary=summary)
    times["finetune"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_all
    write_json_atomic(out / "timings.json", times)

    print()
    print(format_table(summary))
    print()
    print(effect_table(results, args.eval_episodes))
    print(f"\ndone in {times['total']:.0f} s (collect {times['collect']:.0f} s, pretrain "
          f"{times['pretrain']:.0f} s, fine-tune + evaluate {times['finetune']:.0f} s)")
    print(f"report:      {ft / 'report.md'}")
    print(f"plots:       {ft / 'plots'}/")
    print(f"results:     {ft / 'results.json'}, {ft / 'results.csv'}")
    print(f"tensorboard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
