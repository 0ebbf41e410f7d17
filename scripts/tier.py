r"""Run a benchmark tier end to end, resumably: expert data, pretraining, the `single`
comparison of every method over the reported tasks and seeds, and the `sequential` protocol;
then one report of both.

Every stage continues where an interrupted one stopped (finished datasets, pretraining
checkpoints, finished cells and the latest Trainer checkpoint of a cell in progress), so the
same command is also the resume. Wall-clock seconds per stage add up in ``OUT/costs.json``.
``--publish DIR`` copies the small outputs (results, reports, plots, tier and costs; no
weights or checkpoints) to DIR, e.g. ``docs/results/bench``.

Example:
    python scripts/tier.py --tier bench --out runs/bench --executor ray
    python scripts/tier.py --tier bench --out runs/bench --stages report \
        --publish docs/results/bench
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from agents.executors import Executor, LocalExecutor, RayExecutor
from agents.protocols import run_experiment
from agents.reports import format_table, load_results, merge_results, summarize, write_report
from agents.tiers import (
    COSTS_FILE,
    FINGERPRINTS_FILE,
    STAGES,
    TIER_FILE,
    TIERS,
    Tier,
    collect_tier_data,
    cost_split,
    fingerprints,
    format_cost_split,
    get_tier,
    prepare_tier_dir,
    pretrain_tier,
    read_costs,
    restore_cells,
    stage_experiment,
    tier_paths,
    timed_stage,
)
from eva_rl.io import check_writable, write_json_atomic, write_text_atomic
from eva_rl.training import WEIGHTS_FILE

from script_cli import InputError, ScriptParser, script_main

REPORT_DIR = "report"
COSTS_REPORT = "costs.md"
PUBLISHED = ("results.json", "results.csv", "report.md", "plots", COSTS_REPORT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("--tier", required=True,
                   help=f"a tier name ({', '.join(TIERS)}) or the path of a tier.json")
    p.add_argument("--out", required=True, help="the tier's run directory")
    p.add_argument("--stages", default=",".join(STAGES + ("report",)),
                   help="comma list of: " + ", ".join(STAGES + ("report",)))
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where fine-tuning cells run (ray: every core of this machine, or "
                        "--ray-address)")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    p.add_argument("--workers", type=int, default=2, help="collection: tasks in parallel")
    p.add_argument("--restore-from", metavar="DIR",
                   help="a published run of the same tier: its finished single cells and "
                        "whole sequential chains are taken as done (only the missing ones "
                        "run)")
    p.add_argument("--publish", help="copy results, reports, plots, tier.json and "
                                     "costs.json here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES + ("report",)]
    if unknown:
        raise InputError(f"unknown stages {', '.join(unknown)}; valid: "
                         f"{', '.join(STAGES + ('report',))}")
    args.stages = [s for s in STAGES + ("report",) if s in stages]
    return args


def make_executor(args: argparse.Namespace, tier: Tier) -> Executor:
    """The executor of the fine-tuning stages."""
    if args.executor == "local":
        return LocalExecutor()
    return RayExecutor(address=args.ray_address, cpus_per_cell=tier.threads)


def finetune_stage(tier: Tier, out: Path, protocol: str, executor: Executor,
                   progress: bool) -> None:
    """The `single` or `sequential` experiment, continued if it was started."""
    exp, run_dir = stage_experiment(tier, out, protocol)
    exp.config = exp.config.replace(progress=progress)
    torch.set_num_threads(tier.threads)
    run_experiment(exp, run_dir, resume=True, executor=executor, report=True)


def report_stage(tier: Tier, out: Path) -> str:
    """One report of both protocols (so that forward transfer has the `single` runs as
    its reference); returns the summary table."""
    paths = tier_paths(out)
    parts = [load_results(d / "results.json") for d in (paths.single, paths.sequential)
             if (d / "results.json").exists()]
    if not parts:
        raise InputError(f"{out}: no results yet (run the single or sequential stage first)")
    results = merge_results(parts)
    summary = summarize(results)
    write_report(results, out / REPORT_DIR, summary=summary)
    write_text_atomic(out / REPORT_DIR / COSTS_REPORT,
                      f"# Tier {tier.name}: costs\n\n"
                      + format_cost_split(cost_split(read_costs(out), results)))
    return format_table(summary)


def publish(tier: Tier, out: Path, dest: Path) -> list[Path]:
    """Copy the small outputs of ``out`` to ``dest`` (replacing earlier copies there)."""
    check_writable(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (TIER_FILE, COSTS_FILE):
        if (out / name).exists():
            copied.append(Path(shutil.copy2(out / name, dest / name)))
    if (tier_paths(out).pretrained / WEIGHTS_FILE).exists():
        copied.append(write_json_atomic(dest / FINGERPRINTS_FILE,
                                        fingerprints(out, tier.data_tasks)))
    for sub in ("single", "sequential", REPORT_DIR):
        for name in PUBLISHED:
            src = out / sub / name
            target = dest / sub / name
            if not src.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                shutil.copy2(src, target)
            copied.append(target)
    return copied


def peak_rss_mib() -> float:
    """Peak resident memory of this process and of its finished children, MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


@script_main(known=(RuntimeError,))  # RuntimeError: a Ray cell that failed all its retries
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tier = get_tier(args.tier)
    out = Path(args.out)
    progress = not args.no_progress
    executor = make_executor(args, tier)
    if args.publish:
        check_writable(Path(args.publish))
    prepare_tier_dir(tier, out)
    t0 = time.perf_counter()
    for stage in args.stages:
        logging.info("tier %s: stage %s", tier.name, stage)
        if stage == "report":
            print(report_stage(tier, out))
            continue
        with timed_stage(out, stage, peak_rss_mib):
            if stage == "collect":
                collect_tier_data(tier, out, workers=args.workers, progress=progress)
            elif stage == "pretrain":
                pretrain_tier(tier, out, progress)
            else:
                if args.restore_from:
                    n = restore_cells(tier, out, args.restore_from, stage)
                    logging.info("restored %d finished %s task records from %s", n, stage,
                                 args.restore_from)
                finetune_stage(tier, out, stage, executor, progress)
    if args.publish:
        for path in publish(tier, out, Path(args.publish)):
            logging.info("published %s", path)
    print(f"\n{time.perf_counter() - t0:.0f} s this session; costs per stage: "
          f"{out / COSTS_FILE}; report: {out / REPORT_DIR}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
