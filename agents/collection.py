"""Collect expert datasets for many tasks: one worker process per task, resumable.

Each task is collected whole by one worker (whole episodes, never per-step messaging:
that is what scales on small machines) and written atomically by
:func:`eva_rl.data.write_dataset` to ``out_dir/<task>``. Running the same collection again
skips every task whose dataset is complete and made with the same settings, removes the
temporary directories a killed run left behind, and redoes only the missing tasks. A
task's data depends only on ``(seed, task name, collector settings, episodes)``, not on
the number of workers or the task order.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import json
import logging
import multiprocessing as mp
import os
import queue as queue_lib
import signal
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.experts import SACCollector, ScriptedCollector
from envs import resolve_task, resolve_tasks
from eva_rl.data import (
    DatasetError,
    TrajectoryDataset,
    is_complete_dataset,
    open_dataset,
    remove_temp_dirs,
    write_dataset,
)
from eva_rl.io import check_writable
from eva_rl.killpoints import kill_point
from eva_rl.progress import progress_bar
from eva_rl.runlock import RunLock

logger = logging.getLogger(__name__)

Collector = ScriptedCollector | SACCollector
# manifest keys that must match for an existing dataset to count as this collection's
_RESUME_KEYS = ("collector", "collector_settings", "seed", "requested_episodes")


@dataclass
class TaskSummary:
    """What one task's dataset holds; ``status`` is ``"collected"`` or ``"existing"``."""

    task: str
    status: str
    n_episodes: int
    n_transitions: int
    success_rate: float
    mean_return: float
    seconds: float
    path: str

    @classmethod
    def of(cls, ds: TrajectoryDataset, status: str, seconds: float) -> TaskSummary:
        return cls(
            task=ds.task,
            status=status,
            n_episodes=ds.n_episodes,
            n_transitions=ds.n_transitions,
            success_rate=float(ds.episode_success.mean()),
            mean_return=float(ds.episode_returns.mean()),
            seconds=seconds,
            path=str(ds.path),
        )


def collection_seed(seed: int, task: str) -> int:
    """The seed of one task's collection: stable across task lists and worker counts."""
    return int(zlib.crc32(task.encode()) ^ (int(seed) * 0x9E3779B1)) % (2**32)


def collection_metadata(collector: Collector, task: str, n_episodes: int, seed: int) -> dict:
    """The manifest metadata of one task's dataset."""
    settings = collector.settings()
    return {
        "collector": collector.name,
        "collector_settings": settings,
        "noise": settings.get("noise", []),
        "epsilon": settings.get("epsilon", []),
        "seed": int(seed),
        "collection_seed": collection_seed(seed, task),
        "requested_episodes": int(n_episodes),
        "max_episode_steps": collector.max_episode_steps,
        "package_versions": collector.package_versions(),
    }


def collect_task(
    task: str,
    collector: Collector,
    n_episodes: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    progress=None,
) -> TaskSummary:
    """Collect one task and write ``out_dir/<task>``; ``progress(n)`` after episodes."""
    task = resolve_task(task)
    start = time.perf_counter()
    traj = collector.collect(
        task, n_episodes, seed=collection_seed(seed, task), progress=progress
    )
    ds = write_dataset(
        Path(out_dir) / task,
        task=task,
        metadata=collection_metadata(collector, task, n_episodes, seed),
        **traj.arrays(),
    )
    kill_point("collect.dataset_written")
    return TaskSummary.of(ds, "collected", time.perf_counter() - start)


def _existing(path: Path, expected: dict[str, Any]) -> TrajectoryDataset | None:
    """The finished dataset at ``path`` if there is one; refuses to touch foreign data."""
    removed = remove_temp_dirs(path)
    if removed:
        logger.info("%s: removed %d half-written director(y/ies); redoing", path, len(removed))
    if not path.exists():
        return None
    if not is_complete_dataset(path):
        raise DatasetError(
            f"{path}: exists but is not a complete dataset; move it away to collect this task"
        )
    ds = open_dataset(path)
    diff = {
        k: (ds.manifest.get(k), expected[k])
        for k in _RESUME_KEYS
        if ds.manifest.get(k) != expected[k]
    }
    if diff:
        detail = "; ".join(f"{k}: on disk {a!r}, requested {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{path}: a dataset made with other settings is already there ({detail}); "
            f"use another output directory or remove it"
        )
    return ds


_progress_queue = None  # set in worker processes by _init_worker


def die_with_parent(parent_pid: int, poll_seconds: float = 0.5) -> None:
    """Make this (worker) process exit when ``parent_pid`` dies, even by ``kill -9``.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, immediate. Everywhere (and as a
    fallback): a daemon thread that exits the process once it has been re-parented."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            logger.debug("prctl unavailable; polling the parent instead")

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)  # the parent is gone: nobody will collect what this worker makes

    if os.getppid() != parent_pid:  # it died before the prctl took effect
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_PR_SET_PDEATHSIG = 1


def _init_worker(q, uses_torch: bool, parent_pid: int) -> None:
    global _progress_queue
    die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the parent stops the workers (no traceback
    # from each of them)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _progress_queue = q
    if uses_torch:  # SAC: one torch thread per worker process, or they fight for cores
        import torch

        torch.set_num_threads(1)


def _worker(task, collector, n_episodes, out_dir, seed) -> TaskSummary:
    q = _progress_queue
    return collect_task(task, collector, n_episodes, out_dir, seed, progress=q.put)


def collect_datasets(
    tasks: str | Sequence[str],
    collector: Collector,
    n_episodes: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    force_unlock: bool = False,
) -> list[TaskSummary]:
    """Collect ``n_episodes`` per task into ``out_dir/<task>``, ``workers`` tasks at once.

    ``tasks``: a suite, a comma list or names (repeats are collected once). Finished
    tasks with the same settings are skipped; a dataset made with other settings, a
    directory that is not a dataset, an ``out_dir`` that cannot be written or that another
    process is collecting into (its `RunLock`; ``force_unlock`` breaks one held on another
    host) raises before any work starts. ``workers=1`` collects in this process; worker
    processes die with it. Returns one :class:`TaskSummary` per task, in task order.
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    names = list(dict.fromkeys(resolve_tasks(tasks)))
    out = Path(out_dir)
    expected = {}
    for task in names:
        try:  # as the manifest will hold it (tuples become lists); fails now, not after work
            expected[task] = json.loads(
                json.dumps(collection_metadata(collector, task, n_episodes, seed))
            )
        except TypeError as err:
            raise ValueError(f"collector settings must be JSON-serialisable: {err}") from None
    check_writable(out)  # an unwritable --out fails now, not after a task's collection
    with RunLock(out, force=force_unlock):
        return _collect_locked(names, expected, collector, n_episodes, out, seed, workers,
                               progress)


def _collect_locked(names, expected, collector, n_episodes, out, seed, workers, progress
                    ) -> list[TaskSummary]:
    """`collect_datasets` once this process owns ``out``."""
    summaries: dict[str, TaskSummary] = {}
    pending = []
    for task in names:
        ds = _existing(out / task, expected[task])
        if ds is None:
            pending.append(task)
        else:
            summaries[task] = TaskSummary.of(ds, "existing", 0.0)
    if summaries:
        logger.info("skipping %d finished task(s): %s", len(summaries), ", ".join(summaries))

    bar = progress_bar(total=len(pending) * n_episodes, unit="ep", desc="collect",
                       disable=not progress)
    try:
        if workers == 1 or len(pending) <= 1:
            for task in pending:
                bar.set_postfix_str(task)
                summaries[task] = collect_task(
                    task, collector, n_episodes, out, seed, progress=bar.update
                )
        elif pending:
            summaries.update(_run_pool(pending, collector, n_episodes, out, seed, workers, bar))
    finally:
        bar.close()
    return [summaries[t] for t in names]


def _run_pool(pending, collector, n_episodes, out, seed, workers, bar) -> dict[str, TaskSummary]:
    ctx = mp.get_context("spawn")  # no fork of a process holding MuJoCo / torch threads
    q = ctx.Queue()
    done: dict[str, TaskSummary] = {}
    pool = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(pending)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(q, isinstance(collector, SACCollector), os.getpid()),
    )
    futures = {
        pool.submit(_worker, task, collector, n_episodes, out, seed): task for task in pending
    }
    try:
        remaining = set(futures)
        while remaining:
            finished, remaining = cf.wait(remaining, timeout=0.2)
            if _drain(q, bar):
                kill_point("collect.workers_running")
            for fut in finished:
                summary = fut.result()  # re-raises a worker's error here
                done[futures[fut]] = summary
                bar.set_postfix_str(f"{len(done)}/{len(pending)} tasks")
        _drain(q, bar)
    except BaseException as err:
        # on a worker's error let the running tasks finish (their datasets are kept);
        # on Ctrl-C / SIGTERM stop the workers now, before the caller releases the lock
        if isinstance(err, KeyboardInterrupt):
            _stop_workers(pool, [out / t for t in pending if t not in done])
        pool.shutdown(wait=not isinstance(err, KeyboardInterrupt), cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return done


def _stop_workers(pool: cf.ProcessPoolExecutor, unfinished: list[Path]) -> None:
    """Terminate the pool's workers, wait for them, and remove the temporary directories
    of the datasets they were writing."""
    # Python < 3.14 has no public ProcessPoolExecutor.terminate_workers()
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(timeout=10)
    for path in unfinished:
        remove_temp_dirs(path)


def _drain(q, bar) -> int:
    """Move the workers' progress messages to the bar; returns how many there were."""
    n = 0
    while True:
        try:
            bar.update(q.get_nowait())
            n += 1
        except queue_lib.Empty:
            return n
