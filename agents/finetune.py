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

import copy
import dataclasses
import functools
import logging
import math
import resource
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
from agents.routing import RouterConfig, load_signature, save_signature, task_signature
from agents.runs import TaskRecord
from eva_rl.adapters import (
    AdaLoraAllocator,
    AdaLoraSchedule,
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
from eva_rl.schema import check_known_fields
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


EVA_CENTERS = ("mean", "token_type")
SHARED_SETTINGS = frozenset({
    "method_settings", "eval_every", "eval_at_start", "eval_episodes", "final_eval_episodes",
    "max_episode_steps", "eval_stop_on_success", "routing", "routing_after", "routing_redecide",
    "signature_rank", "seed", "progress", "device"})
"""Settings every method of a run shares (its evaluation and routing): not per method."""
EVA_ROW_NORMS = ("unit", "lora")


def _finetune_train_config() -> TrainConfig:
    """The optimisation defaults of fine-tuning (TrainConfig's own are pretraining's)."""
    return TrainConfig(steps=300, batch_size=32, lr=1e-3, warmup_steps=30, checkpoint_every=100,
                       keep_checkpoints=2)


@dataclass
class FinetuneConfig:
    """Fine-tuning settings shared by every method and task of an experiment.

    ``train`` holds the optimisation (updates, batch, learning rate of adapter methods,
    schedule, clipping, precision, device, checkpoints); its ``seed`` is replaced per task.
    ``replace`` accepts the names of ``train``'s fields too (``cfg.replace(steps=50)``).
    """

    train: TrainConfig = dataclasses.field(default_factory=_finetune_train_config)
    """Trainer settings of one task (``lr`` is the adapter methods' peak learning rate)."""
    rank: int = 4
    """Adapter rank r (EVA: the average rank, budget N * r). The paper tried 2-16; 4 was
    EVA+DoRA's best rank there and is cheap on CPU for 128-wide models."""
    alpha: float = 1.0
    """LoRA alpha (paper: 1), so the scale is alpha / r."""
    rho: float = 1.0
    """EVA redistribution factor (paper: no gain from rho = 2 in RL, so uniform rank)."""
    tau: float = 0.99
    """EVA convergence threshold (cosine similarity of consecutive components)."""
    fft_lr: float = 3e-4
    """Peak learning rate of full fine-tuning (all weights move, so smaller)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    eval_every: int = 100
    """Evaluate the task every this many updates for its success curve (0 = only at the end)."""
    eval_at_start: bool = True
    """Also evaluate before the first update (the curve's step 0: transfer at the start)."""
    eval_episodes: int = 10
    """Episodes per task and evaluation of the success curve."""
    final_eval_episodes: int | None = None
    """Episodes of the evaluation after the last update, the task's final success and the
    success-matrix rows of ``sequential`` (None = ``eval_episodes``)."""
    max_episode_steps: int = 200
    """Episode horizon (Continual World and the paper: 200)."""
    eval_stop_on_success: bool = False
    """End evaluation episodes at their first success (the same success rates, for a good
    policy a fraction of the env steps; returns then count up to the success)."""
    eva_batch_size: int = 32
    """Windows per EVA forward pass."""
    eva_max_batches: int = 50
    """Cap on EVA forward passes."""
    eva_token_types: tuple[str, ...] | None = None
    """Token types whose activations enter EVA (None = every real token)."""
    eva_center: str = "mean"
    """What EVA removes from the activations before the SVD: ``mean`` (their mean: the
    paper's incremental PCA) or ``token_type`` (each token type's own mean, so that the
    components describe variation within state, return, action and reward tokens rather
    than which kind of token a row is)."""
    eva_row_norm: str = "unit"
    """Norm of EVA's A rows: ``unit`` (the principal directions, as the paper) or ``lora``
    (rescaled to LoRA's Kaiming row norm 1/sqrt(3): the ablation that separates EVA's
    directions from the size of its first steps)."""
    eva_whiten: bool = False
    """Divide each of EVA's A rows by the square root of its singular value (PEFT's
    ``whiten``)."""
    adalora_init_rank: int | None = None
    """AdaLoRA's initial rank per layer, pruned to ``rank`` on average (None = 1.5 x rank,
    the ratio of PEFT's example: 12 -> 8)."""
    adalora_tinit: float = 0.1
    """AdaLoRA: share of the updates at the full initial budget before any pruning."""
    adalora_tfinal: float = 0.2
    """AdaLoRA: share of the updates at the end with the allocation frozen."""
    adalora_delta_t: int = 10
    """AdaLoRA: updates between two re-allocations during the budget phase."""
    adalora_orth_weight: float = 0.5
    """AdaLoRA: weight of the orthogonality regulariser of P and Q in the loss (PEFT's
    ``orth_reg_weight``; sized for a language model's loss, it is most of a Decision
    Transformer's smaller action loss)."""
    routing: str = "oracle"
    """``sequential``: how every evaluation after a task picks adapters among those trained
    so far: ``oracle`` (told the task), ``eva``, ``obs``, ``embedding`` or ``arrow``
    (`agents.routing`). Any but ``oracle`` also writes each task's routing signature
    (scripts/signatures.py writes them later for a run without)."""
    routing_after: int = 5
    """Observations of an episode seen before the router decides (the base model acts
    until then)."""
    routing_redecide: bool = False
    """Let the router decide again at every later step."""
    signature_rank: int | None = None
    """Components per layer of each task's routing signature; None: ``rank`` (EVA methods
    then reuse their own components at no cost)."""
    method_settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Settings of single methods over the shared ones, e.g. ``{"eva": {"lr": 3e-3}}``
    (each method's own, chosen on held-out tasks; names of this class and of ``train``,
    except the evaluation and routing settings, which every method shares)."""

    def __post_init__(self) -> None:
        if isinstance(self.train, Mapping):
            self.train = TrainConfig.from_dict(self.train)
        if self.eva_token_types is not None:
            self.eva_token_types = tuple(self.eva_token_types)
        self.method_settings = {m: dict(v) for m, v in dict(self.method_settings).items()}
        for name, settings in self.method_settings.items():
            self._check_method_settings(name, settings)
        if self.eva_center not in EVA_CENTERS:
            raise ValueError(f"eva_center must be one of {', '.join(EVA_CENTERS)}, "
                             f"got {self.eva_center!r}")
        if self.eva_row_norm not in EVA_ROW_NORMS:
            raise ValueError(f"eva_row_norm must be one of {', '.join(EVA_ROW_NORMS)}, "
                             f"got {self.eva_row_norm!r}")
        for name in ("rank", "eval_episodes", "max_episode_steps", "eva_batch_size",
                     "eva_max_batches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.signature_rank is not None and int(self.signature_rank) < 1:
            raise ValueError(f"signature_rank must be >= 1 (or None), got {self.signature_rank}")
        if self.final_eval_episodes is not None and int(self.final_eval_episodes) < 1:
            raise ValueError(f"final_eval_episodes must be >= 1 (or None), "
                             f"got {self.final_eval_episodes}")
        if not (0 <= self.adalora_tinit and 0 <= self.adalora_tfinal
                and self.adalora_tinit + self.adalora_tfinal < 1):
            raise ValueError("adalora_tinit and adalora_tfinal must be >= 0 with a sum below 1, "
                             f"got {self.adalora_tinit} and {self.adalora_tfinal}")
        if self.adalora_init_rank is not None and self.adalora_init_rank < self.rank:
            raise ValueError(f"adalora_init_rank ({self.adalora_init_rank}) must be >= rank "
                             f"({self.rank}), the target it is pruned to")
        if int(self.eval_every) < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        for name in ("alpha", "rho", "tau", "fft_lr", "dropout", "adalora_tinit",
                     "adalora_tfinal"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.fft_lr > 0:
            raise ValueError(f"fft_lr must be > 0, got {self.fft_lr}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        # rho >= 1 and tau in [0, 1]: EVA's own checks, now rather than at the first task
        EvaConfig(rank=self.rank, rho=self.rho, tau=self.tau)
        self.router_config()  # validates routing and routing_after

    def _check_method_settings(self, name: str, settings: Mapping[str, Any]) -> None:
        from agents.methods import get_method

        get_method(name)  # unknown -> the valid names
        shared = sorted(set(settings) & SHARED_SETTINGS)
        if shared:
            raise ValueError(f"method_settings[{name!r}]: {', '.join(shared)} are shared by "
                             "every method of a run and cannot be set per method")
        self.replace(method_settings={}, **settings)  # unknown names, bad values -> their error

    def for_method(self, method: Method) -> FinetuneConfig:
        """The settings ``method`` trains with: these, its entry of ``method_settings``, then
        the settings the method itself fixes (`Method.settings`)."""
        changes = {**self.method_settings.get(method.name, {}), **dict(method.settings)}
        return self.replace(**changes) if changes else self

    @property
    def routing_signature_rank(self) -> int:
        """Components per layer of the routing signatures: ``signature_rank`` or ``rank``."""
        return self.rank if self.signature_rank is None else self.signature_rank

    @property
    def final_episodes(self) -> int:
        """Episodes of the final evaluation of a task."""
        return self.final_eval_episodes or self.eval_episodes

    def router_config(self) -> RouterConfig:
        """The `RouterConfig` of the routing settings."""
        return RouterConfig(router=self.routing, decide_after=self.routing_after,
                            redecide=self.routing_redecide)

    def adapter_rank(self, method: Method) -> int:
        """The rank a new adapter of ``method`` starts with (AdaLoRA: its initial rank)."""
        if method.adapter == "adalora":
            return self.adalora_init_rank or math.ceil(1.5 * self.rank)
        return self.rank

    def adalora_schedule(self) -> AdaLoraSchedule:
        """AdaLoRA's budget schedule over one task's updates, pruning to ``rank``."""
        steps = self.train.steps
        return AdaLoraSchedule(total_steps=steps, target_rank=self.rank,
                               tinit=int(self.adalora_tinit * steps),
                               tfinal=int(self.adalora_tfinal * steps),
                               delta_t=self.adalora_delta_t,
                               orth_reg_weight=self.adalora_orth_weight)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy. The routing settings are left out at their defaults, so runs
        started before they existed compare equal on ``--resume``."""
        d = dataclasses.asdict(self)
        for name in _LATER_FIELDS:
            if d[name] == _LATER_FIELDS[name]:
                del d[name]
        d["train"] = self.train.to_dict()
        if self.eva_token_types is not None:
            d["eva_token_types"] = list(self.eva_token_types)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinetuneConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        check_known_fields(cls, d, "fine-tuning settings")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with some fields changed, ``train``'s included (None values: "not given")."""
        changes = {k: v for k, v in changes.items() if v is not None}
        train_names = {f.name for f in dataclasses.fields(TrainConfig)}
        train = {k: changes.pop(k) for k in list(changes) if k in train_names}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown fine-tuning settings: {', '.join(sorted(unknown))}")
        if train:
            changes["train"] = dataclasses.replace(changes.get("train", self.train), **train)
        return dataclasses.replace(self, **changes)


_LATER_FIELDS = {"routing": "oracle", "routing_after": 5, "routing_redecide": False,
                 "final_eval_episodes": None, "eval_stop_on_success": False,
                 "signature_rank": None, "eva_center": "mean", "eva_row_norm": "unit",
                 "eva_whiten": False, "adalora_orth_weight": 0.5, "method_settings": {}}
"""Fields added after runs were recorded, with their defaults (omitted there by to_dict)."""

CONFIGS: dict[str, FinetuneConfig] = {
    # one method over all of CW10 (`single`) in ~5-8 minutes on 2 CPU cores, small DT
    "cpu": FinetuneConfig(eval_every=150, eval_episodes=10),
    # the quickstart and smoke runs: a tiny DT, a few minutes for everything
    "quick": FinetuneConfig().replace(steps=120, warmup_steps=10, checkpoint_every=60,
                                      eval_every=120, eval_episodes=5, eva_max_batches=20),
    # the `bench` tier (agents/tiers.py): every method x CW10 x 3 seeds on 2 CPU cores;
    # lr (adapters: best of 1e-3 / 3e-3 / 1e-2 for lora), fft_lr (1e-3 / 3e-3) and steps
    # chosen on the MT40 tasks held out of its pretraining (docs/results/bench/tuning); 500
    # updates, where the tuning curves bend (lora 0.68 of its 0.79 at 2000): 1000 or 1500
    # updates per cell would not fit the tier's 2.5 h on 2 cores (measured 45-60 s a cell)
    "bench": FinetuneConfig().replace(steps=500, batch_size=64, lr=1e-2, fft_lr=1e-3,
                                      warmup_steps=50, checkpoint_every=250, log_every=50,
                                      eval_every=250, eval_episodes=10, final_eval_episodes=50,
                                      eval_stop_on_success=True, eva_max_batches=20),
    # the EVA paper's fine-tuning (GPU): 100k updates of batch 128, lr 1e-4
    "paper": FinetuneConfig().replace(steps=100_000, batch_size=128, lr=1e-4, fft_lr=1e-4,
                                      warmup_steps=4000, checkpoint_every=5000, log_every=100,
                                      eval_every=10_000, eval_episodes=10, eva_batch_size=128,
                                      eva_max_batches=100),
}


def get_config(name: str) -> FinetuneConfig:
    """A named configuration (a fresh copy); unknown -> one-line error with the names."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; valid configs: {', '.join(CONFIGS)}")
    return copy.deepcopy(CONFIGS[name])


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
    adapter_config = method.adapter_config(config.adapter_rank(method), config.alpha,
                                           dropout=config.dropout)
    torch.manual_seed(seed)  # LoRA's random A
    outcome = method.initializer.attach(agent, task, dataset, adapter_config, config, seed,
                                        task_dir)
    return count_parameters(model, task), outcome.seconds, outcome.ranks, outcome.eva


def ensure_signature(agent: DTAgent, task: str, dataset: TrajectoryDataset, method: Method,
                     config: FinetuneConfig, seed: int, task_dir: Path,
                     eva_result: EvaResult | None) -> tuple[TaskSignature | None, float]:
    """The task's routing signature on the frozen base, written to ``task_dir/signature/``
    (reused if there; EVA's components where the method computed them): (signature,
    seconds). None when the run does not route (``config.routing == "oracle"``;
    scripts/signatures.py writes them later) and for ``fft``, which changes the base
    itself."""
    if method.is_full or config.routing == "oracle":
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
                           rho=max(config.rho, method.min_rho), tau=config.tau,
                           max_batches=config.eva_max_batches, seed=seed)
    return task_signature(agent, task, dataset, eva_config=eva_config, eva_result=eva_result,
                          batch_size=config.eva_batch_size,
                          max_batches=config.eva_max_batches, seed=seed)


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
                        max_episode_steps=config.max_episode_steps, progress=False,
                        stop_on_success=config.eval_stop_on_success)[task]

    cfg = agent.config
    sampler = WindowSampler([dataset], context_len=cfg.context_len,
                            reward_scale=cfg.reward_scale, state_mean=agent.state_mean,
                            state_std=agent.state_std, seed=s)
    final_fn = (None if config.final_episodes == config.eval_episodes
                else functools.partial(evaluate_task, config.final_episodes))
    curve_cb = SuccessCurve(functools.partial(evaluate_task, config.eval_episodes), task,
                            config.eval_every, config.eval_at_start, final_fn)
    callbacks: list[Callback] = [curve_cb]
    loss_fn = None
    allocator = None
    if method.adapter == "adalora":
        allocator = AdaLoraAllocator(agent.model, task, config.adalora_schedule())
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
        final_episodes=config.final_episodes,
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

