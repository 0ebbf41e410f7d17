"""EVA's adaptive rank allocation under a global budget.

Budget `l = N * r` over the N adapted layers (layers sharing one decomposition count
individually). Every layer offers its `r * rho` computed components with their explained
variance ratios; the `l` best over all layers are kept and a layer's rank is how many of its
own were kept (0 is possible). `reverse=True` (the paper's ablation) keeps the `l` *lowest*
ratios instead. Ties (layers that share a decomposition have identical ratios) go to the
layer that comes first in `ratios`' order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def allocate_ranks(
    ratios: Mapping[str, torch.Tensor], budget: int, reverse: bool = False
) -> dict[str, int]:
    """Per-layer ranks: how many of each layer's components are among the `budget` best.

    Args:
        ratios: layer path -> explained variance ratios of its computed components (k_i,),
            in descending order as an SVD returns them.
        budget: total number of components to hand out (`N * r`).
        reverse: keep the lowest ratios instead of the highest.
    """
    if budget < 0:
        raise ValueError(f"rank budget must be >= 0, got {budget}")
    names = list(ratios)
    if not names:
        return {}
    values = torch.cat([ratios[n].detach().double().cpu().reshape(-1) for n in names])
    owner = torch.cat([torch.full((ratios[n].numel(),), i) for i, n in enumerate(names)])
    if budget > values.numel():
        raise ValueError(
            f"rank budget {budget} exceeds the {values.numel()} computed components; "
            "raise rho or lower the rank"
        )
    # stable sort: ties keep the layer order given
    order = torch.sort(values if reverse else -values, stable=True).indices[:budget]
    counts = torch.bincount(owner[order], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts.tolist(), strict=True)}


def max_rank(widths: Sequence[int], rho: float) -> int:
    """The largest rank ``r`` whose budget ``len(widths) * r`` layers of these input
    ``widths`` can fill at ``rho`` (each computes ``min(round(r * rho), width)``
    components); 0 for no layers."""
    n = len(widths)
    for r in range(sum(widths) // n if n else 0, 0, -1):
        if sum(min(round(r * rho), w) for w in widths) >= n * r:
            return r
    return 0


def check_rank_possible(rank: int, rho: float, widths: Sequence[int]) -> None:
    """``ValueError`` naming the largest possible rank unless layers of input ``widths``
    can hold ``rank`` at ``rho`` (a rank above a layer's width has no components to fill)."""
    best = max_rank(widths, rho)
    if rank <= best:
        return
    cap = sum(widths) // len(widths)  # every component of every layer: any rho
    hint = f", or raise rho (up to rank {cap})" if cap > best else ""
    raise ValueError(
        f"rank {rank} is larger than possible: the {len(widths)} layers (input widths "
        f"{min(widths)}..{max(widths)}) allow at most rank {best} at rho {rho:g}; lower the "
        f"rank{hint}")


def rescale_alpha(alpha: float, new_rank: int, rank: int) -> float:
    """`alpha * new_rank / rank`: keeps `alpha / rank` (the LoRA scale) after reallocation."""
    return alpha * new_rank / rank
