"""One home for a fine-tuning run on disk: its directory layout, the typed task record (the
only schema of what a finished task leaves), and their reading and writing. Every other
module goes through these names.

Run directory::

    OUT/config.json                                     the experiment (checked on resume)
    OUT/runs/<method>/seed_<s>/<ii>_<task>/record.json  written last: the task is finished
                                                        (checksummed: `write_record`)
                                            .../train/  the Trainer's checkpoints + tensorboard
                                            .../eva/    the EVA result (reused on resume)
                                            .../signature/  the task's routing signature
                                            .../adapter/ or model.safetensors (sequential fft)
    OUT/results.json, results.csv, report.md, plots/, tb/

``results.json`` (format ``eva-rl-results``, version `agents.reports.results.RESULTS_VERSION`)
holds one entry per method x seed with its finished `TaskRecord`s (``per_task``, as dicts).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.reports.results import empty_results, write_json
from eva_rl.io import (
    CHECKSUM_KEY,
    read_json_object,
    read_versioned_json,
    verify_checked_json,
    write_checked_json,
)
from eva_rl.killpoints import kill_point
from eva_rl.runlock import is_empty_dir, replace_dir

if TYPE_CHECKING:
    from agents.protocols import Experiment

logger = logging.getLogger(__name__)

EXPERIMENT_FORMAT = "eva-rl-finetune"
EXPERIMENT_VERSION = 2  # 2: the trainer settings under config.train
CONFIG_FILE = "config.json"
RECORD_FILE = "record.json"
RESULTS_FILE = "results.json"
# settings that may differ between an interrupted run and its resumption
_RESUMABLE = {"progress", "device"}


# ------------------------------------------------------------------------------ layout


def run_dir_of(out: str | os.PathLike, method: str, seed: int) -> Path:
    """Where one (method, seed) run keeps its tasks."""
    return Path(out) / "runs" / method / f"seed_{seed}"


def task_dir_of(run_dir: str | os.PathLike, index: int, task: str) -> Path:
    """Directory of task ``index`` of a run."""
    return Path(run_dir) / f"{index:02d}_{task}"


# ------------------------------------------------------------------------ the record


@dataclass(frozen=True)
class TaskRecord:
    """What a finished task leaves: its numbers after training, how it got there, and
    what it cost. Written by the cell that trained it (``record.json``) and gathered into
    ``results.json``; `from_dict` checks one read back as untrusted input."""

    task: str
    """The task (a ``-v3`` name)."""
    index: int
    """Its position in the experiment's task sequence."""
    method: str
    """The method that trained it (`agents.methods`)."""
    seed: int
    """The run's seed."""
    success: float
    """Success rate on the task after its training (the final evaluation)."""
    final_episodes: int
    """Episodes of that final evaluation."""
    mean_return: float
    """Mean return of those episodes."""
    target_return: float
    """The return-to-go the episodes were conditioned on."""
    trainable_params: int
    """Parameters the method trained."""
    finetune_seconds: float
    """Wall time of the task in the process that finished it."""
    train_seconds: float
    """Of it: the training updates."""
    eval_seconds: float
    """All evaluations of the success curve (kept across a resume)."""
    eva_seconds: float
    """The adapter's data-driven initialisation (EVA, CorDA, LoRA-GA; 0 for none)."""
    eva_share: float
    """``eva_seconds`` / ``finetune_seconds``."""
    signature_seconds: float
    """Computing the task's routing signature."""
    peak_rss_mib: float
    """Peak resident memory of the process so far."""
    first_grad_norm: float | None
    """Gradient norm of the first update (None if the task had none)."""
    loss_curve: dict[str, list]
    """Mean loss per ``log_every`` updates: ``{"steps": [...], "loss": [...]}``."""
    success_curve: dict[str, list]
    """Evaluations during training: ``{"steps", "success", "return"}``; its last point is
    ``success`` / ``mean_return``."""
    auc: float
    """Area under the success curve (Continual World's rule, `eva_rl.metrics.success_auc`)."""
    eva_ranks: dict[str, int] | None
    """Rank per layer where the initializer allocated them (EVA), else None."""
    adalora_ranks: dict[str, int] | None
    """AdaLoRA's final rank per layer, else None."""
    eva: dict[str, Any] | None
    """EVA's run: ``batches_used``, ``stop_reason``, ``seconds``, ``rho`` (None otherwise)."""
    success_row: list[float] | None = None
    """``sequential``: success on every task of the sequence after this one trained (its
    row of the success matrix)."""
    return_row: list[float] | None = None
    """``sequential``: the row's mean returns."""
    row_eval_seconds: float | None = None
    """``sequential``: seconds of the row's evaluation."""
    oracle_success_row: list[float] | None = None
    """Routed ``sequential``: the row when told the tasks."""
    oracle_row_eval_seconds: float | None = None
    """Routed ``sequential``: seconds of that row."""
    routing: dict[str, Any] | None = None
    """Routed ``sequential``: the router, its settings, accuracy and confusion."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (the ``sequential`` and routing fields only where set)."""
        d = dataclasses.asdict(self)
        for name in _LATER_FIELDS:
            if d[name] is None:
                del d[name]
        return d

    def replace(self, **changes: Any) -> TaskRecord:
        """A copy with some fields changed (e.g. a sequential row added)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Any, where: str = "task record") -> TaskRecord:
        """A record read back, checked: exactly this schema's keys, finite numbers in
        range, well-formed curves whose last point is the record's success and return.
        Anything else is a ``ValueError`` starting with ``where``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: a task record is not an object")
        missing = sorted(_REQUIRED - set(d))
        extra = sorted(set(d) - _FIELDS)
        if missing or extra:
            raise ValueError(f"{where}: not a task record (missing: {', '.join(missing) or '-'};"
                             f" unknown: {', '.join(extra) or '-'})")
        _check_values(d, where)
        return cls(**d)


_FIELDS = frozenset(f.name for f in dataclasses.fields(TaskRecord))
_LATER_FIELDS = ("success_row", "return_row", "row_eval_seconds", "oracle_success_row",
                 "oracle_row_eval_seconds", "routing")
_REQUIRED = _FIELDS - set(_LATER_FIELDS)
_SECONDS = ("finetune_seconds", "train_seconds", "eval_seconds", "eva_seconds",
            "signature_seconds", "peak_rss_mib", "row_eval_seconds", "oracle_row_eval_seconds")


def _check_values(d: Mapping[str, Any], where: str) -> None:
    if not isinstance(d["task"], str) or not isinstance(d["method"], str):
        raise ValueError(f"{where}: task and method must be names")
    for key in ("index", "seed"):
        if not is_int(d[key]) or d[key] < 0:
            raise ValueError(f"{where}: {key} must be an integer >= 0, got {d[key]!r}")
    check_number(d, "success", where, 0.0, 1.0)
    check_number(d, "auc", where, 0.0, 1.0)
    check_number(d, "eva_share", where, 0.0, 1.0)
    check_number(d, "mean_return", where)
    check_number(d, "target_return", where)
    for key in _SECONDS:
        if d.get(key) is not None:
            check_number(d, key, where, 0.0)
    if d["first_grad_norm"] is not None:
        check_number(d, "first_grad_norm", where, 0.0)
    for key in ("final_episodes", "trainable_params"):
        if not is_int(d[key]) or d[key] < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {d[key]!r}")
    _check_curves(d, where)
    for key in ("eva_ranks", "adalora_ranks", "eva", "routing"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"{where}: {key} must be an object or null")
    for key, hi in (("success_row", 1.0), ("return_row", None), ("oracle_success_row", 1.0)):
        if d.get(key) is not None:
            check_row(d, key, len(d[key]) if isinstance(d[key], list) else -1, where, hi)


def _check_curves(d: Mapping[str, Any], where: str) -> None:
    curve = d["success_curve"]
    if not (isinstance(curve, dict) and set(curve) == {"steps", "success", "return"}
            and all(isinstance(curve[k], list) for k in curve)
            and len(curve["steps"]) == len(curve["success"]) == len(curve["return"]) > 0):
        raise ValueError(f"{where}: success_curve must hold equally long, non-empty lists "
                         "steps, success and return")
    check_row(curve, "success", len(curve["steps"]), where, 1.0, "success_curve.")
    check_row(curve, "return", len(curve["steps"]), where, None, "success_curve.")
    if not all(is_int(s) and s >= 0 for s in curve["steps"]):
        raise ValueError(f"{where}: success_curve.steps must be update counts")
    if curve["success"][-1] != d["success"] or curve["return"][-1] != d["mean_return"]:
        raise ValueError(f"{where}: success {d['success']!r} / mean_return "
                         f"{d['mean_return']!r} are not the last point of its success curve "
                         f"({curve['success'][-1]!r} / {curve['return'][-1]!r}): the record "
                         "was edited")
    loss = d["loss_curve"]
    if not (isinstance(loss, dict) and set(loss) == {"steps", "loss"}
            and isinstance(loss["steps"], list) and isinstance(loss["loss"], list)
            and len(loss["steps"]) == len(loss["loss"])
            and all(is_int(s) for s in loss["steps"])
            and all(v is None or is_finite(v) for v in loss["loss"])):
        raise ValueError(f"{where}: loss_curve must hold equally long lists steps (integers) "
                         "and loss (numbers)")


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_number(d: Mapping[str, Any], key: str, where: str, lo: float | None = None,
                 hi: float | None = None, prefix: str = "") -> None:
    """``d[key]`` a finite number in ``[lo, hi]``, else a ``ValueError`` naming it."""
    value = d[key]
    if not is_finite(value) or (lo is not None and value < lo) or (hi is not None
                                                                   and value > hi):
        bounds = ("" if lo is None and hi is None else
                  f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}")
        raise ValueError(f"{where}: {prefix}{key} must be a finite number{bounds}, "
                         f"got {value!r}")


def check_row(d: Mapping[str, Any], key: str, length: int, where: str, hi: float | None,
              prefix: str = "") -> None:
    """``d[key]`` a list of ``length`` finite numbers (in ``[0, hi]`` with ``hi``)."""
    values = d[key]
    if not isinstance(values, list) or len(values) != length:
        raise ValueError(f"{where}: {prefix}{key} must be a list of {length} numbers")
    for i, value in enumerate(values):
        check_number({f"{key}[{i}]": value}, f"{key}[{i}]", where, 0.0 if hi else None, hi,
                     prefix)


def read_record(task_dir: str | os.PathLike) -> TaskRecord | None:
    """The finished task's record, or None if the task has not finished.

    A record that is not JSON, was changed after `write_record` wrote it (its checksum
    differs) or does not fit the schema is a ``ValueError`` naming the file."""
    path = Path(task_dir) / RECORD_FILE
    if not path.is_file():
        return None
    record = read_json_object(path, "task record")
    verify_checked_json(path, record, "task record")
    record.pop(CHECKSUM_KEY)
    return TaskRecord.from_dict(record, str(path))


def write_record(task_dir: str | os.PathLike, record: TaskRecord) -> Path:
    """Write a finished task's ``record.json`` (atomically, with its content checksum);
    written last, it marks the task finished."""
    path = write_checked_json(Path(task_dir) / RECORD_FILE, record.to_dict())
    kill_point("finetune.record_written")
    return path


# ------------------------------------------------------------------ the run directory


def prepare_run_dir(out: str | os.PathLike, exp: Experiment, resume: bool = False,
                    overwrite: bool = False) -> Path | None:
    """Create (or check, with ``resume``) the run directory; returns where an old run moved.

    An existing non-empty directory needs ``resume`` (same settings) or ``overwrite``,
    which moves the old run aside to ``OUT.old-<UTC time>`` (nothing is deleted; a
    `RunLock` this process holds on ``OUT`` stays on ``OUT``)."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    moved = None
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    occupied = out.is_dir() and not is_empty_dir(out)
    if occupied and resume:
        check_same_experiment(out, exp)
        return None
    if occupied and not overwrite:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or "
                              "--overwrite to move it aside and start again")
    if resume and not occupied:
        logger.info("%s holds no run yet: starting one", out)
    if occupied:
        moved = replace_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, {"format": EXPERIMENT_FORMAT, "version": EXPERIMENT_VERSION,
                                   "experiment": exp.to_dict()})
    kill_point("finetune.config_written")
    return moved


def read_experiment(out: str | os.PathLike) -> dict[str, Any]:
    """The experiment a run directory was started with (its ``config.json``), as a dict."""
    return read_versioned_json(Path(out) / CONFIG_FILE, EXPERIMENT_FORMAT, EXPERIMENT_VERSION,
                               "fine-tuning run config")["experiment"]


def experiment_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                           prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting (nested ones dotted) that a resume may not
    change (everything but ``progress`` and ``device``)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += experiment_differences(a, b, f"{prefix}{key}.")
        elif key not in _RESUMABLE and a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def check_same_experiment(out: str | os.PathLike, exp: Experiment) -> None:
    """Resuming must continue the same experiment: a one-line error naming differences."""
    diffs = exp.differences(read_experiment(out))
    if diffs:
        raise ValueError(f"{out} was started with other settings ({'; '.join(diffs)}); "
                         "resume with the same options or use --overwrite / a new --out")


class RunResults:
    """The results of a run directory, kept in memory and folded in as cells finish
    (`fold`), so that a finished cell costs reading its own records only."""

    def __init__(self, out: str | os.PathLike, exp: Experiment) -> None:
        self.out = Path(out)
        self.exp = exp
        self._records: dict[tuple[str, int], dict[int, TaskRecord]] = {
            (m, s): {} for m in exp.methods for s in exp.seeds}
        for method, seed in self._records:
            self.fold(method, seed, range(len(exp.tasks)))

    def fold(self, method: str, seed: int, indices: Sequence[int]) -> None:
        """Read the records of tasks ``indices`` of ``method`` x ``seed`` that finished."""
        run = run_dir_of(self.out, method, seed)
        for i in indices:
            record = read_record(task_dir_of(run, i, self.exp.tasks[i]))
            if record is not None:
                self._records[(method, seed)][i] = record

    def finished(self, method: str, seed: int, indices: Sequence[int]) -> bool:
        """Whether every task of ``indices`` of ``method`` x ``seed`` has its record."""
        return all(i in self._records[(method, seed)] for i in indices)

    def to_dict(self) -> dict[str, Any]:
        """The results dict (see `agents.reports`): per method x seed, the records of its
        first tasks up to the first one not finished."""
        exp = self.exp
        results = empty_results({"experiment": exp.to_dict()})
        for method in exp.methods:
            for seed in exp.seeds:
                done = self._records[(method, seed)]
                records = []
                for i in range(len(exp.tasks)):
                    if i not in done:
                        break
                    records.append(done[i].to_dict())
                matrix = returns = None
                if exp.protocol == "sequential":
                    matrix = [rec["success_row"] for rec in records]
                    returns = [rec["return_row"] for rec in records]
                results["runs"].append({
                    "protocol": exp.protocol, "method": method, "seed": seed,
                    "pretrained": exp.pretrained, "tasks": list(exp.tasks), "per_task": records,
                    "success_matrix": matrix, "return_matrix": returns,
                    "config": exp.config.to_dict(),
                })
        return results

    def write(self) -> Path:
        """Write ``results.json`` into the run directory."""
        return write_json(self.out / RESULTS_FILE, self.to_dict())
