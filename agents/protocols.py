"""Fine-tuning protocols over a task sequence: ``single`` and ``sequential``; resumable.

- ``single`` (the EVA paper's Table 23): every task fine-tuned from the same pretrained DT,
  one adapter each, evaluated on its own task.
- ``sequential`` (continual): the tasks in order; adapter methods add one adapter per task
  on the frozen base (EVA-initialised on that task's data where the method says so) and the
  task identity selects the adapter at evaluation; ``fft`` trains one model through the
  sequence. After each task every task is evaluated: row ``i`` of the success matrix.

The run directory, its task records and their reading and writing: `agents.runs`.

An experiment is a list of independent *cells* (`Cell`): ``(method, seed, task)`` under
``single``, ``(method, seed)`` (the whole chain) under ``sequential``. `run_cell` runs one
and writes only its directory; an executor (`agents.executors`: here, or on Ray) decides
where cells run, and the driver (`run_experiment`) folds each finished cell's records into
``results.json`` and writes the report. Running a cell again (a resume, or Ray's retry
after its worker died) reads back its finished tasks (adapters / weights reloaded) and
continues a task in progress from its latest Trainer checkpoint; the result equals an
uninterrupted run's on the CPU, whichever executor ran it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.dt_agent import DTAgent
from agents.evaluation import evaluate
from agents.finetune import TaskHook, eval_seed, finetune_task
from agents.finetune_config import FinetuneConfig
from agents.methods import Method, get_method, parse_methods
from agents.routed_agent import RoutedAgent
from agents.routing import SIGNATURE_DIR, load_signature, routing_summary
from agents.runs import (
    RunResults,
    check_same_experiment,
    experiment_differences,
    prepare_run_dir,
    read_record,
    run_dir_of,
    task_dir_of,
    write_record,
)
from envs import resolve_tasks
from eva_rl.adapters import delete_adapter, load_adapter, save_adapter
from eva_rl.data import TrajectoryDataset, open_datasets
from eva_rl.models import DecisionTransformer, DTConfig
from eva_rl.progress import progress_bar
from eva_rl.runlock import RunLock
from eva_rl.training import (
    WEIGHTS_FILE,
    default_target_return,
    load_weights,
    read_run_config,
    resolve_device,
    save_weights,
)

if TYPE_CHECKING:
    from agents.executors import Executor

logger = logging.getLogger(__name__)

PROTOCOLS = ("single", "sequential")


@dataclass
class Experiment:
    """One fine-tuning experiment: a pretrained run, data, tasks, methods, seeds, protocol."""

    pretrained: str
    """Pretraining run directory (what `DTAgent.load` reads)."""
    data: str
    """Dataset root holding ``<task>/`` for every task."""
    tasks: tuple[str, ...]
    """Training order (resolved ``-v3`` names; a suite may repeat tasks, e.g. CW20)."""
    methods: tuple[str, ...]
    """Method names (see `agents.methods.METHODS`)."""
    seeds: tuple[int, ...] = (0,)
    """One run per seed and method."""
    protocol: str = "single"
    """``single`` | ``sequential``."""
    config: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    """Fine-tuning settings."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; valid: {', '.join(PROTOCOLS)}")
        self.tasks = resolve_tasks(self.tasks)
        if not self.tasks:
            raise ValueError("no tasks given")
        self.methods = tuple(m.name for m in parse_methods(self.methods))
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list without repeats, got {self.seeds}")
        if self.protocol == "single" and len(set(self.tasks)) != len(self.tasks):
            raise ValueError("the single protocol trains each task once; drop the repeats")
        # absolute, so a resume that spells the same path differently still matches
        self.pretrained = str(Path(self.pretrained).resolve())
        self.data = str(Path(self.data).resolve())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        return {"pretrained": self.pretrained, "data": self.data, "tasks": list(self.tasks),
                "methods": list(self.methods), "seeds": list(self.seeds),
                "protocol": self.protocol, "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Experiment:
        """Inverse of ``to_dict``."""
        return cls(**{**d, "config": FinetuneConfig.from_dict(d["config"])})

    def differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """``key: old -> new`` for every setting of the ``recorded`` experiment (a run's
        ``config.json``) that differs from this one and that a resume may not change; the
        fine-tuning settings compared as settings (`FinetuneConfig.differences`), so a
        record written flat by older code equals the same settings written nested."""
        config = [f"config.{d}" for d in self.config.differences(recorded.get("config"))]
        return config + experiment_differences(
            {k: v for k, v in recorded.items() if k != "config"},
            {k: v for k, v in self.to_dict().items() if k != "config"})


def check_inputs(exp: Experiment) -> dict[str, TrajectoryDataset]:
    """Validate the device, the pretrained run and the data before anything is written.

    Returns the task datasets. Raises ``ValueError`` (one line, naming the file or value)
    for a device that is not there, a pretrained run that is missing, whose config or
    weights do not load (a truncated ``model.safetensors``, an unknown key under
    ``model``), whose weights hold NaN or inf, or whose dimensions do not match the data,
    and for missing or inconsistent task data."""
    resolve_device(exp.config.train.device)  # cuda without CUDA, gpu0: refused here
    cfg = read_run_config(exp.pretrained)  # CheckpointError (a ValueError) if unusable
    model = cfg["model"]
    weights = Path(exp.pretrained) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{exp.pretrained}: no model.safetensors (pretraining unfinished?)")
    datasets = open_datasets(exp.data, dict.fromkeys(exp.tasks))  # DatasetError names the dir
    for task, ds in datasets.items():
        if (ds.obs_dim, ds.act_dim) != (model["state_dim"], model["act_dim"]):
            raise ValueError(
                f"data for {task} has observation/action dims ({ds.obs_dim}, {ds.act_dim}) but "
                f"the pretrained model {exp.pretrained} expects ({model['state_dim']}, "
                f"{model['act_dim']})")
    horizon = exp.config.eval.max_episode_steps
    if horizon > model["max_ep_len"]:
        raise ValueError(f"max_episode_steps={horizon} exceeds the pretrained model's "
                         f"max_ep_len={model['max_ep_len']}")
    net = DecisionTransformer(DTConfig.from_dict(model))  # an unknown key fails here
    load_weights(net, weights)  # truncated, or not this model's: CheckpointError
    for key, tensor in net.state_dict().items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ValueError(f"{weights}: tensor {key!r} holds NaN or inf; the pretrained "
                             "model is unusable")
    return datasets


# ------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Cell:
    """One unit of an experiment that depends on no other: a method and a seed, and under
    the ``single`` protocol one task (``task_index``); under ``sequential`` the whole task
    chain (``task_index`` None). A cell writes only its own directory (`cell_dir`)."""

    method: str
    seed: int
    task_index: int | None = None

    def indices(self, exp: Experiment) -> range | list[int]:
        """The task indices the cell trains."""
        return range(len(exp.tasks)) if self.task_index is None else [self.task_index]

    def label(self, exp: Experiment) -> str:
        """``lora seed 0 hammer-v3`` (or without the task for a whole chain)."""
        task = "" if self.task_index is None else f" {exp.tasks[self.task_index]}"
        return f"{self.method} seed {self.seed}{task}"


def experiment_cells(exp: Experiment) -> list[Cell]:
    """Every cell of ``exp`` in the order they are run: seeds outermost, so that a run cut
    short holds whole seeds of every method."""
    if exp.protocol == "sequential":
        return [Cell(m, s) for s in exp.seeds for m in exp.methods]
    return [Cell(m, s, i) for s in exp.seeds for m in exp.methods for i in range(len(exp.tasks))]


def cell_dir(out: str | os.PathLike, exp: Experiment, cell: Cell) -> Path:
    """The directory only ``cell`` writes."""
    run = run_dir_of(Path(out), cell.method, cell.seed)
    if cell.task_index is None:
        return run
    return task_dir_of(run, cell.task_index, exp.tasks[cell.task_index])


def cell_finished(out: str | os.PathLike, exp: Experiment, cell: Cell) -> bool:
    """Whether every task of ``cell`` has its record."""
    run = run_dir_of(Path(out), cell.method, cell.seed)
    return all(read_record(task_dir_of(run, i, exp.tasks[i])) is not None
               for i in cell.indices(exp))


class RunDirNotVisible(ValueError):
    """A cell's process cannot see the run directory (not on a shared filesystem)."""


def check_run_dir_visible(out: Path, exp: Experiment) -> None:
    """Before a cell writes: the run directory this process sees is the driver's.

    On a cluster every node must see ``OUT`` (and the data and pretrained run) at the same
    path; without this check a cell on a node that does not would start a run of its own."""
    host = socket.gethostname()
    if not (out / "config.json").is_file():
        raise RunDirNotVisible(
            f"{out}/config.json is not visible on host {host}: the run directory must be on "
            "a filesystem that every Ray node mounts at the same path")
    check_same_experiment(out, exp)


def run_cell(exp: Experiment, out: str | os.PathLike, cell: Cell,
             hook: TaskHook | None = None) -> None:
    """Run (or continue from its latest checkpoint) one cell of ``exp`` under ``out``.

    Anything the cell finished before is read back, not redone, so a cell whose process
    died can simply be called again."""
    out = Path(out).resolve()
    check_run_dir_visible(out, exp)
    tasks = exp.tasks if cell.task_index is None else (exp.tasks[cell.task_index],)
    datasets = open_datasets(exp.data, dict.fromkeys(tasks))
    method = get_method(cell.method)
    run = run_dir_of(out, cell.method, cell.seed)
    if cell.task_index is None:
        run_sequential(exp, datasets, method, cell.seed, run, hook)
    else:
        run_single_task(exp, datasets, method, cell.seed, cell.task_index, run, hook)


def run_experiment(exp: Experiment, out: str | os.PathLike, resume: bool = False,
                   overwrite: bool = False, hook: TaskHook | None = None,
                   report: bool = True, executor: Executor | None = None,
                   force_unlock: bool = False) -> dict[str, Any]:
    """Run (or continue) every cell of ``exp`` while holding ``out``'s `RunLock` (a second
    driver on the same directory is refused; cells, here or on Ray, run under it; see
    `_run_experiment`). ``force_unlock`` breaks a lock held on another host."""
    out = Path(out).resolve()
    with RunLock(out, force=force_unlock):
        return _run_experiment(exp, out, resume=resume, overwrite=overwrite, hook=hook,
                               report=report, executor=executor)


def _run_experiment(exp: Experiment, out: str | os.PathLike, resume: bool = False,
                    overwrite: bool = False, hook: TaskHook | None = None,
                    report: bool = True, executor: Executor | None = None) -> dict[str, Any]:
    """Run (or continue) every cell of ``exp``; returns the results dict.

    ``executor`` decides where cells run (default `LocalExecutor`: here, one after another;
    `RayExecutor`: as Ray tasks). ``hook(task, step)`` runs before every training update
    (raise from it to interrupt). ``results.json`` is rewritten whenever a cell finishes;
    the full report (CSV, report.md, plots, tensorboard) is written at the end when
    ``report``.
    """
    from agents.executors import LocalExecutor

    out = Path(out).resolve()
    executor = executor or LocalExecutor()
    check_inputs(exp)
    executor.check()  # e.g. the Ray cluster and its resources, before anything is written
    prepare_run_dir(out, exp, resume=resume, overwrite=overwrite)
    results = RunResults(out, exp)
    cells = experiment_cells(exp)
    pending = [c for c in cells if not results.finished(c.method, c.seed, c.indices(exp))]
    bar = progress_bar(total=len(cells), initial=len(cells) - len(pending), unit="cell",
                       desc=f"{exp.protocol} cells", disable=not exp.config.train.progress)
    if not executor.in_process:  # the driver shows the cells' bar, not each worker
        exp = dataclasses.replace(exp, config=exp.config.replace(progress=False))
    work = functools.partial(run_cell, exp, out, hook=hook)
    with bar:
        for cell in executor.run(work, pending, label=functools.partial(Cell.label, exp=exp)):
            bar.update(1)
            bar.set_postfix_str(cell.label(exp))
            results.fold(cell.method, cell.seed, cell.indices(exp))
            results.write()
    if report:
        from agents.reports import write_report  # matplotlib: the driver's, not each cell's

        write_report(results.to_dict(), out)  # results.json included
    elif not pending:  # nothing ran: the loop above wrote nothing yet
        results.write()
    return results.to_dict()


def load_agent(exp: Experiment, datasets: Mapping[str, TrajectoryDataset]) -> DTAgent:
    """The pretrained agent, with a target return for every task (its dataset's maximum)."""
    agent = DTAgent.load(exp.pretrained, device=resolve_device(exp.config.train.device),
                          threads=None)
    for task, ds in datasets.items():
        agent.target_returns.setdefault(task, default_target_return(ds))
    return agent


def run_single_task(exp: Experiment, datasets: Mapping[str, TrajectoryDataset],
                    method: Method, seed: int, index: int, run: Path,
                    hook: TaskHook | None = None) -> None:
    """Task ``index`` from the pretrained model; its adapter saved in ``<task>/adapter``."""
    task = exp.tasks[index]
    tdir = task_dir_of(run, index, task)
    if read_record(tdir) is not None:
        return
    agent = load_agent(exp, datasets)
    record = finetune_task(agent, task, datasets[task], method, exp.config, tdir, seed=seed,
                           index=index, hook=hook)
    _save_state(agent, method, task, tdir)
    write_record(tdir, record)


def run_sequential(exp: Experiment, datasets: Mapping[str, TrajectoryDataset], method: Method,
                   seed: int, run: Path, hook: TaskHook | None = None) -> None:
    """The tasks in order on one agent; a success-matrix row after each task.

    With ``config.routing.router`` other than ``oracle`` every row is measured without telling
    the agent the tasks (a `RoutedAgent` whose router picks among the adapters trained so
    far, so misrouting shows as forgetting); the record then also holds the oracle's row
    and the routing accuracy and confusion (`agents.routing.routing_summary`)."""
    routing = exp.config.routing.router_config()
    if routing.router != "oracle" and method.is_full:
        raise ValueError(f"routing={routing.router!r} chooses among task adapters; "
                         f"{method.name} trains one model, there is nothing to route")
    agent = load_agent(exp, datasets)
    routed = None if routing.router == "oracle" else RoutedAgent(agent, routing)
    unique = list(dict.fromkeys(exp.tasks))  # the order `evaluate` runs them in
    policy_eval = functools.partial(
        evaluate, n_episodes=exp.config.eval.final_episode_count, seed=eval_seed(seed),
        max_episode_steps=exp.config.eval.max_episode_steps,
        progress=exp.config.train.progress, stop_on_success=exp.config.eval.stop_on_success)
    row_eval = functools.partial(policy_eval, agent)  # told the tasks: the oracle
    # Told the task, an adapter method acts on a task with the frozen base and that task's
    # own adapter, so a task's row entry changes only when its adapter does: rows evaluate
    # just those tasks (the same episodes, so the same numbers as a whole row).
    reuse_rows = routed is None and not method.is_full
    row_cache: dict[str, dict[str, Any]] = {}
    for i, task in enumerate(exp.tasks):
        tdir = task_dir_of(run, i, task)
        if read_record(tdir) is not None:
            _restore_state(agent, method, task, tdir, routed)
            continue
        record = finetune_task(agent, task, datasets[task], method, exp.config, tdir, seed=seed,
                               index=i, hook=hook, eval_slot=unique.index(task))
        _save_state(agent, method, task, tdir, routed)
        t0 = time.perf_counter()
        if reuse_rows:
            row_cache.pop(task, None)
            row = cached_row(row_eval, unique, row_cache)
        else:
            row = policy_eval(agent if routed is None else routed, unique)
        record = record.replace(
            success_row=[row[t]["success_rate"] for t in exp.tasks],
            return_row=[row[t]["mean_return"] for t in exp.tasks],
            row_eval_seconds=time.perf_counter() - t0)
        if routed is not None:
            t1 = time.perf_counter()
            oracle = row_eval(unique)
            summary = routing_summary(row, agent.adapter_names)
            record = record.replace(
                oracle_success_row=[oracle[t]["success_rate"] for t in exp.tasks],
                oracle_row_eval_seconds=time.perf_counter() - t1,
                routing={"router": routing.router, "decide_after": routing.decide_after,
                         "redecide": routing.redecide,
                         "accuracy_row": [summary["per_task"][t] for t in exp.tasks],
                         **summary})
        write_record(tdir, record)


def cached_row(row_eval: Callable[..., dict[str, dict[str, Any]]], tasks: Sequence[str],
               cache: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A success-matrix row of ``tasks`` told to the agent, evaluating only those missing
    from ``cache`` (each at its slot's env seeds, as in the whole row) and keeping them
    there. ``row_eval(tasks, slots=...)`` is `evaluate` of the agent (told the tasks) with
    the row's settings."""
    missing = [t for t in tasks if t not in cache]
    if missing:
        cache.update(row_eval(missing, slots=[tasks.index(t) for t in missing]))
    return {t: cache[t] for t in tasks}


def _add_signature(routed: RoutedAgent | None, task: str, tdir: Path) -> None:
    """Give the routed agent the finished task's signature (a run written without routing
    has none: routing then names the task that lacks one)."""
    if routed is not None and (tdir / SIGNATURE_DIR).exists():
        routed.add_signature(load_signature(tdir, task, routed.agent.fingerprint()))


def _save_state(agent: DTAgent, method: Method, task: str, tdir: Path,
                routed: RoutedAgent | None = None) -> None:
    """What the next task (or a user) needs of a finished one: its adapter or the weights
    (and, for a `routed` agent, its signature)."""
    if method.is_full:
        save_weights(agent.model, tdir / "model.safetensors")
    else:
        save_adapter(agent.model, task, tdir / "adapter", overwrite=True)
        _add_signature(routed, task, tdir)


def _restore_state(agent: DTAgent, method: Method, task: str, tdir: Path,
                   routed: RoutedAgent | None = None) -> None:
    """Bring the model (and a `routed` agent's signatures) to where they were after the
    finished task ``tdir``."""
    if method.is_full:
        load_weights(agent.model, tdir / "model.safetensors")
    else:
        if task in agent.adapter_names:  # a repeated task (CW20): its adapter trained on
            delete_adapter(agent.model, task)
        load_adapter(agent.model, tdir / "adapter", name=task)
        _add_signature(routed, task, tdir)


def collect_results(out: str | os.PathLike, exp: Experiment) -> dict[str, Any]:
    """The results dict (see `agents.reports`) from the finished task records on disk."""
    return RunResults(out, exp).to_dict()


def parse_seeds(spec: str | Sequence[int]) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; a clear error for anything else."""
    if not isinstance(spec, str):
        return tuple(int(s) for s in spec)
    try:
        return tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"seeds must be a comma list of integers, got {spec!r}") from None
