"""LoRA-GA (Wang et al. 2024): LoRA from the SVD of the loss gradient w.r.t. each weight.

    result = compute_lora_ga(model, batches, LoraGaConfig(rank=8), loss_fn=lambda m, b: m.loss(b))
    apply_lora_ga(model, "hammer", result, AdapterConfig(method="lora", rank=8, alpha=8.0))

The gradient G of the loss w.r.t. each target weight is averaged over the batches (model in
train mode, only the target weights requiring grad, as PEFT's ``preprocess_loraga``); its top
2r singular triplets ``G ≈ U S V^T`` are kept. ``direction`` splits them between A (rows of
V^T) and B (columns of U times S), ``scale`` sizes B; the frozen offset -s·B0 A0 keeps
W_eff = W at init (PEFT subtracts it from W instead). So the first update of s·B A moves
along the directions of the full gradient.

The same numbers as PEFT's ``init_lora_weights="lora_ga"`` with its ``LoraGAConfig``
defaults, except that the SVD here is exact where PEFT's ``svd_lowrank(q=min(4r, ...))`` is
randomized (equal where 4r covers min(in, out); close otherwise), and ``direction="random"``
draws from ``seed`` rather than torch's global generator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from eva_rl.adapters import DEFAULT_TARGETS, AdapterConfig
from eva_rl.eva.core import adapters_off
from eva_rl.inits.common import InitSettings, add_init_adapter, float_weight, target_ranks
from eva_rl.inits.result import InitResult
from eva_rl.state import preserve_model_state

logger = logging.getLogger(__name__)

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar``, e.g. ``lambda m, b: m.loss(b)`` for the DT."""


@dataclass
class LoraGaConfig(InitSettings):
    """Settings of one LoRA-GA initialisation (PEFT's `LoraGAConfig` defaults)."""

    direction: str = "ArB2r"
    """Which of the top 2r gradient components go to A and B: "ArB2r" (A the first r, B
    the next r), "A2rBr" (the reverse), "ArBr" (A odd, B even indices), "random"."""
    scale: str = "stable"
    """Size of B: "stable" (times out^(1/4) / sqrt(stable_gamma)), "weight_svd" (its top
    value matched to W's top singular value), "gd_scale" (A and B divided by the LoRA
    scale s), "unit" (as the SVD gives it)."""
    stable_gamma: float = 16.0
    """gamma of the "stable" scale."""
    rank: int = 8
    """The adapter's rank per layer (2r gradient components are kept; 0 leaves a layer
    alone)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-layer ranks: exact paths or globs, as `AdapterConfig.rank_pattern`."""
    target_modules: Sequence[str] = DEFAULT_TARGETS
    """Layers to initialise: paths or fnmatch globs, as `AdapterConfig.target_modules`."""
    max_batches: int = 50
    """Forward-backward passes the gradient is averaged over."""
    seed: int = 0
    """Seed of ``direction="random"``."""

    def __post_init__(self) -> None:
        self.target_modules = ((self.target_modules,) if isinstance(self.target_modules, str)
                               else tuple(self.target_modules))
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if not self.stable_gamma > 0:
            raise ValueError(f"stable_gamma must be > 0, got {self.stable_gamma!r}")
        self.check_shared()


def compute_lora_ga(
    model: nn.Module,
    batches: Iterable[Any],
    config: LoraGaConfig | None = None,
    loss_fn: LossFn | None = None,
) -> InitResult:
    """The mean gradient of ``loss_fn`` w.r.t. each target weight over ``batches`` (at most
    ``config.max_batches``), then its top 2r singular triplets per layer.

    ``model`` runs in train mode with adapters off and only the target weights requiring
    grad (nothing else gets a ``.grad``); its modes, flags and active adapter are restored.
    Dropout draws from torch's global generator: seed it for a repeatable result.
    """
    config = config or LoraGaConfig()
    if loss_fn is None:
        raise ValueError("LoRA-GA needs loss_fn(model, batch), e.g. lambda m, b: m.loss(b)")
    t0 = time.perf_counter()
    ranks = target_ranks(model, config.target_modules, config.rank, config.rank_pattern, 2,
                         "LoRA-GA")
    weights = {p: model.get_submodule(p).weight for p in ranks}
    sums = {p: torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for p, w in weights.items()}
    steps = 0
    with preserve_model_state(model):
        adapters_off(model, "LoRA-GA")
        model.train()  # the gradient of the training loss, as PEFT estimates it
        model.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            if steps >= config.max_batches:
                break
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            unused = [p for p, g in zip(weights, grads, strict=True) if g is None]
            if unused:
                raise ValueError(f"LoRA-GA: the loss does not depend on target layers {unused}; "
                                 "narrow target_modules")
            for p, g in zip(weights, grads, strict=True):
                sums[p].add_(g.float())
            steps += 1
    if steps == 0:
        raise ValueError("compute_lora_ga got no batches")
    factors: dict[str, dict[str, Tensor]] = {"U": {}, "S": {}, "V": {}}
    for path, rank in ranks.items():
        u, s, vh = torch.linalg.svd(sums[path] / steps, full_matrices=False)
        k = 2 * rank
        for key, t in zip("USV", (u[:, :k], s[:k], vh[:k].T), strict=True):
            factors[key][path] = t.contiguous().cpu()
    seconds = time.perf_counter() - t0
    logger.info("LoRA-GA: %d layers, %d batches, %.2fs", len(ranks), steps, seconds)
    return InitResult(kind="lora_ga", config=config.to_dict(), **factors, batches_used=steps,
                      seconds=seconds)


def lora_ga_factors(result: InitResult, scalings: Mapping[str, float], model: nn.Module
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(A, B) per layer from the kept gradient triplets, by ``direction`` and ``scale``."""
    config = LoraGaConfig.from_dict(result.config)
    g = torch.Generator().manual_seed(config.seed)
    lora_a, lora_b = {}, {}
    for path in result.paths:
        u, s, vh = result.U[path], result.S[path], result.V[path].T
        r = s.numel() // 2
        if config.direction == "ArBr":
            a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
        elif config.direction == "A2rBr":
            a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(0, r)
        elif config.direction == "ArB2r":
            a_idx, b_idx = torch.arange(0, r), torch.arange(r, 2 * r)
        else:  # random: the same components for A and B
            a_idx = b_idx = torch.randperm(2 * r, generator=g)[:r]
        a, s_b = vh[a_idx], s[b_idx]
        b = u[:, b_idx] * s_b[None, :]
        scaling = scalings[path]
        if config.scale == "stable":
            b = b * (u.shape[0] ** 0.25 / config.stable_gamma ** 0.5)
        elif config.scale == "weight_svd" and r > 0 and s_b[0] > 0:
            top = torch.linalg.matrix_norm(float_weight(model, path), ord=2).cpu()
            b = b * (top / s_b[0])
        elif config.scale == "gd_scale" and r > 0:
            a, b = a / scaling, b / scaling
        lora_a[path], lora_b[path] = a, b
    return lora_a, lora_b


def apply_lora_ga(model: nn.Module, adapter_name: str, result: InitResult,
                  adapter_config: AdapterConfig) -> list[str]:
    """Add adapter ``adapter_name`` (method "lora") initialised from ``result``; the
    offset keeps the model's function at init. Returns the adapted paths."""
    return add_init_adapter(model, adapter_name, result, adapter_config, lora_ga_factors,
                            "lora_ga", "LoRA-GA")
