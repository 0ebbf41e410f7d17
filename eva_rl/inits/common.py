"""What CorDA and LoRA-GA share: their target layers and ranks, the frozen base model they
compute on, and adding the adapter they initialise (A and B given, W kept via an offset)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from eva_rl.adapters import AdapterConfig, add_adapter
from eva_rl.adapters.config import match_pattern
from eva_rl.eva.config import TargetedSettings
from eva_rl.eva.core import check_has_layers
from eva_rl.eva.hooks import find_target_layers
from eva_rl.inits.result import InitResult

Factors = Callable[[InitResult, Mapping[str, float], nn.Module], tuple[dict, dict]]
"""``factors(result, scalings, model) -> (lora_A, lora_B)``: the initial A, B per layer."""


def target_ranks(model: nn.Module, target_modules: Sequence[str], rank: int,
                 rank_pattern: Mapping[str, int], per_rank: int, who: str) -> dict[str, int]:
    """{path: rank} of the layers ``target_modules`` match (module order), each checked to
    have ``per_rank * rank`` <= min(in, out) components to take."""
    ranks = {}
    for path in find_target_layers(model, target_modules):
        key = match_pattern(path, rank_pattern)
        r = rank if key is None else int(rank_pattern[key])
        layer = model.get_submodule(path)
        limit = min(layer.in_features, layer.out_features)
        if per_rank * r > limit:
            raise ValueError(f"{who} rank {r} on layer {path!r} needs {per_rank * r} "
                             f"components, more than min(in, out) = {limit}")
        ranks[path] = r
    return ranks


def check_rank_config(rank: int, rank_pattern: Mapping[str, int]) -> None:
    """Ranks are integers >= 0 (0 leaves a layer alone)."""
    for what, r in {"rank": rank, **{f"rank_pattern[{k!r}]": v
                                     for k, v in rank_pattern.items()}}.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"{what} must be an integer >= 0, got {r!r}")


class InitSettings(TargetedSettings):
    """What `CordaConfig` and `LoraGaConfig` do alike with the fields they both declare
    (``rank``, ``rank_pattern``, ``target_modules``, ``max_batches``): their checks and the
    JSON round trip. A mixin without fields, so each dataclass keeps its own field order."""

    def check_shared(self) -> None:
        """Ranks are integers >= 0 and ``max_batches`` >= 1 (``ValueError`` if not)."""
        check_rank_config(self.rank, self.rank_pattern)
        if int(self.max_batches) < 1:
            raise ValueError(f"max_batches must be >= 1, got {self.max_batches!r}")


def check_ranks(result: InitResult, ranks: Mapping[str, int]) -> None:
    """Raise ``ValueError`` unless ``ranks`` ({path: rank}) are those ``result`` was
    computed for (its layers; LoRA-GA keeps 2 components per rank)."""
    per_rank = 2 if result.kind == "lora_ga" else 1
    have = {p: s.numel() // per_rank for p, s in result.S.items()}
    if have != dict(ranks):
        raise ValueError(f"this {result.kind} result has ranks {have}; the adapter asks for "
                         f"{dict(ranks)}: compute it again for these settings")


def add_init_adapter(model: nn.Module, name: str, result: InitResult,
                     adapter_config: AdapterConfig, factors: Factors, kind: str, who: str
                     ) -> list[str]:
    """Add adapter ``name`` on ``result``'s layers with A, B = ``factors(...)`` and the
    offset -s·B0 A0 that keeps W_eff = W (`add_adapter` with ``lora_B``); returns the paths.

    ``result`` must be of ``kind`` (``who`` names it: "CorDA"); ``adapter_config`` (method
    "lora") gives alpha, dropout and the scaling rule; its ranks must be those the result
    was computed for."""
    if result.kind != kind:
        raise ValueError(f"apply_{kind} needs a {who} result, got a {result.kind!r} one")
    if adapter_config.method != "lora":
        raise ValueError(f"{result.kind} initialises 'lora' adapters, not "
                         f"{adapter_config.method!r}")
    check_has_layers(model, result.paths, f"{result.kind} result")
    ranks = {p: adapter_config.rank_for(p) for p in result.paths}
    check_ranks(result, ranks)
    scalings = {p: adapter_config.scaling_for(r, adapter_config.alpha_for(p))
                for p, r in ranks.items()}
    lora_a, lora_b = factors(result, scalings, model)
    return add_adapter(model, name, adapter_config, lora_A=lora_a, lora_B=lora_b)


def float_weight(model: nn.Module, path: str) -> Tensor:
    """The base weight (out, in) of layer ``path`` in float32, detached."""
    return model.get_submodule(path).weight.detach().to(torch.float32)
