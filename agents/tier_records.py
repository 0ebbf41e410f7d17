"""A published tier's task records as untrusted input: what ``--restore-from`` checks
before it writes one, and the per-record digests ``--publish`` adds so that an edit
after publishing is seen.

A published ``<protocol>/results.json`` (see `agents.reports`) carries, besides its runs,
``"record_sha256": {"<method>/seed_<s>/<ii>": sha256}``: the content checksum of each task
record (`eva_rl.io.content_sha256`, the one its cell's ``record.json`` carries), taken at
publish time from the checksummed ``record.json`` files, not from ``results.json``. The
digests make accidental or careless edits evident (a success changed by hand); they are
no signature, and whoever recomputes them after an edit is not detected.

    records, total = published_records(tier, "docs/results/bench", "single")
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.protocols import experiment_differences, read_record, run_dir_of, task_dir_of
from agents.reports.results import load_results
from eva_rl.io import content_sha256

if TYPE_CHECKING:
    from agents.protocols import Experiment

logger = logging.getLogger(__name__)

DIGESTS_KEY = "record_sha256"

# what `agents.finetune.finetune_task` writes into every record ...
_RECORD_KEYS = frozenset({
    "task", "index", "method", "seed", "success", "final_episodes", "mean_return",
    "target_return", "trainable_params", "finetune_seconds", "train_seconds", "eval_seconds",
    "eva_seconds", "eva_share", "signature_seconds", "peak_rss_mib", "first_grad_norm",
    "loss_curve", "success_curve", "auc", "eva_ranks", "adalora_ranks", "eva"})
# ... and what `agents.protocols.run_sequential` adds (the last three: routed rows only)
_SEQUENTIAL_KEYS = frozenset({"success_row", "return_row", "row_eval_seconds"})
_ROUTED_KEYS = frozenset({"oracle_success_row", "oracle_row_eval_seconds", "routing"})
_SECONDS = ("finetune_seconds", "train_seconds", "eval_seconds", "eva_seconds",
            "signature_seconds", "peak_rss_mib", "row_eval_seconds", "oracle_row_eval_seconds")


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
            if saved is None or content_sha256(saved) != digest:
                raise ValueError(
                    f"{run_root / 'results.json'}: the record of {run['method']} seed "
                    f"{run['seed']} {rec['task']} is not {tdir / 'record.json'}"
                    f"{' (missing)' if saved is None else ''}; rerun the stage (it rewrites "
                    "results.json from the records) before publishing")
            digests[record_key(run["method"], run["seed"], rec["index"])] = digest
    return digests


def published_records(exp: Experiment, tier_seeds: Sequence[int], published: Path
                      ) -> tuple[list[tuple[str, int, dict[str, Any]]], int]:
    """The task records of ``published/<protocol>/results.json`` that may be restored into
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
    source = published / exp.protocol / "results.json"
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
    if not _is_int(seed) or seed not in tier_seeds:
        raise ValueError(f"{where}: seed {seed!r} is not one of the tier's seeds "
                         f"({', '.join(map(str, tier_seeds))})")
    if run.get("tasks") != list(exp.tasks):
        raise ValueError(f"{where}: its tasks are not the tier's ({', '.join(exp.tasks)})")
    if not isinstance(run.get("config"), dict):
        raise ValueError(f"{where}: no fine-tuning settings ('config')")
    diffs = experiment_differences(run["config"], exp.config.to_dict())
    if diffs:
        raise ValueError(f"{where}: fine-tuned with other settings than the tier's "
                         f"({'; '.join(diffs[:3])})")
    per_task = run.get("per_task")
    if not isinstance(per_task, list) or len(per_task) > len(exp.tasks):
        raise ValueError(f"{where}: 'per_task' must be a list of at most {len(exp.tasks)} "
                         "task records")


def _check_record(rec: Any, run: dict[str, Any], exp: Experiment, where: str) -> None:
    """One task record, as `finetune_task` (and `run_sequential`) write it."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a task record is not an object")
    index = rec.get("index")
    if not _is_int(index) or not 0 <= index < len(exp.tasks):
        raise ValueError(f"{where}: record index {index!r} is not a task index "
                         f"(0..{len(exp.tasks) - 1})")
    if rec.get("task") != exp.tasks[index]:
        raise ValueError(f"{where}: record {index} is of task {rec.get('task')!r}, but task "
                         f"{index} is {exp.tasks[index]}")
    where = f"{where} {exp.tasks[index]}"
    keys = _RECORD_KEYS | (_SEQUENTIAL_KEYS if exp.protocol == "sequential" else set())
    missing = sorted(keys - set(rec))
    extra = sorted(set(rec) - keys - (_ROUTED_KEYS if exp.protocol == "sequential" else set()))
    if missing or extra:
        raise ValueError(f"{where}: not a task record as a cell writes it (missing: "
                         f"{', '.join(missing) or '-'}; unknown: {', '.join(extra) or '-'})")
    if rec["method"] != run["method"] or rec["seed"] != run["seed"]:
        raise ValueError(f"{where}: the record names {rec['method']!r} seed {rec['seed']!r}, "
                         "not its run's")
    _number(rec, "success", where, 0.0, 1.0)
    _number(rec, "auc", where, 0.0, 1.0)
    _number(rec, "eva_share", where, 0.0, 1.0)
    _number(rec, "mean_return", where)
    _number(rec, "target_return", where)
    for key in _SECONDS:
        if key in rec:
            _number(rec, key, where, 0.0)
    if rec["first_grad_norm"] is not None:
        _number(rec, "first_grad_norm", where, 0.0)
    if rec["final_episodes"] != exp.config.final_episodes:
        raise ValueError(f"{where}: final_episodes {rec['final_episodes']!r}, but the tier's "
                         f"{exp.protocol} stage evaluates {exp.config.final_episodes}")
    if not _is_int(rec["trainable_params"]) or rec["trainable_params"] < 1:
        raise ValueError(f"{where}: trainable_params must be a positive integer, got "
                         f"{rec['trainable_params']!r}")
    _check_curves(rec, where)
    for key in ("eva_ranks", "adalora_ranks", "eva", "routing"):
        if rec.get(key) is not None and not isinstance(rec[key], dict):
            raise ValueError(f"{where}: {key} must be an object or null")
    if exp.protocol == "sequential":
        for key, hi in (("success_row", 1.0), ("return_row", None),
                        ("oracle_success_row", 1.0)):
            if key in rec:
                _row(rec, key, len(exp.tasks), where, hi)


def _check_curves(rec: dict[str, Any], where: str) -> None:
    """``success_curve`` and ``loss_curve`` well formed; the record's success and mean
    return are the curve's last point (as `finetune_task` takes them)."""
    curve = rec["success_curve"]
    if not (isinstance(curve, dict) and set(curve) == {"steps", "success", "return"}
            and all(isinstance(curve[k], list) for k in curve)
            and len(curve["steps"]) == len(curve["success"]) == len(curve["return"]) > 0):
        raise ValueError(f"{where}: success_curve must hold equally long, non-empty lists "
                         "steps, success and return")
    _row(curve, "success", len(curve["steps"]), where, 1.0, "success_curve.")
    _row(curve, "return", len(curve["steps"]), where, None, "success_curve.")
    if not all(_is_int(s) and s >= 0 for s in curve["steps"]):
        raise ValueError(f"{where}: success_curve.steps must be update counts")
    if curve["success"][-1] != rec["success"] or curve["return"][-1] != rec["mean_return"]:
        raise ValueError(f"{where}: success {rec['success']!r} / mean_return "
                         f"{rec['mean_return']!r} are not the last point of its success curve "
                         f"({curve['success'][-1]!r} / {curve['return'][-1]!r}): the record "
                         "was edited")
    loss = rec["loss_curve"]
    if not (isinstance(loss, dict) and set(loss) == {"steps", "loss"}
            and isinstance(loss["steps"], list) and isinstance(loss["loss"], list)
            and len(loss["steps"]) == len(loss["loss"])
            and all(_is_int(s) for s in loss["steps"])
            and all(v is None or _is_finite(v) for v in loss["loss"])):
        raise ValueError(f"{where}: loss_curve must hold equally long lists steps (integers) "
                         "and loss (numbers)")


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _number(rec: Mapping[str, Any], key: str, where: str, lo: float | None = None,
            hi: float | None = None, prefix: str = "") -> None:
    value = rec[key]
    if not _is_finite(value) or (lo is not None and value < lo) or (hi is not None
                                                                    and value > hi):
        bounds = ("" if lo is None and hi is None else
                  f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}")
        raise ValueError(f"{where}: {prefix}{key} must be a finite number{bounds}, "
                         f"got {value!r}")


def _row(rec: Mapping[str, Any], key: str, length: int, where: str, hi: float | None,
         prefix: str = "") -> None:
    values = rec[key]
    if not isinstance(values, list) or len(values) != length:
        raise ValueError(f"{where}: {prefix}{key} must be a list of {length} numbers")
    for i, value in enumerate(values):
        _number({f"{key}[{i}]": value}, f"{key}[{i}]", where, 0.0 if hi else None, hi, prefix)
