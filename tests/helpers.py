"""Helpers shared by the test modules (``from helpers import ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, argv: Sequence[str], timeout: float = 300
               ) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>.py argv...`` as a user would (a fresh interpreter, one torch
    thread), from the repository root; returns the finished process with its text output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_main(name: str, argv: Sequence[str]) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>.py``'s ``main(argv)`` in this process, as `run_script` would
    run the file but without a fresh interpreter (its torch imports cost seconds): the exit
    status `script_cli.script_main` returns and what the script printed on stdout and
    stderr (log records go to pytest's capture, not stderr). An unexpected error raises, as
    its traceback would end the script. For what needs a real process (signals, ``kill
    -9``, a lock another pid holds) use `run_script`."""
    import contextlib
    import importlib
    import io

    main = importlib.import_module(name).main  # conftest puts scripts/ on sys.path
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()  # a script sets its --threads
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([name, *argv], code, out.getvalue(), err.getvalue())


# ------------------------------------------------------------- tiny fine-tuning experiments

TASKS = ("faucet-close-v3", "window-close-v3")
"""The two CW10 tasks of the tiny end-to-end experiments (the `finetune_setup` fixture)."""


def tiny_config(**kw):
    """A fine-tuning config of a few updates on the tiny DT (overrides in ``kw``)."""
    from agents.finetune_config import get_config

    cfg = get_config("quick").replace(steps=6, batch_size=8, warmup_steps=1, eval_every=0,
                                      eval_at_start=False, eval_episodes=1, max_episode_steps=15,
                                      checkpoint_every=2, log_every=2, eva_batch_size=4,
                                      eva_max_batches=4, device="cpu", progress=False)
    return cfg.replace(**kw)


def experiment(setup, protocol="sequential", methods=("eva_dora",), **kw):
    """A tiny `Experiment` on the data and pretrained model of ``setup``."""
    from agents.protocols import Experiment

    _, data, pre = setup
    return Experiment(pretrained=str(pre), data=str(data), tasks=TASKS, methods=methods,
                      seeds=(0,), protocol=protocol, config=tiny_config(**kw))


def comparable(results):
    """Everything of the results except wall-clock times and memory."""
    def strip(rec):
        return {k: v for k, v in rec.items() if "seconds" not in k and k != "eva_share"
                and k != "eva" and k != "peak_rss_mib"}
    return [{**run, "per_task": [strip(r) for r in run["per_task"]]} for run in results["runs"]]


class Interrupt(Exception):
    """Raised from a step hook to stop a run at a chosen point."""


# ------------------------------------------------------------- PEFT as an oracle

STATE_DIM, ACT_DIM = 6, 3
"""Dimensions of the tiny DT the PEFT comparisons run on."""


def tiny_dt(seed: int = 0):
    """A tiny DT in eval mode, its weights seeded."""
    from eva_rl.models.dt import DecisionTransformer, DTConfig

    torch.manual_seed(seed)
    return DecisionTransformer(DTConfig.preset("tiny", state_dim=STATE_DIM, act_dim=ACT_DIM)).eval()


def dt_batch(seed: int, batch: int = 4, dtype=None):
    """A random batch of 5-step windows for `tiny_dt` (float32 unless ``dtype``)."""
    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    k = 5
    return {
        "states": torch.randn(batch, k, STATE_DIM, generator=g, dtype=dtype),
        "actions": torch.rand(batch, k, ACT_DIM, generator=g, dtype=dtype) * 2 - 1,
        "rewards": torch.randn(batch, k, 1, generator=g, dtype=dtype),
        "returns_to_go": torch.randn(batch, k, 1, generator=g, dtype=dtype),
        "timesteps": torch.randint(0, 100, (batch, k), generator=g),
    }


@torch.no_grad()
def out(model, batch):
    """The predicted actions (B, K, act_dim)."""
    return model(**batch)


@torch.no_grad()
def hidden(model, batch):
    """The last hidden states (magnitude ~1, more sensitive than the tanh action head)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.hidden_states(**batch)


def max_diff(a, b) -> float:
    """The largest absolute difference of two tensors."""
    return float((a - b).abs().max())


def a_task_record(**changes):
    """A well-formed `agents.runs.TaskRecord` of a finished single-task cell."""
    from agents.runs import TaskRecord

    fields = dict(
        task="reach-v3", index=0, method="lora", seed=0, success=0.5, final_episodes=10,
        mean_return=120.0, target_return=400.0, trainable_params=1000, finetune_seconds=3.0,
        train_seconds=2.0, eval_seconds=1.0, eva_seconds=0.0, eva_share=0.0,
        signature_seconds=0.1, peak_rss_mib=300.0, first_grad_norm=0.7,
        loss_curve={"steps": [2, 4], "loss": [0.3, 0.2]},
        success_curve={"steps": [0, 4], "success": [0.2, 0.5], "return": [80.0, 120.0]},
        auc=0.35, eva_ranks=None, adalora_ranks=None, eva=None)
    fields.update(changes)
    if "success" in changes or "mean_return" in changes:  # the curve ends at the record's
        curve = fields["success_curve"]
        fields["success_curve"] = {**curve, "success": curve["success"][:-1] + [fields["success"]],
                                   "return": curve["return"][:-1] + [fields["mean_return"]]}
    return TaskRecord(**fields)
