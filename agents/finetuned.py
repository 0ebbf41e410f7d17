"""Load what a fine-tuning run (`agents.protocols`) trained as one `DTAgent`.

    agent = load_finetuned_agent("runs/cw10-seq", method="eva", seed=0)
    evaluate(agent, agent.run_config["tasks"], routing="eva")

Adapter methods: the pretrained base with every finished task's adapter (a task trained
twice, CW20, with its last visit's) and its routing signature where there is one; the
target return of each task is the one its fine-tuning used. ``fft`` under ``sequential``:
the weights after the last finished task (one model, nothing to route).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from agents.dt_agent import DTAgent
from agents.finetune import finetune_seed, method_task_signature
from agents.methods import get_method
from agents.protocols import Experiment
from agents.routing import SIGNATURE_DIR, load_signature, save_signature
from agents.runs import TaskRecord, read_experiment, read_record, run_dir_of, task_dir_of
from eva_rl.adapters import delete_adapter, load_adapter
from eva_rl.data import open_datasets
from eva_rl.threads import DEFAULT_THREADS
from eva_rl.training import load_weights

logger = logging.getLogger(__name__)


def is_finetune_run(path: str | os.PathLike) -> bool:
    """Whether ``path/config.json`` is a fine-tuning run's (not a pretraining run's)."""
    try:
        read_experiment(path)
    except ValueError:
        return False
    return True


def finished_tasks(out: str | os.PathLike, method: str, seed: int
                   ) -> tuple[Experiment, list[tuple[str, Path, TaskRecord]]]:
    """The experiment of run ``out`` and the (task, task directory, record) of every task
    that run (``method``, ``seed``) finished; a one-line ``ValueError`` if there is none."""
    out = Path(out)
    exp = Experiment.from_dict(read_experiment(out))
    if method not in exp.methods:
        raise ValueError(f"{out}: the run has methods {list(exp.methods)}, not {method!r}")
    if seed not in exp.seeds:
        raise ValueError(f"{out}: the run has seeds {list(exp.seeds)}, not {seed}")
    run = run_dir_of(out, method, seed)
    finished: list[tuple[str, Path, TaskRecord]] = []
    for i, task in enumerate(exp.tasks):
        tdir = task_dir_of(run, i, task)
        record = read_record(tdir)
        if record is None:
            if exp.protocol == "sequential":
                break  # later tasks of a chain cannot have finished
            continue
        finished.append((task, tdir, record))
    if not finished:
        raise ValueError(f"{run}: no finished task to evaluate")
    return exp, finished


def load_finetuned_agent(out: str | os.PathLike, method: str, seed: int,
                         device: torch.device | str | None = None,
                         threads: int | None = DEFAULT_THREADS) -> DTAgent:
    """The agent of run (``method``, ``seed``) of the fine-tuning run ``out``; a one-line
    ``ValueError`` naming what is missing (no such method/seed, no finished task).
    `threads` as `DTAgent.load`'s."""
    out = Path(out)
    exp, finished = finished_tasks(out, method, seed)
    m = get_method(method)
    if m.is_full and exp.protocol == "single":
        raise ValueError(f"{out}: fft under the single protocol holds one model per task; "
                         "evaluate a task's model.safetensors on its own")
    agent = DTAgent.load(exp.pretrained, device=device, threads=threads)
    fingerprint = agent.fingerprint()
    for task, tdir, record in finished:
        agent.target_returns[task] = float(record.target_return)
        if m.is_full:
            continue
        if task in agent.adapter_names:
            delete_adapter(agent.model, task)
        load_adapter(agent.model, tdir / "adapter", name=task)
        if (tdir / SIGNATURE_DIR).exists():
            agent.signatures.add(load_signature(tdir, task, fingerprint), task)
    if m.is_full:
        load_weights(agent.model, finished[-1][1] / "model.safetensors")
    agent.use_adapter(None)
    agent.run_config = {**(agent.run_config or {}), "tasks": [t for t, _, _ in finished],
                        "finetune_run": str(out), "method": method, "seed": seed}
    logger.info("loaded %s %s seed %d: %d tasks", out, method, seed, len(finished))
    return agent


def write_signatures(out: str | os.PathLike, method: str, seed: int, *,
                     rank: int | None = None, force: bool = False,
                     device: torch.device | str | None = None) -> list[Path]:
    """(Re)compute the routing signature of every finished task of run (``method``,
    ``seed``) from its task's data, as fine-tuning does at ``rank`` components per layer
    (default the run's ``signature_rank``); the directories written. Existing signatures
    are kept unless ``force`` (for runs made before signatures, or another rank)."""
    exp, finished = finished_tasks(out, method, seed)
    m = get_method(method)
    if m.is_full:
        raise ValueError(f"{out}: {method} fine-tunes the base itself; it has nothing to route")
    config = exp.config if rank is None else exp.config.replace(signature_rank=rank)
    agent = DTAgent.load(exp.pretrained, device=device, threads=None)
    datasets = open_datasets(exp.data, dict.fromkeys(t for t, _, _ in finished))
    written = []
    for task, tdir, record in finished:
        if (tdir / SIGNATURE_DIR).exists() and not force:
            logger.info("%s: signature kept (use force to replace it)", tdir)
            continue
        sig = method_task_signature(agent, task, datasets[task], m, config,
                                    finetune_seed(seed, record.index))
        written.append(save_signature(sig, tdir))
        logger.info("%s: signature written (rank %d)", tdir, config.routing_signature_rank)
    return written
