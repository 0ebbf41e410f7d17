r"""Rerun one cell of a published tier from nothing and compare it with the published numbers.

Reads the tier from ``RESULTS/tier.json``, remakes what the cell needs in ``--work``
(the expert datasets of the pretraining tasks and of the cell's task, the pretrained
model; all deterministic), fine-tunes that one method x task x seed of the `single`
experiment, and prints its numbers beside those in ``RESULTS/single/results.json``, with a
graded verdict (below). Datasets and the pretrained model are also compared with
``RESULTS/fingerprints.json``, so a difference can be traced to the stage where it began
(a publication without that file is compared on the cell alone, and the output says so).

Everything read from RESULTS is untrusted input and is checked before anything is made:
a file that is missing, not JSON, of the wrong shape, or whose cell record holds a value
of the wrong type, not finite or out of range (success and AUC in [0, 1], returns in
[0, 10 x the episode length], curves lists of finite numbers, digests 64 hex digits), two
records for the cell, or a run made with other fine-tuning settings than the tier's, is one
``error:`` line naming the file, exit 2.

The work directory records what it was made for in ``WORK/reproduce.json``, written
before any work: the tier's whole settings, the publication's fingerprints, and every
cell started there. A work directory made for another tier (or another publication's
fingerprints), or holding files but no such record, is refused (use a fresh ``--work``);
so is one inside the publication or holding it. Reusing the same work directory for the
same tier continues it: finished stages are not redone, and a cell finished there
earlier is compared again without rerunning it (the output says when it finished; delete
its ``cell-*`` directory to run it again).

Verdict (exit status):
  0  identical: every compared value (success, mean_return, auc, success_curve,
     loss_curve, first_grad_norm, trainable_params) equal, as on the same kind of CPU.
  3  equal within float rounding: every success count (the final success and every point
     of the success curve) and trainable_params identical, and every continuous value
     (mean_return, auc, the curves' returns and losses, first_grad_norm) within a relative
     1e-3 or an absolute 1e-6 of the published one: what another CPU kind can give.
  4  consistent: trainable_params and the evaluation and logging steps identical, and the
     rerun's final success count k' of n episodes (n: the tier's final evaluation
     episodes) not distinguishable from the published k of n by a two-sided Fisher exact
     test at the 5% level (p >= 0.05); the other values may differ.
  1  different: anything else, or a published record that contradicts itself (its AUC,
     final success or return not those of its own success curve).
  2  bad input (an argument, a malformed or inconsistent publication, a work directory
     made for something else).

Example:
    python scripts/reproduce.py --results docs/results/bench --method eva --task hammer --seed 0
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from agents.protocols import Cell, run_cell
from agents.reproduction import fingerprint_notes, read_publication
from agents.reproduction_verdict import COMPARED, Verdict, differences, grade
from agents.reproduction_work import (
    WORK_FILE,
    cell_dir,
    cell_key,
    check_apart,
    check_work,
    claim_cell,
    finish_cell,
    read_cell_record,
    start_work_record,
    work_identity,
)
from agents.runs import prepare_run_dir
from agents.tiers import collect_tier_data, pretrain_tier, single_experiment
from agents.tuning import read_choice
from eva_rl.io import check_writable
from eva_rl.runlock import RunLock

from script_cli import InputError, ScriptParser, script_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""  # None under python -OO
    verdicts = doc.find("Verdict (exit status):")
    p = ScriptParser(description=doc.split("\n")[0],
                     epilog=doc[verdicts:doc.find("Example:")] if verdicts >= 0 else None,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="a published tier, e.g. docs/results/bench")
    p.add_argument("--method", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--work", default=None,
                   help="where data, the pretrained model and the cell go (default "
                        f"runs/reproduce-<tier>); it records its tier in {WORK_FILE}")
    p.add_argument("--workers", type=int, default=2, help="collection: tasks in parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def report(published: dict[str, Any], rerun: dict[str, Any], verdict: Verdict) -> None:
    """Print the numbers side by side and the verdict with its reasons."""
    print(f"{'':>14} {'published':>10} {'rerun':>10}")
    for key in ("success", "auc", "mean_return"):
        print(f"{key:>14} {published[key]:>10.4f} {rerun[key]:>10.4f}")
    if verdict.grade == "identical":
        print(f"identical ({', '.join(COMPARED)})")
    elif verdict.grade == "different":
        print(f"DIFFERENT (exit {verdict.exit_code}): {'; '.join(verdict.reasons)}\n  "
              + "\n  ".join(differences(published, rerun)))
    else:
        print(f"{verdict.grade} (exit {verdict.exit_code}): {'; '.join(verdict.reasons)}")
    print(f"largest deviation per key: {verdict.deviation_line()}")


@script_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results_dir = Path(args.results)
    tier, task, published, saved = read_publication(results_dir, args.method, args.task,
                                                    args.seed)
    # a tuned tier's cells train with the settings its tuning stage chose (published)
    chosen = read_choice(results_dir, tier) if tier.tuning is not None else None
    if args.work is None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tier.name):
        raise InputError(f"tier name {tier.name!r} cannot name a directory; pass --work")
    work = Path(args.work or f"runs/reproduce-{tier.name}")
    check_apart(results_dir, work)
    identity = work_identity(tier, saved)
    check_work(work, identity)  # before anything is written
    check_writable(work)
    progress = not args.no_progress
    t0 = time.perf_counter()
    with RunLock(work):
        rec = start_work_record(work, identity)
        needed = list(dict.fromkeys(tier.pretrain_tasks + (task,)))
        collect_tier_data(tier, work, needed, workers=args.workers, progress=progress)
        pretrain_tier(tier, work, progress)

        exp = single_experiment(tier, work, chosen)
        exp.config = exp.config.replace(progress=progress)
        index = tier.tasks.index(task)
        run = cell_dir(work, args.method, task, args.seed)
        key = cell_key(args.method, task, args.seed, index)
        reused = claim_cell(work, rec, key, run)
        if reused is None:
            prepare_run_dir(run, exp, resume=True)
            run_cell(exp, run, Cell(args.method, args.seed, index))
        rerun = read_cell_record(run, key)
        if reused is None:
            finish_cell(work, rec, key, run)
        notes = fingerprint_notes(results_dir, saved, work, needed)

    print(f"{tier.name}: {args.method} x {task} x seed {args.seed} "
          f"({time.perf_counter() - t0:.0f} s, data and pretraining included)")
    if reused is not None:
        print(f"reused the cell finished at {reused} in {run} (this work directory, this "
              "tier); delete that directory to run it again")
    verdict = grade(published, rerun, tier.finetune.eval.final_episode_count)
    report(published, rerun, verdict)
    for note in notes:
        print(f"note: {note}")
    return verdict.exit_code


if __name__ == "__main__":
    sys.exit(main())
