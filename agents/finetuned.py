"""Load what a fine-tuning run (`agents.protocols`) trained as one `DTAgent`, or as a
`RoutedAgent` that is not told the tasks.

    agent = load_finetuned_agent("runs/cw10-seq", method="eva", seed=0)
    evaluate(agent, agent.run_config["tasks"])                       # told the tasks
    routed = load_routed_agent("runs/cw10-seq", "eva", 0, RouterConfig(router="eva"))
    evaluate(routed, routed.agent.run_config["tasks"])               # routed

Adapter methods: the pretrained base with every finished task's adapter (a task trained
twice, CW20, with its last visit's); the target return of each task is the one its
fine-tuning used. A routed agent also reads each task's routing signature (written by a
run that routes, or later by scripts/signatures.py: `write_signatures`). ``fft`` under
``sequential``: the weights after the last finished task (one model, nothing to route).
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
from agents.routed_agent import RoutedAgent
from agents.routing import (
    SIGNATURE_DIR,
    RouterConfig,
    load_signature,
    needs_signatures,
    save_signature,
)
from agents.runs import TaskRecord, read_experiment, read_record, run_dir_of, task_dir_of
from eva_rl.adapters import delete_adapter, load_adapter
from eva_rl.data import open_datasets
from eva_rl.routing import SignatureError, SignaturePool
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
    for task, tdir, record in finished:
        agent.target_returns[task] = float(record.target_return)
        if m.is_full:
            continue
        if task in agent.adapter_names:
            delete_adapter(agent.model, task)
        load_adapter(agent.model, tdir / "adapter", name=task)
    if m.is_full:
        load_weights(agent.model, finished[-1][1] / "model.safetensors")
    agent.use_adapter(None)
    agent.run_config = {**(agent.run_config or {}), "tasks": [t for t, _, _ in finished],
                        "finetune_run": str(out), "method": method, "seed": seed}
    logger.info("loaded %s %s seed %d: %d tasks", out, method, seed, len(finished))
    return agent


def read_signatures(out: str | os.PathLike, method: str, seed: int, fingerprint: str
                    ) -> SignaturePool:
    """The routing signatures of every finished task of run (``method``, ``seed``) (a task
    trained twice, CW20: its last visit's), each checked against the base `fingerprint`;
    a `SignatureError` naming the tasks without one and the command that writes them."""
    _, finished = finished_tasks(out, method, seed)
    last = {task: tdir for task, tdir, _ in finished}
    missing = [task for task, tdir in last.items() if not (tdir / SIGNATURE_DIR).exists()]
    if missing:
        raise SignatureError(
            f"tasks {missing} have an adapter but no signature (a run that does not route "
            f"writes none): write them with python scripts/signatures.py --run {out} "
            f"--method {method} --seed {seed}")
    pool = SignaturePool()
    for task, tdir in last.items():
        pool.add(load_signature(tdir, task, fingerprint), task)
    return pool


def load_routed_agent(out: str | os.PathLike, method: str, seed: int,
                      router: RouterConfig | None = None,
                      device: torch.device | str | None = None,
                      threads: int | None = DEFAULT_THREADS) -> RoutedAgent:
    """`load_finetuned_agent`'s agent wrapped in a `RoutedAgent` with `router` (default
    `RouterConfig()`) and, for a router that needs them (`needs_signatures`), every
    task's signature (`read_signatures`: a `SignatureError` names the missing ones)."""
    router = RouterConfig() if router is None else router
    agent = load_finetuned_agent(out, method, seed, device=device, threads=threads)
    if get_method(method).is_full:
        raise ValueError(f"{out}: {method} fine-tunes the base itself; it has nothing to route")
    signatures = (read_signatures(out, method, seed, agent.fingerprint())
                  if needs_signatures(router.router) else None)
    return RoutedAgent(agent, router, signatures)


def write_signatures(out: str | os.PathLike, method: str, seed: int, *,
                     rank: int | None = None, force: bool = False,
                     device: torch.device | str | None = None) -> list[Path]:
    """(Re)compute the routing signature of every finished task of run (``method``,
    ``seed``) from its task's data, as fine-tuning does at ``rank`` components per layer
    (default the run's ``signature_rank``); the directories written. Existing signatures
    are kept unless ``force`` (for runs that did not route, runs made before signatures,
    or another rank)."""
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
