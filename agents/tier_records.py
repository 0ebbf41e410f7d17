"""A published tier's task records as untrusted input: what ``--restore-from`` checks
before it writes one, and the per-record digests ``--publish`` adds so that an edit
after publishing is seen.

A published ``<protocol>/results.json`` (see `agents.reports`) carries, besides its runs,
``"record_sha256": {"<method>/seed_<s>/<ii>": sha256}``: the content checksum of each task
record (`eva_rl.io.content_sha256`, the one its cell's ``record.json`` carries), taken at
publish time from the checksummed ``record.json`` files, not from ``results.json``. The
digests make accidental or careless edits evident (a success changed by hand); they are
no signature, and whoever recomputes them after an edit is not detected.

    exp, _ = stage_experiment(tier, "runs/bench", "single")
    records, total = published_records(exp, tier.seeds,
                                       Path("docs/results/bench/single/results.json"))
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.reports.results import load_results
from agents.runs import (
    TaskRecord,
    is_int,
    read_record,
    run_dir_of,
    task_dir_of,
)
from eva_rl.io import content_sha256

if TYPE_CHECKING:
    from agents.protocols import Experiment

logger = logging.getLogger(__name__)

DIGESTS_KEY = "record_sha256"

# what `agents.protocols.run_sequential` adds to every record of a chain
_SEQUENTIAL_KEYS = frozenset({"success_row", "return_row", "row_eval_seconds"})


def record_key(method: str, seed: int, index: int) -> str:
    """The name of a task record in ``record_sha256``: ``lora/seed_0/03``."""
    return f"{method}/seed_{seed}/{index:02d}"


def record_digests(results: Mapping[str, Any], run_root: Path) -> dict[str, str]:
    """``record_sha256`` of a tier stage's ``results`` whose run directory is ``run_root``:
    each record's digest, after checking that it is the content of the cell's checksummed
    ``record.json`` (a ``results.json`` edited since the stage wrote it is refused)."""
    digests = {}
    for run in results["runs"]:
        for rec in run["per_task"]:
            tdir = task_dir_of(run_dir_of(run_root, run["method"], run["seed"]), rec["index"],
                               rec["task"])
            saved = read_record(tdir)  # a record.json edited since it was written: refused
            digest = content_sha256(rec)
            if saved is None or content_sha256(saved.to_dict()) != digest:
                raise ValueError(
                    f"{run_root / 'results.json'}: the record of {run['method']} seed "
                    f"{run['seed']} {rec['task']} is not {tdir / 'record.json'}"
                    f"{' (missing)' if saved is None else ''}; rerun the stage (it rewrites "
                    "results.json from the records) before publishing")
            digests[record_key(run["method"], run["seed"], rec["index"])] = digest
    return digests


def published_records(exp: Experiment, tier_seeds: Sequence[int], source: Path
                      ) -> tuple[list[tuple[str, int, dict[str, Any]]], int]:
    """The task records of a published ``results.json`` (``source``) that may be restored into
    ``exp``'s run directory, each checked as untrusted input: ``([(method, seed, record)],
    total)``, ``total`` the records of the stage published (the share of its cost).

    Every run must be one of ``exp``'s (protocol, tasks, a method and seed of the tier,
    its fine-tuning settings; no run twice), every record what a cell writes (the keys,
    finite numbers in range, an index naming its task, no index twice, success and mean
    return the last point of its curve; under `sequential` rows of every task, the
    matrices of a whole chain made of them) and, where the file has ``record_sha256``,
    its digest equal.
    A file without digests (published before they were added, e.g. docs/results/bench)
    is accepted with a warning: the checks above still hold, edits that keep a record
    consistent are not seen. `sequential` chains are restored whole only. Anything else
    is a ``ValueError`` naming the file, the run and the problem."""
    if not source.exists():
        return [], 0
    results = load_results(source)
    digests = results.get(DIGESTS_KEY)
    if digests is None:
        logger.warning("%s has no record digests (published before they were added): its "
                       "records are checked for consistency, edits to them cannot be seen",
                       source)
    elif not (isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())):
        raise ValueError(f"{source}: {DIGESTS_KEY} must be an object of record -> SHA-256")
    restorable, total, seen = [], 0, set()
    for n, run in enumerate(results["runs"]):
        where = f"{source}: run {n}"
        _check_run(run, exp, tier_seeds, where)
        where = f"{source}: {run['method']} seed {run['seed']}"
        if (run["method"], run["seed"]) in seen:
            raise ValueError(f"{where} appears twice")
        seen.add((run["method"], run["seed"]))
        indices = []
        for rec in run["per_task"]:
            _check_record(rec, run, exp, where)
            if indices and rec["index"] <= indices[-1]:
                raise ValueError(f"{where}: record index {rec['index']} after {indices[-1]} "
                                 "(records must be in task order, each once)")
            indices.append(rec["index"])
            if digests is not None:
                _check_digest(rec, run, digests, where)
        total += len(run["per_task"])
        if exp.protocol == "sequential":
            if len(run["per_task"]) != len(exp.tasks):
                continue  # part of a chain cannot continue without its weights
            _check_matrices(run, where)
        restorable += [(run["method"], run["seed"], rec) for rec in run["per_task"]]
    return restorable, total


def _check_run(run: Any, exp: Experiment, tier_seeds: Sequence[int], where: str) -> None:
    if not isinstance(run, dict):
        raise ValueError(f"{where} is not an object")
    if run.get("protocol") != exp.protocol:
        raise ValueError(f"{where} is of protocol {run.get('protocol')!r}, not {exp.protocol}")
    if run.get("method") not in exp.methods:
        raise ValueError(f"{where}: method {run.get('method')!r} is not one of the tier's "
                         f"{exp.protocol} methods ({', '.join(exp.methods)})")
    seed = run.get("seed")
    if not is_int(seed) or seed not in tier_seeds:
        raise ValueError(f"{where}: seed {seed!r} is not one of the tier's seeds "
                         f"({', '.join(map(str, tier_seeds))})")
    if run.get("tasks") != list(exp.tasks):
        raise ValueError(f"{where}: its tasks are not the tier's ({', '.join(exp.tasks)})")
    if not isinstance(run.get("config"), dict):
        raise ValueError(f"{where}: no fine-tuning settings ('config')")
    diffs = exp.config.differences(run["config"])
    if diffs:
        raise ValueError(f"{where}: fine-tuned with other settings than the tier's "
                         f"({'; '.join(diffs[:3])})")
    per_task = run.get("per_task")
    if not isinstance(per_task, list) or len(per_task) > len(exp.tasks):
        raise ValueError(f"{where}: 'per_task' must be a list of at most {len(exp.tasks)} "
                         "task records")


def _check_record(rec: Any, run: dict[str, Any], exp: Experiment, where: str) -> None:
    """One task record: the schema (`TaskRecord.from_dict`) and its place in this tier."""
    index = rec.get("index") if isinstance(rec, dict) else None
    if isinstance(rec, dict) and not (is_int(index) and 0 <= index < len(exp.tasks)):
        raise ValueError(f"{where}: record index {index!r} is not a task index "
                         f"(0..{len(exp.tasks) - 1})")
    record = TaskRecord.from_dict(rec, where)
    if record.task != exp.tasks[record.index]:
        raise ValueError(f"{where}: record {record.index} is of task {record.task!r}, but task "
                         f"{record.index} is {exp.tasks[record.index]}")
    where = f"{where} {record.task}"
    if exp.protocol == "sequential":
        missing = sorted(k for k in _SEQUENTIAL_KEYS if rec.get(k) is None)
        if missing:
            raise ValueError(f"{where}: not a record of a sequential chain (missing: "
                             f"{', '.join(missing)})")
        for key in ("success_row", "return_row", "oracle_success_row"):
            if rec.get(key) is not None and len(rec[key]) != len(exp.tasks):
                raise ValueError(f"{where}: {key} must be a list of {len(exp.tasks)} numbers")
    elif set(rec) & (_SEQUENTIAL_KEYS | {"routing"}):
        raise ValueError(f"{where}: a single-task record with sequential rows")
    if record.method != run["method"] or record.seed != run["seed"]:
        raise ValueError(f"{where}: the record names {record.method!r} seed {record.seed!r}, "
                         "not its run's")
    final_episodes = exp.config.eval.final_episode_count
    if record.final_episodes != final_episodes:
        raise ValueError(f"{where}: final_episodes {record.final_episodes!r}, but the tier's "
                         f"{exp.protocol} stage evaluates {final_episodes}")


def _check_matrices(run: dict[str, Any], where: str) -> None:
    for matrix, row in (("success_matrix", "success_row"), ("return_matrix", "return_row")):
        if run.get(matrix) != [rec[row] for rec in run["per_task"]]:
            raise ValueError(f"{where}: {matrix} is not made of its records' {row}s")


def _check_digest(rec: dict[str, Any], run: dict[str, Any], digests: Mapping[str, str],
                  where: str) -> None:
    key = record_key(run["method"], run["seed"], rec["index"])
    saved = digests.get(key)
    if saved is None:
        raise ValueError(f"{where} {rec['task']}: no digest {key!r} in {DIGESTS_KEY} (the "
                         "record was added after publishing)")
    if saved != content_sha256(rec):
        raise ValueError(f"{where} {rec['task']}: the record differs from its digest in "
                         f"{DIGESTS_KEY} (edited after publishing)")
