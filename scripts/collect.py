r"""Collect expert trajectory datasets for Meta-World tasks and print a summary per task.

One dataset directory per task is written under --out (resumable: run the same command
again after an interruption and only the unfinished tasks are collected).

Example:
    python scripts/collect.py --tasks CW10 --episodes 20 --out data/cw10 \
        --noise 0,0.1,0.3,0.5 --workers 2
    python scripts/collect.py --tasks reach,push --episodes 5 --out data/sac \
        --collector sac --sac-steps 2000
"""

from __future__ import annotations

import argparse
import logging
import sys

from agents.collection import collect_datasets
from agents.experts import SACCollector, ScriptedCollector
from eva_rl.threads import DEFAULT_THREADS, THREADS_HELP, set_threads

from script_cli import ScriptParser, script_main


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


@script_main
def main(argv: list[str] | None = None) -> int:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--tasks",
        required=True,
        help="suites (CW10, CW20, MT40, MT50) and/or task names, comma-separated",
    )
    p.add_argument("--episodes", type=int, required=True, help="episodes per task")
    p.add_argument("--out", required=True, help="output directory (one dataset per task)")
    p.add_argument("--collector", choices=("scripted", "sac"), default="scripted")
    p.add_argument(
        "--noise",
        type=floats,
        default=(0.0,),
        help="scripted: Gaussian action-noise std, a list cycled per episode",
    )
    p.add_argument(
        "--epsilon",
        type=floats,
        default=(0.0,),
        help="scripted: random-action probability, a list cycled per episode",
    )
    p.add_argument(
        "--sac-steps",
        type=int,
        default=None,
        help="sac: training steps per task (default episodes x 200)",
    )
    p.add_argument(
        "--sac-source",
        choices=("replay", "policy"),
        default="replay",
        help="sac: keep the replay buffer's last episodes, or roll out the policy",
    )
    p.add_argument("--max-episode-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="tasks collected in parallel")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=THREADS_HELP + "; sac only")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over --out although a process on another host holds its lock")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.collector == "sac":  # the scripted experts need no torch (not even its import)
        set_threads(args.threads)  # SAC's networks; each --workers process uses one thread

    # bad settings, task names, conflicting datasets, an unwritable or busy --out: one
    # error line before anything is collected (script_main)
    if args.collector == "scripted":
        collector = ScriptedCollector(
            noise=args.noise, epsilon=args.epsilon, max_episode_steps=args.max_episode_steps
        )
    else:
        steps = args.sac_steps or args.episodes * args.max_episode_steps
        collector = SACCollector(
            train_steps=steps, source=args.sac_source, max_episode_steps=args.max_episode_steps
        )
    summaries = collect_datasets(
        args.tasks,
        collector,
        args.episodes,
        args.out,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
        force_unlock=args.force_unlock,
    )

    header = (
        f"{'task':<28} {'status':<10} {'episodes':>8} {'transitions':>11} "
        f"{'success':>8} {'mean return':>11}"
    )
    print(header)
    print("-" * len(header))
    for s in summaries:
        print(
            f"{s.task:<28} {s.status:<10} {s.n_episodes:>8} {s.n_transitions:>11} "
            f"{s.success_rate:>8.2f} {s.mean_return:>11.1f}"
        )
    total = sum(s.n_transitions for s in summaries)
    print(f"{len(summaries)} task(s), {total} transitions in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
