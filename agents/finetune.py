"""Fine-tune one task: add the method's adapter (EVA-initialised where it says so), train it
with the shared `Trainer`, measure the success curve while training, evaluate.

    record = finetune_task(agent, "hammer-v3", dataset, get_method("eva"), CONFIGS["cpu"],
                           task_dir, seed=0)

Its settings, `FinetuneConfig` and the named `CONFIGS`, are `agents.finetune_config`'s.

Everything a task writes lives in ``task_dir``: ``train/`` (the Trainer's checkpoints and
tensorboard), ``eva/`` (the EVA result, so a resumed task reuses the same components) and,
once finished, ``adapter/`` (or ``model.safetensors`` for ``fft``). Calling it again on the
same ``task_dir`` continues from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.dt_agent import DTAgent
from agents.evaluation import evaluate
from agents.finetune_config import FinetuneConfig
from agents.methods import Method
from agents.routing import load_signature, save_signature, task_signature
from agents.runs import TaskRecord
from eva_rl.adapters import (
    AdaLoraAllocator,
    AdaLoraStep,
    adapter_names,
    count_parameters,
    prepare_full_finetuning,
    set_active_adapter,
)
from eva_rl.data import TrajectoryDataset, WindowSampler
from eva_rl.eva import EvaConfig, EvaResult
from eva_rl.metrics import success_auc
from eva_rl.routing import SignatureError, TaskSignature
from eva_rl.state import preserve_model_state
from eva_rl.training import (
    Callback,
    StepHook,
    TrainConfig,
    Trainer,
    default_target_return,
    list_checkpoints,
)

logger = logging.getLogger(__name__)

TaskHook = Callable[[str, int], None]
"""``hook(task, step)``: called before every training update (``step`` updates done)."""


def finetune_seed(seed: int, index: int) -> int:
    """Seed of task ``index`` of a run with ``seed`` (independent of what ran before it)."""
    return 1000 * seed + index


def eval_seed(seed: int) -> int:
    """Env seed base of every evaluation of a run (the same episodes each time)."""
    return 100_000 * (seed + 1)


class SuccessCurve(Callback):
    """Evaluates the task every ``eval_every`` updates (and before the first, and after the
    last): the success curve. The last point comes from ``final_evaluate_fn`` (default
    ``evaluate_fn``; e.g. more episodes) and replaces a point at the same update. The curve
    is saved in every checkpoint, so a resumed task has the points measured before the
    interruption."""

    name = "success_curve"

    def __init__(self, evaluate_fn: Callable[[], dict[str, float]], task: str,
                 eval_every: int, eval_at_start: bool,
                 final_evaluate_fn: Callable[[], dict[str, float]] | None = None) -> None:
        self.evaluate_fn = evaluate_fn
        self.final_evaluate_fn = final_evaluate_fn
        self.task = task
        self.eval_every = eval_every
        self.eval_at_start = eval_at_start
        self.curve: list[list[float]] = []  # [step, success, mean_return]
        self.final_measured = False  # the last point is the final evaluation's
        self.eval_seconds = 0.0  # all evaluations of the task (kept across a resume)
        self.session_eval_seconds = 0.0  # those of this process only

    def measure(self, trainer: Trainer, final: bool = False) -> None:
        """Evaluate now (in eval mode) and append ``(step, success, return)`` to the curve."""
        step = trainer.step
        evaluate_fn = self.evaluate_fn
        if final and self.final_evaluate_fn is not None:
            if self.final_measured:
                return
            if self.curve and self.curve[-1][0] == step:
                self.curve.pop()  # measured again, with the final evaluation's episodes
            evaluate_fn = self.final_evaluate_fn
        if self.curve and self.curve[-1][0] >= step:
            return
        t0 = time.perf_counter()
        with preserve_model_state(trainer.model):
            trainer.model.eval()
            res = evaluate_fn()
        seconds = time.perf_counter() - t0
        self.eval_seconds += seconds
        self.session_eval_seconds += seconds
        self.curve.append([step, res["success_rate"], res["mean_return"]])
        self.final_measured = final
        trainer.log_scalars({f"eval/{self.task}/success": res["success_rate"],
                             f"eval/{self.task}/return": res["mean_return"]}, step)
        logger.info("%s step %d: success %.2f", self.task, step, res["success_rate"])

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.step == 0 and self.eval_at_start:
            self.measure(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        last = trainer.step >= trainer.config.steps
        if last and self.final_evaluate_fn is not None:
            return  # on_train_end measures this update with the final evaluation
        if self.eval_every > 0 and trainer.step % self.eval_every == 0:
            self.measure(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self.measure(trainer, final=True)  # skipped if the curve has it already

    def state_dict(self) -> dict[str, Any]:
        return {"curve": self.curve, "eval_seconds": self.eval_seconds,
                "final_measured": self.final_measured}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.curve = [[float(v) for v in p] for p in state["curve"]]
        self.eval_seconds = float(state["eval_seconds"])
        self.final_measured = bool(state.get("final_measured", False))


class AdaLoraBudget(Callback):
    """AdaLoRA's rank allocation in the training loop: scores and masks after every
    optimizer step, ``adalora/*`` scalars every ``log_every`` updates; its scores are
    saved in checkpoints."""

    name = "adalora"

    def __init__(self, allocator: AdaLoraAllocator, log_every: int) -> None:
        self.allocator = allocator
        self.log_every = log_every
        self.last: AdaLoraStep | None = None

    def on_optimizer_step(self, trainer: Trainer) -> None:
        self.last = self.allocator.update(trainer.step + 1)  # the update being finished

    def on_step_end(self, trainer: Trainer) -> None:
        if self.last is not None and trainer.step % self.log_every == 0:
            trainer.log_scalars(self.last.scalars())

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.allocator.load_state_dict(state)


def attach_method(agent: DTAgent, task: str, dataset: TrajectoryDataset, method: Method,
                  config: FinetuneConfig, seed: int, task_dir: Path
                  ) -> tuple[int, float, dict[str, int] | None, EvaResult | None]:
    """Make the model ready to train ``task``: (trainable params, init seconds, ranks per
    layer, EVA result). Adapter methods get an adapter named after the task, added by the
    method's initializer (reused if the task already has one, e.g. its second visit in
    CW20); ``fft`` unfreezes everything."""
    model = agent.model
    if method.is_full:
        return prepare_full_finetuning(model), 0.0, None, None
    if task in adapter_names(model):
        set_active_adapter(model, task)
        return count_parameters(model, task), 0.0, None, None
    config = config.for_method(method)
    adapter_config = method.adapter_config(config.adapter_rank(method), config.adapter.alpha,
                                           dropout=config.adapter.dropout)
    torch.manual_seed(seed)  # LoRA's random A
    outcome = method.initializer.attach(agent, task, dataset, adapter_config, config, seed,
                                        task_dir)
    return count_parameters(model, task), outcome.seconds, outcome.ranks, outcome.eva


def ensure_signature(agent: DTAgent, task: str, dataset: TrajectoryDataset, method: Method,
                     config: FinetuneConfig, seed: int, task_dir: Path,
                     eva_result: EvaResult | None) -> tuple[TaskSignature | None, float]:
    """The task's routing signature on the frozen base, written to ``task_dir/signature/``
    (reused if there; EVA's components where the method computed them): (signature,
    seconds). None when the run does not route (``config.routing.router == "oracle"``;
    scripts/signatures.py writes them later) and for ``fft``, which changes the base
    itself."""
    if method.is_full or config.routing.router == "oracle":
        return None, 0.0
    try:
        return load_signature(task_dir, task, agent.fingerprint()), 0.0
    except SignatureError:
        if (task_dir / "signature").exists():
            raise
    t0 = time.perf_counter()
    signature = method_task_signature(agent, task, dataset, method, config, seed, eva_result)
    save_signature(signature, task_dir)
    return signature, time.perf_counter() - t0


def method_task_signature(agent: DTAgent, task: str, dataset: TrajectoryDataset,
                          method: Method, config: FinetuneConfig, seed: int,
                          eva_result: EvaResult | None = None) -> TaskSignature:
    """`task_signature` with a run's settings: EVA's own settings at ``signature_rank``."""
    eva_config = EvaConfig(rank=config.routing_signature_rank,
                           rho=max(config.eva.rho, method.min_rho), tau=config.eva.tau,
                           max_batches=config.eva.max_batches, seed=seed)
    return task_signature(agent, task, dataset, eva_config=eva_config, eva_result=eva_result,
                          batch_size=config.eva.batch_size,
                          max_batches=config.eva.max_batches, seed=seed)


def train_config(method: Method, config: FinetuneConfig, seed: int) -> TrainConfig:
    """The Trainer settings of one task: ``config.train`` with the method's learning rate."""
    lr = config.fft_lr if method.is_full else config.train.lr
    return dataclasses.replace(config.train, lr=lr, min_lr=min(config.train.min_lr, lr),
                               seed=seed)


def loss_curve(history: Sequence[tuple[int, float, float]], every: int) -> dict[str, list]:
    """Mean loss per ``every`` updates: ``{"steps": [...], "loss": [...]}``."""
    steps, losses = [], []
    for start in range(0, len(history), every):
        chunk = history[start:start + every]
        steps.append(int(chunk[-1][0]))
        losses.append(float(np.mean([h[1] for h in chunk])))
    return {"steps": steps, "loss": losses}


def finetune_task(
    agent: DTAgent,
    task: str,
    dataset: TrajectoryDataset,
    method: Method,
    config: FinetuneConfig,
    task_dir: str | Path,
    seed: int = 0,
    index: int = 0,
    hook: TaskHook | None = None,
    eval_slot: int | None = None,
) -> TaskRecord:
    """Fine-tune ``agent.model`` on ``task`` in place and return the task's record.

    The record (`agents.runs.TaskRecord`) has success / mean return on the task after training,
    the success curve measured during training and its AUC, trainable parameters, time
    split (EVA init, training, evaluation), the first update's gradient norm, the loss
    curve and EVA's ranks. ``hook(task, step)`` runs before every update (e.g. to stop a
    run for a test). ``eval_slot`` (default ``index``) is the task's position in a joint
    evaluation of all tasks, so its episodes here use the same env seeds as there. EVA's
    scalars (`log_eva`) go to ``task_dir/train/tb`` with the
    Trainer's.
    """
    task_dir = Path(task_dir)
    t_start = time.perf_counter()
    config = config.for_method(method)
    s = finetune_seed(seed, index)
    target = default_target_return(dataset)
    agent.set_task(task, target_return=agent.target_returns.get(task, target))
    trainable, eva_seconds, ranks, eva_result = attach_method(
        agent, task, dataset, method, config, s, task_dir)
    _, signature_seconds = ensure_signature(agent, task, dataset, method, config, s, task_dir,
                                            eva_result)

    slot = index if eval_slot is None else eval_slot

    def evaluate_task(n_episodes: int) -> dict[str, float]:
        # the episodes of this task in a joint evaluation of all tasks (seeds by slot)
        return evaluate(agent, [task], n_episodes=n_episodes, seed=eval_seed(seed), slots=[slot],
                        max_episode_steps=config.eval.max_episode_steps, progress=False,
                        stop_on_success=config.eval.stop_on_success)[task]

    cfg = agent.config
    sampler = WindowSampler([dataset], context_len=cfg.context_len,
                            reward_scale=cfg.reward_scale, state_mean=agent.state_mean,
                            state_std=agent.state_std, seed=s)
    final_episodes = config.eval.final_episode_count
    final_fn = (None if final_episodes == config.eval.episodes
                else functools.partial(evaluate_task, final_episodes))
    curve_cb = SuccessCurve(functools.partial(evaluate_task, config.eval.episodes), task,
                            config.eval.every, config.eval.at_start, final_fn)
    callbacks: list[Callback] = [curve_cb]
    loss_fn = None
    allocator = None
    if method.has_budget:  # AdaLoRA: its rank allocation runs in the training loop
        schedule = config.adalora.schedule(config.train.steps, config.adapter.rank)
        allocator = AdaLoraAllocator(agent.model, task, schedule)
        callbacks.append(AdaLoraBudget(allocator, config.train.log_every))

        def loss_fn(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return model.loss(batch) + allocator.orthogonal_loss()
    if hook is not None:
        callbacks.append(StepHook(functools.partial(hook, task)))
    trainer = Trainer(agent.model, sampler, train_config(method, config, s), task_dir / "train",
                      loss_fn=loss_fn, callbacks=callbacks,
                      hparams={"method": method.name, "task": task, "finetune": config.to_dict()})
    t_train = time.perf_counter()
    history = trainer.train(resume=bool(list_checkpoints(task_dir / "train")))
    train_wall = time.perf_counter() - t_train - curve_cb.session_eval_seconds
    final = curve_cb.curve[-1]
    curve = np.asarray(curve_cb.curve, dtype=np.float64)
    agent.model.eval()
    # wall time of this call: a resumed task counts only the time after resuming
    total = time.perf_counter() - t_start
    return TaskRecord(
        task=task,
        index=index,
        method=method.name,
        seed=seed,
        success=float(final[1]),
        final_episodes=final_episodes,
        mean_return=float(final[2]),
        target_return=agent.target_return(task),
        trainable_params=int(trainable),
        finetune_seconds=total,
        train_seconds=train_wall,
        eval_seconds=curve_cb.eval_seconds,
        eva_seconds=eva_seconds,
        eva_share=min(eva_seconds / total, 1.0) if total > 0 else 0.0,
        signature_seconds=signature_seconds,
        # the process's peak so far (a Ray worker's covers the cells it ran before)
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        first_grad_norm=float(history[0][2]) if history else None,
        loss_curve=loss_curve(history, config.train.log_every),
        success_curve={"steps": curve[:, 0].astype(int).tolist(),
                       "success": curve[:, 1].tolist(), "return": curve[:, 2].tolist()},
        auc=success_auc(curve[:, 1], curve[:, 0]) if len(curve) > 1 else float(curve[0, 1]),
        eva_ranks=ranks,
        adalora_ranks=None if allocator is None else allocator.ranks(),
        eva=None if eva_result is None else {
            "batches_used": eva_result.batches_used, "stop_reason": eva_result.stop_reason,
            "seconds": eva_result.seconds, "rho": eva_result.config.rho},
    )

