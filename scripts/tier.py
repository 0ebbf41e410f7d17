r"""Run a benchmark tier end to end, resumably: expert data, pretraining, the `single`
comparison of every method over the reported tasks and seeds, and the `sequential` protocol;
then one report of both.

Every stage continues where an interrupted one stopped (finished datasets, pretraining
checkpoints, finished cells and the latest Trainer checkpoint of a cell in progress), so the
same command is also the resume. Wall-clock seconds per stage add up in ``OUT/costs.json``.
``--publish DIR`` copies the small outputs (results, reports, plots, tier and costs; no
weights or checkpoints) to DIR, e.g. ``docs/results/bench``: a new or empty DIR, or one
holding a publication of the same tier (``--overwrite`` moves any other aside); its
``results.json`` files carry each task record's digest, which ``--restore-from`` checks.

Everything a run reads (the tier, the flags, each stage's inputs, the ``--restore-from``
publication, the ``--publish`` target) is checked before it writes anything, holding
``OUT``'s lock (a second driver on ``OUT`` is refused): a refused run changes no file.

Example:
    python scripts/tier.py --tier bench --out runs/bench --executor ray
    python scripts/tier.py --tier bench --out runs/bench --stages report \
        --publish docs/results/bench
"""

from __future__ import annotations

import argparse
import functools
import logging
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from agents.executors import Executor, LocalExecutor, RayExecutor
from agents.protocols import Experiment, run_experiment
from agents.reports import format_table, load_results, merge_results, summarize, write_report
from agents.tier_records import DIGESTS_KEY, record_digests
from agents.tiers import (
    COSTS_FILE,
    FINGERPRINTS_FILE,
    RESTORABLE_STAGES,
    STAGES,
    TIER_FILE,
    TIERS,
    Tier,
    check_restore_source,
    check_stage,
    check_tier_dir,
    collect_tier_data,
    cost_split,
    fingerprints,
    format_cost_split,
    get_tier,
    prepare_tier_dir,
    pretrain_tier,
    pretrained_on,
    read_costs,
    read_tier_file,
    restore_cells,
    stage_experiment,
    tier_paths,
    timed_stage,
    tune_tier,
)
from agents.tuning import CHOICE_FILE, PLOT_FILE, TUNING_DIR
from agents.tuning import REPORT_FILE as TUNING_REPORT
from eva_rl.io import check_writable, write_json_atomic, write_text_atomic
from eva_rl.runlock import RunLock, is_empty_dir, replace_dir
from eva_rl.training import WEIGHTS_FILE

from script_cli import InputError, ScriptParser, script_main

REPORT_DIR = "report"
COSTS_REPORT = "costs.md"
PUBLISHED = ("results.json", "results.csv", "report.md", "plots", COSTS_REPORT)
FINETUNE_STAGES = ("single", "sequential")
TUNING_PUBLISHED = (CHOICE_FILE, TUNING_REPORT, PLOT_FILE)


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
                   help="a published run of the same tier on the same base model: its "
                        "finished tuning trials' cells, single cells and whole sequential "
                        "chains are taken as done (only the missing ones run)")
    p.add_argument("--publish", help="copy results, reports, plots, tier.json, "
                                     "costs.json and the tuning (choice, table, plot, "
                                     "every trial's results) here (a new or empty "
                                     "directory, or a publication of the same tier)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --publish: move what DIR holds (another tier's publication, "
                        "or other files) aside to DIR.old-<time> instead of refusing")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over --out (and --publish) although a process on another "
                        "host holds its lock")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES + ("report",)]
    if unknown:
        raise InputError(f"unknown stages {', '.join(unknown)}; valid: "
                         f"{', '.join(STAGES + ('report',))}")
    args.stages = [s for s in STAGES + ("report",) if s in stages]
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    if args.restore_from and not set(RESTORABLE_STAGES) & set(args.stages):
        raise InputError("--restore-from is read by the tune, single and sequential stages, "
                         f"and --stages {','.join(args.stages)} runs none of them")
    if args.overwrite and not args.publish:
        raise InputError("--overwrite applies to --publish only (a tier's --out is always "
                         "continued)")
    return args


def check_paths(out: Path, dest: Path | None) -> None:
    """``--publish`` and ``--out`` apart: publishing into the run (or the run into its
    publication) would copy a directory into itself."""
    if dest is None:
        return
    out, dest = out.resolve(), dest.resolve()
    if dest == out or out in dest.parents:
        raise InputError(f"--publish {dest} is --out or inside it; publish to a directory "
                         "of its own (e.g. docs/results/<tier>)")
    if dest in out.parents:
        raise InputError(f"--out {out} is inside --publish {dest}; a publication holds no "
                         "runs (no weights or checkpoints)")


def check_sources(args: argparse.Namespace, tier: Tier, dest: Path | None) -> None:
    """What this run reads or writes outside ``--out``, before it writes anything: the
    ``--restore-from`` publication (every record) and the ``--publish`` target."""
    if args.restore_from:
        for stage in RESTORABLE_STAGES:
            if stage in args.stages:
                check_restore_source(tier, Path(args.restore_from), stage)
    if dest is not None:
        check_publish_target(tier, dest, args.overwrite)


def check_run(args: argparse.Namespace, tier: Tier, out: Path, dest: Path | None) -> None:
    """Everything this run reads in ``out``, before it writes anything (holding its
    lock): ``out`` this tier's or new, writable, its costs readable; the inputs of every
    stage it runs (unless an earlier stage of this run makes them); results to report
    or publish."""
    check_tier_dir(tier, out)
    check_writable(out)
    read_costs(out)
    for i, stage in enumerate(args.stages):
        check_stage(tier, out, stage, after=args.stages[:i])
    if dest is not None:
        if not has_results(out, args.stages):
            raise InputError(f"{out}: no results to publish yet (run the single or "
                             "sequential stage first)")
        if not set(FINETUNE_STAGES) & set(args.stages):  # the results stay as they are
            published_digests(out)
        pretrained_on(out)  # its machine record goes into fingerprints.json


def has_results(out: Path, stages: Sequence[str]) -> bool:
    """Whether ``out`` has fine-tuning results or one of ``stages`` makes them."""
    paths = tier_paths(out)
    return bool(set(FINETUNE_STAGES) & set(stages)) or any(
        (d / "results.json").exists() for d in (paths.single, paths.sequential))


def check_publish_target(tier: Tier, dest: Path, overwrite: bool) -> bool:
    """Whether ``dest`` holds something to move aside before publishing ``tier`` there
    (only with ``overwrite``; else refused): anything but nothing or a publication of
    ``tier``."""
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"--publish {dest} exists and is not a directory")
    check_writable(dest)
    if not dest.exists() or is_empty_dir(dest):
        return False
    try:
        saved = read_tier_file(dest / TIER_FILE)
    except ValueError:
        occupant = f"files that are not a publication of a tier (no readable {TIER_FILE})"
    else:
        if saved == tier:
            return False
        changed = sorted(k for k, v in saved.to_dict().items() if tier.to_dict()[k] != v)
        occupant = (f"the publication of another tier ({saved.name}; differs in: "
                    f"{', '.join(changed)})")
    if not overwrite:
        raise FileExistsError(f"--publish {dest} holds {occupant}; choose another "
                              "directory, or pass --overwrite to move it aside")
    return True


def make_executor(args: argparse.Namespace, tier: Tier) -> Executor:
    """The executor of the fine-tuning stages."""
    if args.executor == "local":
        return LocalExecutor()
    return RayExecutor(address=args.ray_address, cpus_per_cell=tier.threads)


def finetune_stage(tier: Tier, out: Path, protocol: str, executor: Executor,
                   progress: bool, force_unlock: bool = False) -> None:
    """The `single` or `sequential` experiment, continued if it was started."""
    exp, run_dir = stage_experiment(tier, out, protocol)
    run_stage_experiment(exp, run_dir, tier, executor, progress, force_unlock)


def run_stage_experiment(exp: Experiment, run_dir: Path, tier: Tier, executor: Executor,
                         progress: bool, force_unlock: bool = False) -> None:
    """One experiment of a stage (a fine-tuning protocol or a tuning trial), continued if
    it was started, on the tier's threads."""
    exp.config = exp.config.replace(progress=progress)
    torch.set_num_threads(tier.threads)
    run_experiment(exp, run_dir, resume=True, executor=executor, report=True,
                   force_unlock=force_unlock)


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


def published_digests(out: Path) -> dict[str, dict[str, str]]:
    """Per fine-tuning stage with results, the digests of its records
    (`agents.tier_records.record_digests`: ``results.json`` must be its records)."""
    paths = tier_paths(out)
    runs = [*FINETUNE_STAGES, *(p.relative_to(out).as_posix()
                                for p in sorted((out / TUNING_DIR).glob("trial_*")))]
    return {sub: record_digests(load_results(paths.root / sub / "results.json"),
                                paths.root / sub)
            for sub in runs if (paths.root / sub / "results.json").exists()}


def publish(tier: Tier, out: Path, dest: Path, overwrite: bool = False,
            force_unlock: bool = False) -> list[Path]:
    """Copy the small outputs of ``out`` to ``dest`` (replacing earlier copies of this
    tier there; anything else there is refused, or moved aside with ``overwrite``), each
    stage's ``results.json`` with its records' digests, holding ``dest``'s lock."""
    with RunLock(dest, force=force_unlock):
        digests = published_digests(out)
        if check_publish_target(tier, dest, overwrite):
            replace_dir(dest)
        return _copy_outputs(tier, out, dest, digests)


def _publish_results(src: Path, target: Path, digests: dict[str, str]) -> Path:
    """``src`` (a ``results.json``) copied to ``target`` with its records' digests."""
    return write_json_atomic(target, {**load_results(src), DIGESTS_KEY: digests})


def _copy_outputs(tier: Tier, out: Path, dest: Path,
                  digests: dict[str, dict[str, str]]) -> list[Path]:
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
            if name == "results.json" and sub in digests:
                _publish_results(src, target, digests[sub])
            elif src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                shutil.copy2(src, target)
            copied.append(target)
    for name in TUNING_PUBLISHED:  # the tuning table, plot and choice
        src = out / TUNING_DIR / name
        if src.exists():
            (dest / TUNING_DIR).mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copy2(src, dest / TUNING_DIR / name)))
    for sub in digests:  # every trial's records, so that the table can be checked
        if sub.startswith(f"{TUNING_DIR}/"):
            target = dest / sub / "results.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            copied.append(_publish_results(out / sub / "results.json", target, digests[sub]))
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
    dest = Path(args.publish) if args.publish else None
    check_paths(out, dest)
    check_sources(args, tier, dest)
    executor = make_executor(args, tier)
    with RunLock(out, force=args.force_unlock):  # a second driver on OUT is refused here
        check_run(args, tier, out, dest)
        if set(FINETUNE_STAGES) & set(args.stages):
            executor.check()  # e.g. Ray's cluster, before the first stage writes
        prepare_tier_dir(tier, out)
        run_stages(args, tier, out, executor)
        if dest is not None:
            for path in publish(tier, out, dest, args.overwrite, args.force_unlock):
                logging.info("published %s", path)
    return 0


def run_stages(args: argparse.Namespace, tier: Tier, out: Path, executor: Executor) -> None:
    """The stages of ``args.stages`` in order; each checked again (`check_stage`, now that
    the ones before it are done) before its timer starts, so a refused stage adds no cost."""
    progress = not args.no_progress
    t0 = time.perf_counter()
    for stage in args.stages:
        if stage == "tune" and tier.tuning is None:
            continue  # a tier without a tuning grid trains at its own settings
        logging.info("tier %s: stage %s", tier.name, stage)
        check_stage(tier, out, stage)
        if stage == "report":
            print(report_stage(tier, out))
            continue
        if stage in RESTORABLE_STAGES and args.restore_from:
            n = restore_cells(tier, out, args.restore_from, stage)
            logging.info("restored %d finished %s task records from %s", n, stage,
                         args.restore_from)
        with timed_stage(out, stage, peak_rss_mib):
            if stage == "collect":
                collect_tier_data(tier, out, workers=args.workers, progress=progress,
                                  force_unlock=args.force_unlock)
            elif stage == "pretrain":
                pretrain_tier(tier, out, progress, force_unlock=args.force_unlock)
            elif stage == "tune":
                tune_tier(tier, out, functools.partial(
                    run_stage_experiment, tier=tier, executor=executor, progress=progress,
                    force_unlock=args.force_unlock))
            else:
                finetune_stage(tier, out, stage, executor, progress, args.force_unlock)
    print(f"\n{time.perf_counter() - t0:.0f} s this session; costs per stage: "
          f"{out / COSTS_FILE}; report: {out / REPORT_DIR}/report.md")


if __name__ == "__main__":
    sys.exit(main())
