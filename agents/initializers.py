"""How a method initialises a task's new adapter: the `Initializer` protocol and its
implementations, the adapter variant's own initialisation, EVA's, CorDA's and LoRA-GA's.

An initializer computes on the frozen model with the task's own windows, then applies
the result to a new adapter named after the task, the way PEFT's ``init_lora_weights``
and its per-init sub-configs do. A data-driven one saves what it computed in the task's
directory, so a resumed task reuses it instead of computing again.

    outcome = EVA.attach(agent, "hammer-v3", dataset, adapter_config, config, seed, task_dir)
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from eva_rl.adapters import AdapterConfig, add_adapter
from eva_rl.data import TrajectoryDataset, WindowSampler
from eva_rl.eva import (
    EvaConfig,
    EvaResult,
    apply_eva,
    compute_eva,
    dt_forward_and_mask,
    dt_token_groups,
    log_eva,
)
from eva_rl.inits import (
    CORDA_MODES,
    CordaConfig,
    InitResult,
    LoraGaConfig,
    apply_init,
    compute_corda,
    compute_lora_ga,
)
from eva_rl.inits.result import META_FILE as INIT_META_FILE
from eva_rl.killpoints import kill_point
from eva_rl.tensorboard import RunLogger
from eva_rl.training.trainer import TB_DIR

if TYPE_CHECKING:
    from agents.dt_agent import DTAgent
    from agents.finetune_config import FinetuneConfig


@dataclass(frozen=True)
class InitOutcome:
    """What initialising one adapter cost and found."""

    seconds: float = 0.0
    """Wall time of the data-driven computation (0 for none; its first run's when reused)."""
    ranks: dict[str, int] | None = None
    """Rank per layer where the initializer allocates them (EVA), else None."""
    eva: EvaResult | None = None
    """EVA's result, which routing signatures reuse at no cost (None for other inits)."""


class Initializer(Protocol):
    """Adds a task's adapter to ``agent.model``, initialised from the frozen model and the
    task's data where the method says so."""

    name: str
    """Its name in records and docs."""
    min_rho: float
    """Smallest EVA rho the method runs with (routing signatures use it too)."""

    def attach(self, agent: DTAgent, task: str, dataset: TrajectoryDataset,
               adapter_config: AdapterConfig, config: FinetuneConfig, seed: int,
               task_dir: Path) -> InitOutcome:
        """Add the adapter named ``task`` to ``agent.model``, ready to train."""
        ...


@dataclass(frozen=True)
class AdapterInit:
    """The adapter variant's own initialisation (LoRA's Kaiming ``A``, PiSSA's SVD of W, ...):
    nothing is computed from data."""

    name: str = "adapter"
    min_rho: float = 1.0

    def attach(self, agent: DTAgent, task: str, dataset: TrajectoryDataset,
               adapter_config: AdapterConfig, config: FinetuneConfig, seed: int,
               task_dir: Path) -> InitOutcome:
        add_adapter(agent.model, task, adapter_config)
        return InitOutcome()


@dataclass(frozen=True)
class EvaInit:
    """EVA: ``A`` = the top (or, for the ablation, the lowest) right-singular vectors of the
    task's activations at each adapted layer, ranks redistributed per ``rho``; ``B`` = 0."""

    name: str = "eva"
    reverse: bool = False
    """Keep the lowest-variance computed components instead of the highest."""
    min_rho: float = 1.0
    """Smallest rho it runs with (``reverse`` needs spare components to choose from)."""

    def attach(self, agent: DTAgent, task: str, dataset: TrajectoryDataset,
               adapter_config: AdapterConfig, config: FinetuneConfig, seed: int,
               task_dir: Path) -> InitOutcome:
        result, _ = compute_or_load_eva(agent, dataset, self, config, seed, task_dir / "eva")
        apply_eva(agent.model, task, result, adapter_config)
        seconds = float(result.extra.get("wall_seconds", result.seconds))
        return InitOutcome(seconds=seconds, ranks=dict(result.ranks), eva=result)


LORA_ROW_NORM = 1 / math.sqrt(3)
"""Expected norm of a LoRA A row: Kaiming-uniform(a=sqrt(5)) draws U(+-1/sqrt(fan_in)) per
entry, so the squared norm is fan_in / (3 fan_in), whatever the layer's width."""


@dataclass(frozen=True)
class TaskBatches:
    """The task's batches, re-iterable: every `iter` samples the same sequence again."""

    dataset: TrajectoryDataset
    agent: DTAgent
    config: FinetuneConfig
    seed: int

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return task_batches(self.dataset, self.agent, self.config, self.seed, self.agent.device)


def task_batches(dataset: TrajectoryDataset, agent: DTAgent, config: FinetuneConfig,
                 seed: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """A data-driven init's input: sampler batches of the task's own data on ``device``."""
    cfg = agent.config
    sampler = WindowSampler([dataset], context_len=cfg.context_len,
                            reward_scale=cfg.reward_scale, state_mean=agent.state_mean,
                            state_std=agent.state_std, seed=seed + 7919)
    for _ in range(config.eva.max_batches):
        batch = sampler.sample(config.eva.batch_size)
        yield {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def compute_or_load_eva(agent: DTAgent, dataset: TrajectoryDataset, init: EvaInit,
                        config: FinetuneConfig, seed: int,
                        eva_dir: Path) -> tuple[EvaResult, bool]:
    """Compute EVA on the frozen model, or reuse the result saved in ``eva_dir``.

    Returns the result and whether it was computed now (False: loaded)."""
    if (eva_dir / "eva.json").is_file():
        return EvaResult.load(eva_dir), False
    eva = config.eva
    eva_config = EvaConfig(rank=config.adapter.rank, rho=max(eva.rho, init.min_rho),
                           tau=eva.tau, max_batches=eva.max_batches, alpha=config.adapter.alpha,
                           reverse=init.reverse, seed=seed, whiten=eva.whiten,
                           row_norm=LORA_ROW_NORM if eva.row_norm == "lora" else None)
    forward, mask_fn = dt_forward_and_mask(agent.model, eva.token_types)
    t0 = time.perf_counter()
    if eva.center == "token_type":
        result = compute_eva(agent.model, TaskBatches(dataset, agent, config, seed), eva_config,
                             forward=forward, mask_fn=mask_fn,
                             group_fn=dt_token_groups(agent.model))
    else:
        result = compute_eva(agent.model,
                             task_batches(dataset, agent, config, seed, agent.device),
                             eva_config, forward=forward, mask_fn=mask_fn)
    result.extra["wall_seconds"] = time.perf_counter() - t0  # batches + SVD
    result.save(eva_dir, overwrite=True)
    kill_point("finetune.eva_saved")
    log_dir = eva_dir.parent / "train" / TB_DIR
    with RunLogger(log_dir) as log:  # next to the Trainer's events of the same task
        log_eva(log.writer, result, step=0)
    return result, True


@dataclass(frozen=True)
class CordaInit:
    """CorDA: A, B from the SVD of W times the covariance of the layer's inputs on the
    task's windows (``ipm``: the top r components; ``kpm``: the smallest r), the change of W
    kept in the adapter as a frozen offset."""

    mode: str = "ipm"
    min_rho: float = 1.0
    result_dir: ClassVar[str] = "corda"
    """Where in the task's directory the result is saved."""

    def __post_init__(self) -> None:
        if self.mode not in CORDA_MODES:
            raise ValueError(f"CorDA mode must be one of {CORDA_MODES}, got {self.mode!r}")

    @property
    def name(self) -> str:
        """``corda_ipm`` or ``corda_kpm``."""
        return f"corda_{self.mode}"

    def attach(self, agent: DTAgent, task: str, dataset: TrajectoryDataset,
               adapter_config: AdapterConfig, config: FinetuneConfig, seed: int,
               task_dir: Path) -> InitOutcome:
        corda_config = CordaConfig(mode=self.mode, rank=adapter_config.rank,
                                   rank_pattern=dict(adapter_config.rank_pattern),
                                   target_modules=adapter_config.target_modules,
                                   max_batches=config.eva.max_batches)

        def compute() -> InitResult:
            # the rows EVA decomposes: real tokens of config.eva.token_types
            forward, mask_fn = dt_forward_and_mask(agent.model, config.eva.token_types)
            return compute_corda(agent.model,
                                 task_batches(dataset, agent, config, seed, agent.device),
                                 corda_config, forward=forward, mask_fn=mask_fn)

        return _attach_init(agent, task, adapter_config, task_dir / self.result_dir, "corda",
                            corda_config.to_dict(), compute)


@dataclass(frozen=True)
class LoraGaInit:
    """LoRA-GA: A, B from the SVD of the gradient of the DT's loss w.r.t. W on the task's
    windows (PEFT's defaults: ``ArB2r``, ``stable`` scale, gamma 16), the change of W kept
    in the adapter as a frozen offset."""

    name: str = "lora_ga"
    min_rho: float = 1.0
    result_dir: ClassVar[str] = "lora_ga"
    """Where in the task's directory the result is saved."""

    def attach(self, agent: DTAgent, task: str, dataset: TrajectoryDataset,
               adapter_config: AdapterConfig, config: FinetuneConfig, seed: int,
               task_dir: Path) -> InitOutcome:
        ga_config = LoraGaConfig(rank=adapter_config.rank,
                                 rank_pattern=dict(adapter_config.rank_pattern),
                                 target_modules=adapter_config.target_modules,
                                 max_batches=config.eva.max_batches, seed=seed)

        def compute() -> InitResult:
            return compute_lora_ga(agent.model,
                                   task_batches(dataset, agent, config, seed, agent.device),
                                   ga_config, loss_fn=_dt_loss)

        return _attach_init(agent, task, adapter_config, task_dir / self.result_dir, "lora_ga",
                            ga_config.to_dict(), compute)


def saved_init_result(initializer: Initializer, task_dir: Path) -> InitResult | None:
    """The CorDA / LoRA-GA result saved in ``task_dir`` by ``initializer`` (None for the
    other initializers)."""
    if not isinstance(initializer, (CordaInit, LoraGaInit)):
        return None
    return InitResult.load(task_dir / initializer.result_dir)


def _dt_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.loss(batch)


def _attach_init(agent: DTAgent, task: str, adapter_config: AdapterConfig, directory: Path,
                 kind: str, settings: dict[str, Any], compute: Callable[[], InitResult]
                 ) -> InitOutcome:
    """Compute (or reuse the result saved in ``directory``) and add the task's adapter."""
    if (directory / INIT_META_FILE).is_file():
        result = InitResult.load(directory)
        if result.kind != kind or result.config != settings:
            raise ValueError(f"{directory} holds a {result.kind} result computed with "
                             f"{result.config}, not {kind} with {settings}; delete it to "
                             "compute it again")
    else:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        result = compute()
        result.extra["wall_seconds"] = time.perf_counter() - t0  # batches + SVDs
        # growth of the process's peak RSS (KiB on Linux): 0 when the computation stayed
        # below an earlier peak, so a lower bound of its own peak
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result.extra["peak_rss_growth_mib"] = (rss1 - rss0) / 1024
        result.save(directory, overwrite=True)
    apply_init(agent.model, task, result, adapter_config)
    return InitOutcome(seconds=float(result.extra.get("wall_seconds", result.seconds)))
