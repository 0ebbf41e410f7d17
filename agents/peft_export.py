"""Export the task adapters of a fine-tuning run in Hugging Face PEFT's format.

    export_run_adapters("runs/cw10-single", "eva", 0, "peft")
    # -> peft/eva/seed_0/<task>/{adapter_config.json, adapter_model.safetensors, ...}

Each directory loads with ``peft.PeftModel.from_pretrained(base_dt, dir)`` onto the run's
pretrained `DecisionTransformer` (``DTAgent.load(pretrained).model``, adapters off).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from agents.dt_agent import DTAgent
from agents.finetune_config import FinetuneConfig
from agents.initializers import saved_init_result
from agents.methods import get_method
from agents.runs import read_experiment, read_record, run_dir_of, task_dir_of
from envs import resolve_tasks
from eva_rl.adapters import delete_adapter, export_peft, load_adapter
from eva_rl.eva import EvaResult

logger = logging.getLogger(__name__)


def export_run_adapters(
    run: str | os.PathLike,
    method: str,
    seed: int,
    out: str | os.PathLike,
    tasks: str | Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``out/<method>/seed_<seed>/<task>/`` (PEFT format) for the finished tasks of
    the fine-tuning run ``run``; returns {task: directory}.

    ``tasks`` (default: all of the run's) selects some; every selected task must be
    finished. A task that appears twice (CW20, sequential) exports its last adapter.
    An existing non-empty ``out/<method>/seed_<seed>`` is an error unless ``overwrite``.
    Bad input raises ``ValueError`` / ``FileExistsError`` / ``FileNotFoundError`` with one line.
    """
    run, out = Path(run), Path(out)
    exp = read_experiment(run)
    m = get_method(method)
    if m.name not in exp["methods"]:
        raise ValueError(f"{run} has no method {m.name!r}; it ran {', '.join(exp['methods'])}")
    if m.is_full:
        raise ValueError(f"method {m.name!r} fine-tunes every weight: it has no adapters to "
                         "export")
    if int(seed) not in exp["seeds"]:
        raise ValueError(f"{run} has no seed {seed}; its seeds are {exp['seeds']}")
    selected = list(dict.fromkeys(exp["tasks"] if tasks is None else resolve_tasks(tasks)))
    unknown = [t for t in selected if t not in exp["tasks"]]
    if unknown:
        raise ValueError(f"tasks {unknown} are not in {run}; its tasks are {exp['tasks']}")
    run_dir = run_dir_of(run, m.name, int(seed))
    task_dirs = {t: task_dir_of(run_dir, i, t) for i, t in enumerate(exp["tasks"])
                 if t in selected}  # the last occurrence of a repeated task wins
    unfinished = [t for t, d in task_dirs.items() if read_record(d) is None]
    if unfinished:
        raise ValueError(f"tasks {unfinished} of {m.name} seed {seed} are not finished in "
                         f"{run_dir}; pick finished ones with tasks=...")
    dest = out / m.name / f"seed_{int(seed)}"
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty; pass --overwrite to replace "
                              "its exports")

    model = DTAgent.load(exp["pretrained"], device="cpu", threads=None).model
    # AdaLoRA: the run's budget schedule goes into PEFT's AdaLoraConfig
    schedule = None
    if m.has_budget:
        config = FinetuneConfig.from_dict(exp["config"]).for_method(m)
        schedule = config.adalora.schedule(config.train.steps, config.adapter.rank)
    written: dict[str, Path] = {}
    for task, tdir in task_dirs.items():
        if not (tdir / "adapter").is_dir():
            raise FileNotFoundError(f"{tdir / 'adapter'} is missing")
        load_adapter(model, tdir / "adapter", name=task)
        eva = EvaResult.load(tdir / "eva").config if m.eva else None
        init = saved_init_result(m.initializer, tdir)  # CorDA / LoRA-GA: provenance only
        written[task] = export_peft(model, task, dest / task, eva=eva, adalora=schedule,
                                    base_model=exp["pretrained"], overwrite=overwrite,
                                    init=None if init is None else {"kind": m.name,
                                                                    **init.config})
        delete_adapter(model, task)
    logger.info("exported %d %s adapters (seed %d) to %s", len(written), m.name, seed, dest)
    return written
