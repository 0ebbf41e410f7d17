"""`AdapterConfig`: which layers get an adapter, of which kind, rank and scale."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from eva_rl.adapters.variants import VARIANTS
from eva_rl.schema import check_known_fields

ADAPTER_KINDS = tuple(VARIANTS)  # "lora", "dora", "pissa", "olora", "adalora"
"""Adapter kinds `add_adapter` accepts (full fine-tuning is `prepare_full_finetuning`)."""

DEFAULT_TARGETS = ("blocks.*",)
"""Every `nn.Linear` under `blocks` (the transformer blocks), no embeddings or heads."""


def match_pattern(path: str, patterns: Mapping[str, Any]) -> str | None:
    """The key of `patterns` that applies to `path`: an exact key wins, else the first glob."""
    if path in patterns:
        return path
    for key in patterns:
        if fnmatch.fnmatchcase(path, key):
            return key
    return None


@dataclass
class AdapterConfig:
    """Settings of one adapter (one task): method, rank, scale and the layers it adapts."""

    method: str = "lora"
    """"lora" | "dora" | "pissa" | "olora" | "adalora" (its rank is AdaLoRA's initial rank;
    the rank budget schedule lives in `eva_rl.adapters.adalora.AdaLoraSchedule`)."""
    rank: int = 8
    """Default rank per layer (0 = the adapter leaves that layer alone)."""
    alpha: float = 8.0
    """Scale numerator: `scaling = alpha / rank` (`alpha / sqrt(rank)` with `use_rslora`)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    target_modules: Sequence[str] = DEFAULT_TARGETS
    """Module paths or fnmatch globs; only `nn.Linear` modules they match are adapted."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-layer rank overrides: exact paths or globs (an exact path wins over globs)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-layer alpha overrides, matched like `rank_pattern`."""
    use_rslora: bool = False
    """Rank-stabilised scaling `alpha / sqrt(rank)` (Kalajdzievski 2023)."""

    def __post_init__(self) -> None:
        if self.method not in ADAPTER_KINDS:
            raise ValueError(
                f"unknown adapter method {self.method!r}; expected one of {ADAPTER_KINDS}"
            )
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules is empty: name at least one module path or glob")
        _check_rank("rank", self.rank)
        for key, r in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", r)
        for key, a in {"alpha": self.alpha, **self.alpha_pattern}.items():
            if not math.isfinite(a):
                raise ValueError(f"{key} must be a finite number, got {a!r}")
        if self.use_rslora and not VARIANTS[self.method].supports_rslora:
            raise ValueError(f"use_rslora is not defined for {self.method} (its scaling is "
                             "alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def rank_for(self, path: str) -> int:
        """Rank of the layer at `path` (from `rank_pattern`, else `rank`)."""
        key = match_pattern(path, self.rank_pattern)
        return self.rank if key is None else int(self.rank_pattern[key])

    def alpha_for(self, path: str) -> float:
        """Alpha of the layer at `path` (from `alpha_pattern`, else `alpha`)."""
        key = match_pattern(path, self.alpha_pattern)
        return self.alpha if key is None else float(self.alpha_pattern[key])

    def scaling_for(self, rank: int, alpha: float) -> float:
        """`alpha / rank` (or `alpha / sqrt(rank)`); 0.0 for rank 0."""
        if rank == 0:
            return 0.0
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        check_known_fields(cls, d, "AdapterConfig fields")
        return cls(**{**d, "target_modules": tuple(d.get("target_modules", DEFAULT_TARGETS))})


def _check_rank(what: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {r!r}")
