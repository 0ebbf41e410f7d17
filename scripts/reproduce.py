r"""Rerun one cell of a published tier from nothing and compare it with the published numbers.

Reads the tier from ``RESULTS/tier.json``, remakes what the cell needs in ``--work``
(the expert datasets of the pretraining tasks and of the cell's task, the pretrained
model; all deterministic), fine-tunes that one method x task x seed of the `single`
experiment, and prints its numbers beside those in ``RESULTS/single/results.json``. Exits 1
if any differs (on the same kind of CPU they are identical), 0 if all are equal. Datasets
and the pretrained model are also compared with ``RESULTS/fingerprints.json``, so a
difference can be traced to the stage where it began. ``--work`` is reused by a second
call (finished stages are not redone).

Example:
    python scripts/reproduce.py --results docs/results/bench --method eva --task hammer --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from agents.protocols import (
    Cell,
    prepare_run_dir,
    read_record,
    run_cell,
    run_dir_of,
    task_dir_of,
)
from agents.reports import load_results
from agents.tiers import (
    FINGERPRINTS_FILE,
    TIER_FILE,
    collect_tier_data,
    describe_machine,
    fingerprints,
    pretrain_tier,
    read_fingerprints,
    read_tier_file,
    single_experiment,
)
from envs import resolve_task
from eva_rl.io import check_writable

from script_cli import InputError, ScriptParser, script_main

COMPARED = ("success", "mean_return", "auc", "success_curve", "loss_curve", "first_grad_norm",
            "trainable_params")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", required=True, help="a published tier, e.g. docs/results/bench")
    p.add_argument("--method", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--work", default=None,
                   help="where data, the pretrained model and the cell go "
                        "(default runs/reproduce-<tier>)")
    p.add_argument("--workers", type=int, default=2, help="collection: tasks in parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def published_record(results_dir: Path, method: str, task: str, seed: int) -> dict[str, Any]:
    """The record of ``method`` x ``task`` x ``seed`` in the published `single` results."""
    path = results_dir / "single" / "results.json"
    results = load_results(path)
    for run in results["runs"]:
        if run["protocol"] == "single" and run["method"] == method and run["seed"] == seed:
            for rec in run["per_task"]:
                if rec["task"] == task:
                    return rec
    cells = sorted({(r["method"], r["seed"]) for r in results["runs"]})
    raise InputError(f"{path}: no finished cell {method} x {task} x seed {seed} "
                     f"(method/seed pairs there: {', '.join(f'{m}/{s}' for m, s in cells)})")


def differences(published: dict[str, Any], rerun: dict[str, Any]) -> list[str]:
    """The compared fields that differ, each with both values."""
    out = []
    for key in COMPARED:
        if json.dumps(published.get(key), sort_keys=True) != json.dumps(rerun.get(key),
                                                                        sort_keys=True):
            out.append(f"{key}: published {published.get(key)!r} vs rerun {rerun.get(key)!r}")
    return out


def fingerprint_notes(results_dir: Path, work: Path, tasks: list[str]) -> list[str]:
    """Where the remade datasets / pretrained model differ from the published fingerprints."""
    saved = read_fingerprints(results_dir)
    if saved is None:
        return [f"{results_dir / FINGERPRINTS_FILE} is missing: datasets and pretrained model "
                "not compared"]
    now = fingerprints(work, tasks)
    notes = [f"dataset {t}: differs from the published one" for t in tasks
             if saved["data"].get(t) != now["data"].get(t)]
    if saved["pretrained"] != now["pretrained"]:
        notes.append("pretrained model: its weights differ from the published run's (made on "
                     f"{describe_machine(saved.get('machine'))}; this one on "
                     f"{describe_machine(now['machine'])}: float rounding differs between "
                     "CPU kinds, so the cell's numbers may too)")
    return notes


@script_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results_dir = Path(args.results)
    tier = read_tier_file(results_dir / TIER_FILE)
    task = resolve_task(args.task)
    if task not in tier.tasks:
        raise InputError(f"{task} is not a task of tier {tier.name}; its tasks: "
                         f"{', '.join(tier.tasks)}")
    if args.method not in tier.methods:
        raise InputError(f"{args.method} is not a method of tier {tier.name}; its methods: "
                         f"{', '.join(tier.methods)}")
    published = published_record(results_dir, args.method, task, args.seed)
    work = Path(args.work or f"runs/reproduce-{tier.name}")
    check_writable(work)
    progress = not args.no_progress
    t0 = time.perf_counter()

    needed = list(dict.fromkeys(tier.pretrain_tasks + (task,)))
    collect_tier_data(tier, work, needed, workers=args.workers, progress=progress)
    pretrain_tier(tier, work, progress)

    exp = single_experiment(tier, work)
    exp.config = exp.config.replace(progress=progress)
    run = work / f"cell-{args.method}-{task}-seed{args.seed}"
    prepare_run_dir(run, exp, resume=True)
    index = tier.tasks.index(task)
    run_cell(exp, run, Cell(args.method, args.seed, index))
    rerun = read_record(task_dir_of(run_dir_of(run, args.method, args.seed), index, task))

    print(f"{tier.name}: {args.method} x {task} x seed {args.seed} "
          f"({time.perf_counter() - t0:.0f} s, data and pretraining included)")
    print(f"{'':>14} {'published':>10} {'rerun':>10}")
    for key in ("success", "auc", "mean_return"):
        print(f"{key:>14} {published[key]:>10.4f} {rerun[key]:>10.4f}")
    notes = fingerprint_notes(results_dir, work, needed)
    for note in notes:
        print(f"note: {note}")
    diff = differences(published, rerun)
    if diff:
        print("DIFFERENT:\n  " + "\n  ".join(diff))
        return 1
    print(f"identical ({', '.join(COMPARED)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
