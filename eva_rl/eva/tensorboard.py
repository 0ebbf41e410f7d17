"""Tensorboard view of an EVA result: ranks, explained-variance curves, convergence, time.

Takes any writer with `add_scalar(tag, value, step)` and `add_text(tag, text, step)` (e.g.
`torch.utils.tensorboard.SummaryWriter`). The rank bar chart PNG is made by the reports
layer (eva_rl itself does not import matplotlib).
"""

from __future__ import annotations

from typing import Any

from eva_rl.eva.result import EvaResult


def log_eva(writer: Any, result: EvaResult, step: int = 0, prefix: str = "eva") -> None:
    """Write `result` under `prefix/`.

    Scalars at `step`: `rank/<layer>`, `alpha/<layer>`, `batches_to_convergence/<layer>`
    (-1 = not converged), `batches_used`, `init_seconds`, `rank_total`, `converged` (0/1).
    Curves over the component index j (as the step axis): `explained_variance/<layer>`
    (ratio of component j) and `cumulative_explained_variance/<layer>`. Text: the rank table
    and the stop reason.
    """
    for path in result.paths:
        writer.add_scalar(f"{prefix}/rank/{path}", result.ranks[path], step)
        writer.add_scalar(f"{prefix}/alpha/{path}", result.alphas[path], step)
        conv = result.convergence_step[path]
        writer.add_scalar(f"{prefix}/batches_to_convergence/{path}",
                          -1 if conv is None else conv, step)
        if result.shared[path] != path:
            continue  # the same curve as the layer it shares an input with
        ratios = result.explained_variance_ratio[path].detach().cpu().double()
        cum = ratios.cumsum(0)
        for j, (v, c) in enumerate(zip(ratios.tolist(), cum.tolist(), strict=True)):
            writer.add_scalar(f"{prefix}/explained_variance/{path}", v, j)
            writer.add_scalar(f"{prefix}/cumulative_explained_variance/{path}", c, j)
    writer.add_scalar(f"{prefix}/batches_used", result.batches_used, step)
    writer.add_scalar(f"{prefix}/init_seconds", result.seconds, step)
    writer.add_scalar(f"{prefix}/rank_total", sum(result.ranks.values()), step)
    writer.add_scalar(f"{prefix}/converged", int(result.converged), step)
    cfg = result.config
    header = (f"EVA r={cfg.rank} rho={cfg.rho} tau={cfg.tau}: {result.batches_used} batches, "
              f"{result.seconds:.2f}s, stop: {result.stop_reason}\n\n")
    writer.add_text(f"{prefix}/ranks", header + result.table(), step)
