"""`EvaConfig`: the settings of one EVA initialisation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from eva_rl.adapters import DEFAULT_TARGETS
from eva_rl.eva.incremental_svd import SOLVERS
from eva_rl.schema import check_known_fields


class TargetedSettings:
    """The JSON round trip of a settings dataclass with a ``target_modules`` field (EVA's,
    CorDA's, LoRA-GA's); a mixin without fields."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Inverse of `to_dict`; unknown keys are an error."""
        check_known_fields(cls, d, f"{cls.__name__} fields")
        return cls(**d)


@dataclass
class EvaConfig(TargetedSettings):
    """Settings of one EVA initialisation."""

    rank: int = 8
    """r: the average rank; the budget is N * r over the N target layers."""
    rho: float = 2.0
    """Each layer computes round(r * rho) components (>= 1; 1 = uniform rank r)."""
    tau: float = 0.99
    """Convergence: cosine similarity of consecutive components >= tau for every needed one."""
    max_batches: int = 100
    """Cap on forward passes; reaching it is reported (warning + `EvaResult.stop_reason`)."""
    alpha: float = 8.0
    """The adapter's alpha; `EvaResult.alphas` = alpha * rank_i / r (see `adjust_alpha`)."""
    adjust_alpha: bool = True
    """Rescale alpha per layer so alpha / rank (the LoRA scale) stays as with rank r."""
    whiten: bool = False
    """Divide each A row by sqrt(its singular value) (PEFT's `whiten`)."""
    row_norm: float | None = None
    """Rescale every A row to this norm (None: EVA's unit rows). An ablation that separates
    EVA's directions from their size: LoRA's Kaiming-uniform rows have norm 1/sqrt(3)."""
    reverse: bool = False
    """Ablation: allocate by the *lowest* ratios and use each layer's lowest computed ones."""
    center: bool = True
    """Centre activations (incremental PCA, as the reference code); False = raw second moment."""
    svd: str = "auto"
    """Solver: "auto" | "exact" | "lowrank" | "gram" (see `incremental_svd`)."""
    batch_layers: bool | None = None
    """Decompose equal-shaped layers in one batched call; None = where measured faster."""
    target_modules: Sequence[str] = DEFAULT_TARGETS
    """Layers to initialise: paths or fnmatch globs, as `AdapterConfig.target_modules`."""
    gather_distributed: bool = True
    """Under torch.distributed, all ranks' activations enter every rank's decomposition."""
    seed: int = 42
    """Seed of the randomized solver."""
    progress: bool = False
    """Show a tqdm bar over batches."""

    def __post_init__(self) -> None:
        self.target_modules = (
            (self.target_modules,) if isinstance(self.target_modules, str)
            else tuple(self.target_modules)
        )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not (math.isfinite(self.rho) and self.rho >= 1.0):
            raise ValueError(f"rho must be >= 1, got {self.rho!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau!r}")
        if int(self.max_batches) < 1:
            raise ValueError(f"max_batches must be >= 1, got {self.max_batches!r}")
        if self.row_norm is not None and not (math.isfinite(self.row_norm)
                                              and self.row_norm > 0):
            raise ValueError(f"row_norm must be a positive number or None, got {self.row_norm!r}")
        if self.svd not in SOLVERS:
            raise ValueError(f"svd must be one of {SOLVERS}, got {self.svd!r}")

    @property
    def n_components(self) -> int:
        """Components computed per layer: round(r * rho)."""
        return round(self.rank * self.rho)
