"""Fine-tune one task: add the method's adapter (EVA-initialised where it says so), train it
with the shared `Trainer`, measure the success curve while training, evaluate.

    record = finetune_task(agent, "hammer-v3", dataset, get_method("eva"), CONFIGS["cpu"],
                           task_dir, seed=0)

Everything a task writes lives in ``task_dir``: ``train/`` (the Trainer's checkpoints and
tensorboard), ``eva/`` (the EVA result, so a resumed task reuses the same components) and,
once finished, ``adapter/`` (or ``model.safetensors`` for ``fft``). Calling it again on the
same ``task_dir`` continues from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.dt_agent import DTAgent
from agents.evaluation import evaluate
from agents.methods import Method
from eva_rl.adapters import (
    adapter_names,
    add_adapter,
    count_parameters,
    prepare_full_finetuning,
    set_active_adapter,
)
from eva_rl.data import TrajectoryDataset, WindowSampler
from eva_rl.eva import (
    EvaConfig,
    EvaResult,
    apply_eva,
    compute_eva,
    dt_forward_and_mask,
    log_eva,
)
from eva_rl.metrics import success_auc
from eva_rl.schema import check_known_fields
from eva_rl.tensorboard import RunLogger
from eva_rl.training import TrainConfig, Trainer, list_checkpoints
from eva_rl.training.trainer import TB_DIR

logger = logging.getLogger(__name__)

StepHook = Callable[[str, int], None]
"""``hook(task, step)``: called before every training update (``step`` updates done)."""


@dataclass
class FinetuneConfig:
    """Fine-tuning settings shared by every method and task of an experiment."""

    rank: int = 4
    """Adapter rank r (EVA: the average rank, budget N * r). The paper tried 2-16; 4 was
    EVA+DoRA's best rank there and is cheap on CPU for 128-wide models."""
    alpha: float = 1.0
    """LoRA alpha (paper: 1), so the scale is alpha / r."""
    rho: float = 1.0
    """EVA redistribution factor (paper: no gain from rho = 2 in RL, so uniform rank)."""
    tau: float = 0.99
    """EVA convergence threshold (cosine similarity of consecutive components)."""
    lr: float = 1e-3
    """Peak learning rate of adapter methods."""
    fft_lr: float = 3e-4
    """Peak learning rate of full fine-tuning (all weights move, so smaller)."""
    steps: int = 300
    """Optimizer updates per task."""
    batch_size: int = 32
    """Windows per update."""
    warmup_steps: int = 30
    """Linear warm-up updates (then cosine decay to ``min_lr``)."""
    min_lr: float = 1e-6
    """Floor of the cosine decay."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices."""
    grad_clip: float = 0.25
    """Global gradient-norm clip (paper: 0.25)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    eval_every: int = 100
    """Evaluate the task every this many updates for its success curve (0 = only at the end)."""
    eval_at_start: bool = True
    """Also evaluate before the first update (the curve's step 0: transfer at the start)."""
    eval_episodes: int = 10
    """Episodes per task and evaluation."""
    max_episode_steps: int = 200
    """Episode horizon (Continual World and the paper: 200)."""
    eva_batch_size: int = 32
    """Windows per EVA forward pass."""
    eva_max_batches: int = 50
    """Cap on EVA forward passes."""
    eva_token_types: tuple[str, ...] | None = None
    """Token types whose activations enter EVA (None = every real token)."""
    checkpoint_every: int = 100
    """Trainer checkpoint interval (a task resumes from the latest one)."""
    log_every: int = 10
    """Loss-curve resolution: one point (mean loss) per this many updates."""
    precision: str = "auto"
    """Trainer precision: ``auto`` | ``fp32`` | ``bf16``."""
    device: str = "auto"
    """``auto`` (cuda when present) | ``cpu`` | ``cuda``."""
    progress: bool = True
    """tqdm bars for training and evaluation."""

    def __post_init__(self) -> None:
        if self.eva_token_types is not None:
            self.eva_token_types = tuple(self.eva_token_types)
        for name in ("rank", "steps", "batch_size", "eval_episodes", "max_episode_steps",
                     "eva_batch_size", "eva_max_batches", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and self.fft_lr > 0):
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, "
                             f"fft_lr={self.fft_lr}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        d = dataclasses.asdict(self)
        if self.eva_token_types is not None:
            d["eva_token_types"] = list(self.eva_token_types)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinetuneConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        check_known_fields(cls, d, "fine-tuning settings")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with some fields changed (None values are ignored: "not given")."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


CONFIGS: dict[str, FinetuneConfig] = {
    # one method over all of CW10 (`single`) in ~5-8 minutes on 2 CPU cores, small DT
    "cpu": FinetuneConfig(steps=300, eval_every=150, eval_episodes=10, checkpoint_every=100),
    # the quickstart and smoke runs: a tiny DT, a few minutes for everything
    "quick": FinetuneConfig(steps=120, batch_size=32, warmup_steps=10, eval_every=120,
                            eval_episodes=5, checkpoint_every=60, eva_max_batches=20),
    # the EVA paper's fine-tuning (GPU): 100k updates of batch 128, lr 1e-4
    "paper": FinetuneConfig(steps=100_000, batch_size=128, lr=1e-4, fft_lr=1e-4,
                            warmup_steps=4000, eval_every=10_000, eval_episodes=10,
                            checkpoint_every=5000, log_every=100, eva_batch_size=128,
                            eva_max_batches=100),
}


def get_config(name: str) -> FinetuneConfig:
    """A named configuration (a fresh copy); unknown -> one-line error with the names."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; valid configs: {', '.join(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name])


def task_seed(seed: int, index: int) -> int:
    """Seed of task ``index`` of a run with ``seed`` (independent of what ran before it)."""
    return 1000 * seed + index


def eval_seed(seed: int) -> int:
    """Env seed base of every evaluation of a run (the same episodes each time)."""
    return 100_000 * (seed + 1)


class EvalDuringTraining:
    """A sampler wrapper that evaluates the task every ``eval_every`` updates.

    The Trainer draws one batch per update, so the ``n``-th ``sample`` call happens after
    ``n - 1`` updates: that is where the curve point is taken (and where ``hook`` runs). The
    curve is part of ``state_dict``, so it is saved in every checkpoint and a resumed task
    has the points measured before the interruption.
    """

    def __init__(self, sampler: WindowSampler, evaluate_fn: Callable[[], dict[str, float]],
                 model: torch.nn.Module, task: str, eval_every: int, eval_at_start: bool,
                 hook: StepHook | None = None) -> None:
        self.sampler = sampler
        self.evaluate_fn = evaluate_fn
        self.model = model
        self.task = task
        self.eval_every = eval_every
        self.eval_at_start = eval_at_start
        self.hook = hook
        self.calls = 0
        self.curve: list[list[float]] = []  # [step, success, mean_return]
        self.eval_seconds = 0.0  # all evaluations of the task (kept across a resume)
        self.session_eval_seconds = 0.0  # those of this process only

    def due(self, step: int) -> bool:
        """Whether the curve has a point at ``step``."""
        if step == 0:
            return self.eval_at_start
        return self.eval_every > 0 and step % self.eval_every == 0

    def measure(self, step: int) -> None:
        """Evaluate now (in eval mode) and append ``(step, success, return)`` to the curve."""
        if self.curve and self.curve[-1][0] >= step:
            return
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        res = self.evaluate_fn()
        self.model.train(was_training)
        seconds = time.perf_counter() - t0
        self.eval_seconds += seconds
        self.session_eval_seconds += seconds
        self.curve.append([step, res["success_rate"], res["mean_return"]])
        logger.info("%s step %d: success %.2f", self.task, step, res["success_rate"])

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """Run the hook, take a curve point if one is due, then draw the batch."""
        step = self.calls
        if self.hook is not None:
            self.hook(self.task, step)
        if self.due(step):
            self.measure(step)
        self.calls += 1
        return self.sampler.sample(batch_size)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the inner sampler's state, the update count and the curve so far."""
        return {"sampler": self.sampler.state_dict(), "calls": self.calls,
                "curve": self.curve, "eval_seconds": self.eval_seconds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of ``state_dict`` (called by the Trainer on resume)."""
        self.sampler.load_state_dict(state["sampler"])
        self.calls = int(state["calls"])
        self.curve = [list(p) for p in state["curve"]]
        self.eval_seconds = float(state.get("eval_seconds", 0.0))


def eva_batches(dataset: TrajectoryDataset, agent: DTAgent, config: FinetuneConfig,
                seed: int, device: torch.device):
    """EVA's input: sampler batches of the task's own data as tensors on ``device``."""
    cfg = agent.config
    sampler = WindowSampler([dataset], context_len=cfg.context_len,
                            reward_scale=cfg.reward_scale, state_mean=agent.state_mean,
                            state_std=agent.state_std, seed=seed + 7919)
    for _ in range(config.eva_max_batches):
        batch = sampler.sample(config.eva_batch_size)
        yield {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def init_eva(agent: DTAgent, dataset: TrajectoryDataset, method: Method,
             config: FinetuneConfig, seed: int, eva_dir: Path) -> tuple[EvaResult, bool]:
    """Compute EVA on the frozen model, or reuse the result saved in ``eva_dir``.

    Returns the result and whether it was computed now (False: loaded)."""
    if (eva_dir / "eva.json").is_file():
        return EvaResult.load(eva_dir), False
    eva_config = EvaConfig(rank=config.rank, rho=max(config.rho, method.min_rho), tau=config.tau,
                           max_batches=config.eva_max_batches, alpha=config.alpha,
                           reverse=method.reverse, seed=seed)
    forward, mask_fn = dt_forward_and_mask(agent.model, config.eva_token_types)
    t0 = time.perf_counter()
    result = compute_eva(agent.model, eva_batches(dataset, agent, config, seed, agent.device),
                         eva_config, forward=forward, mask_fn=mask_fn)
    result.extra["wall_seconds"] = time.perf_counter() - t0  # batches + SVD
    result.save(eva_dir, overwrite=True)
    log_dir = eva_dir.parent / "train" / TB_DIR
    with RunLogger(log_dir) as log:  # next to the Trainer's events of the same task
        log_eva(log.writer, result, step=0)
    return result, True


def attach_method(agent: DTAgent, task: str, dataset: TrajectoryDataset, method: Method,
                  config: FinetuneConfig, seed: int, task_dir: Path
                  ) -> tuple[int, float, dict[str, int] | None, EvaResult | None]:
    """Make the model ready to train ``task``: (trainable params, EVA seconds, EVA ranks,
    EVA result). Adapter methods get an adapter named after the task (reused if the task
    already has one, e.g. its second visit in CW20); ``fft`` unfreezes everything."""
    model = agent.model
    if method.is_full:
        return prepare_full_finetuning(model), 0.0, None, None
    if task in adapter_names(model):
        set_active_adapter(model, task)
        return count_parameters(model, task), 0.0, None, None
    adapter_config = method.adapter_config(config.rank, config.alpha, dropout=config.dropout)
    torch.manual_seed(seed)  # LoRA's random A
    if not method.eva:
        add_adapter(model, task, adapter_config)
        return count_parameters(model, task), 0.0, None, None
    result, _ = init_eva(agent, dataset, method, config, seed, task_dir / "eva")
    apply_eva(model, task, result, adapter_config)
    seconds = float(result.extra.get("wall_seconds", result.seconds))
    return count_parameters(model, task), seconds, dict(result.ranks), result


def train_config(method: Method, config: FinetuneConfig, seed: int) -> TrainConfig:
    """The Trainer settings of one task."""
    return TrainConfig(
        steps=config.steps, batch_size=config.batch_size,
        lr=config.fft_lr if method.is_full else config.lr,
        min_lr=min(config.min_lr, config.fft_lr if method.is_full else config.lr),
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        grad_clip=config.grad_clip, precision=config.precision, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=2, seed=seed,
        device=config.device, progress=config.progress,
    )


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
    hook: StepHook | None = None,
    eval_slot: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``agent.model`` on ``task`` in place and return the task's record.

    The record (see `agents.reports`) has success / mean return on the task after training,
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
    s = task_seed(seed, index)
    target = float(np.max(dataset.episode_returns))
    agent.set_task(task, target_return=agent.target_returns.get(task, target))
    trainable, eva_seconds, ranks, eva_result = attach_method(
        agent, task, dataset, method, config, s, task_dir)

    n_ep = config.eval_episodes
    first_seed = eval_seed(seed) + n_ep * (index if eval_slot is None else eval_slot)

    def evaluate_task() -> dict[str, float]:
        return evaluate(agent, [task], n_episodes=n_ep, seed=first_seed,
                        max_episode_steps=config.max_episode_steps,
                        progress=False)[task]

    cfg = agent.config
    sampler = WindowSampler([dataset], context_len=cfg.context_len,
                            reward_scale=cfg.reward_scale, state_mean=agent.state_mean,
                            state_std=agent.state_std, seed=s)
    wrapped = EvalDuringTraining(sampler, evaluate_task, agent.model, task, config.eval_every,
                                 config.eval_at_start, hook)
    trainer = Trainer(agent.model, wrapped, train_config(method, config, s), task_dir / "train",
                      hparams={"method": method.name, "task": task, "finetune": config.to_dict()})
    t_train = time.perf_counter()
    history = trainer.train(resume=bool(list_checkpoints(task_dir / "train")))
    train_wall = time.perf_counter() - t_train - wrapped.session_eval_seconds
    wrapped.measure(config.steps)  # final point (skipped if the curve has it already)
    final = wrapped.curve[-1]
    curve = np.asarray(wrapped.curve, dtype=np.float64)
    agent.model.eval()
    # wall time of this call: a resumed task counts only the time after resuming
    total = time.perf_counter() - t_start
    return {
        "task": task,
        "index": index,
        "method": method.name,
        "seed": seed,
        "success": float(final[1]),
        "mean_return": float(final[2]),
        "target_return": agent.target_return(task),
        "trainable_params": int(trainable),
        "finetune_seconds": total,
        "train_seconds": train_wall,
        "eval_seconds": wrapped.eval_seconds,
        "eva_seconds": eva_seconds,
        "eva_share": min(eva_seconds / total, 1.0) if total > 0 else 0.0,
        "first_grad_norm": float(history[0][2]) if history else None,
        "loss_curve": loss_curve(history, config.log_every),
        "success_curve": {"steps": curve[:, 0].astype(int).tolist(),
                          "success": curve[:, 1].tolist(), "return": curve[:, 2].tolist()},
        "auc": success_auc(curve[:, 1], curve[:, 0]) if len(curve) > 1 else float(curve[0, 1]),
        "eva_ranks": ranks,
        "eva": None if eva_result is None else {
            "batches_used": eva_result.batches_used, "stop_reason": eva_result.stop_reason,
            "seconds": eva_result.seconds},
    }

