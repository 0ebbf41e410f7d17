"""EVA: `compute_eva` (activations -> components -> ranks) and `apply_eva` (-> adapter).

    result = compute_eva(model, batches, EvaConfig(rank=8, rho=2.0))
    apply_eva(model, "hammer", result, AdapterConfig(method="dora", rank=8, alpha=8.0))

The base model runs with every adapter off; each target layer's input rows (padding and
unselected tokens dropped by `mask_fn`) stream into an `IncrementalSVD` (layers with the same
input share one); a layer stops being hooked once its components stop moving; the global
budget `N * r` is then spread over the layers by explained variance.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from eva_rl.adapters import AdapterConfig, adapter_layers, add_adapter, set_active_adapter
from eva_rl.eva.allocation import allocate_ranks, check_rank_possible, rescale_alpha
from eva_rl.eva.config import EvaConfig
from eva_rl.eva.hooks import (
    ActivationCollector,
    GroupFn,
    MaskFn,
    default_forward,
    find_shared_inputs,
    find_target_layers,
)
from eva_rl.eva.incremental_svd import IncrementalSVD, partial_fit_many
from eva_rl.eva.result import EvaResult
from eva_rl.state import preserve_model_state

logger = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dist_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_ranks_have(has_batch: bool) -> bool:
    """Every rank has a batch this step (so no rank waits in a collective alone)."""
    flag = torch.tensor([int(has_batch)], device=_dist_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def adapters_off(model: nn.Module, who: str = "EVA") -> None:
    """Switch every adapter off: ``who`` (EVA, CorDA, LoRA-GA) computes on the base model."""
    merged = [p for p, m in adapter_layers(model).items() if m.merged_adapter]
    if merged:
        raise RuntimeError(f"{who} needs the base model but adapters are merged in {merged}; "
                           "call unmerge_adapter(model) first")
    set_active_adapter(model, None)


def check_has_layers(model: nn.Module, paths: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` unless ``model`` has every layer in ``paths`` (those of ``what``,
    e.g. "EVA result")."""
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise ValueError(f"the model has no layers {missing} of this {what}")


def _needed(flags: torch.Tensor, rank: int, reverse: bool) -> torch.Tensor:
    """Convergence flags of the components a layer of `rank` would use."""
    k = flags.numel()
    return flags[k - rank:] if reverse else flags[:rank]


@torch.no_grad()
def compute_eva(
    model: nn.Module,
    batches: Iterable[Any],
    config: EvaConfig | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    mask_fn: MaskFn | None = None,
    group_fn: GroupFn | None = None,
) -> EvaResult:
    """Run EVA's incremental SVD over `batches` and allocate ranks.

    Args:
        model: any `nn.Module`; its target layers are `config.target_modules` (nn.Linear or
            adapter layers). Adapters are switched off during collection and restored after.
        batches: iterated once, one forward per batch, until every layer converged,
            `config.max_batches` forwards were run, or it is exhausted.
        forward: `forward(model, batch)`; default `model(**batch)` for a mapping, else
            `model(batch)`.
        mask_fn: `mask_fn(batch) -> bool (B, L)`: which token rows of each layer's `(B, L, d)`
            input enter (e.g. `dt_forward_and_mask`); None = all rows.
        group_fn: `group_fn(batch) -> long (B, L)`: each token row's group (e.g.
            `dt_token_groups`: its token type). With it, each group's mean row at each layer
            (over the first `config.max_batches` batches) is removed before the SVD, so the
            components describe the variation within groups, not between their means. This
            takes a first pass over `batches`, which must then be re-iterable (a list, or an
            object whose `iter` starts again); the result has no `means`.

    A layer's needed components are those its current allocation would use (initially all
    r * rho), as in PEFT; it is converged when each has cosine similarity >= tau with the
    previous batch's. Ranks are re-allocated after every batch.
    """
    config = config or EvaConfig()
    forward = forward or default_forward
    t0 = time.perf_counter()
    paths = find_target_layers(model, config.target_modules)
    distributed = _distributed() and config.gather_distributed
    collector = ActivationCollector(model, paths, gather=distributed)
    run = _EvaRun(paths, config)
    if group_fn is not None:
        if iter(batches) is batches:
            raise ValueError("compute_eva with group_fn passes over the batches twice: give a "
                             "list or a re-iterable object, not an iterator or generator")
        collector.group_offsets = group_means(model, batches, paths, forward, mask_fn, group_fn,
                                              config.max_batches, distributed)
    iterator = iter(batches)
    bar = None
    if config.progress and (not distributed or dist.get_rank() == 0):
        from eva_rl.progress import progress_bar

        bar = progress_bar(total=config.max_batches, desc="EVA", unit="batch", leave=False)
    try:
        with preserve_model_state(model):
            model.eval()
            adapters_off(model)
            collector.keep_raw = True
            for p in paths:
                collector.attach(p)
            while True:
                if run.step >= config.max_batches:
                    run.stop_reason = "max_batches"
                    break
                batch = next(iterator, _END)
                has = batch is not _END
                if distributed:
                    has = _all_ranks_have(has)
                if not has:
                    break
                collector.set_mask(None if mask_fn is None else mask_fn(batch),
                                   None if group_fn is None else group_fn(batch))
                forward(model, batch)
                collector.pop_groups()
                run.step += 1
                rows = collector.pop()
                if not run.groups:
                    run.setup_groups(collector)
                run.update(rows)
                done = run.update_hooks(collector)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{sum(done.values())}/{len(done)} converged")
                if all(done.values()):
                    run.stop_reason = "converged"
                    break
    finally:
        collector.close()
        if bar is not None:
            bar.close()
    if run.step == 0:
        raise ValueError("compute_eva got no batches")
    missing = [p for p, s in run.svds.items() if not s.fitted]
    if missing:
        raise ValueError(f"EVA: layers {missing} never saw >= {config.n_components} selected "
                         f"token rows in one batch; use larger batches or a looser mask_fn")
    result = run.result(time.perf_counter() - t0, distributed)
    if group_fn is not None:
        result.means = None  # the rows were centred per group: no one mean describes them
    return result


_END = object()


@torch.no_grad()
def group_means(model: nn.Module, batches: Iterable[Any], paths: list[str],
                forward: Callable[[nn.Module, Any], Any], mask_fn: MaskFn | None,
                group_fn: GroupFn, max_batches: int, gather: bool) -> dict[str, torch.Tensor]:
    """Each group's mean input row at each layer over the first ``max_batches`` batches:
    ``{path: (n_groups, d)}`` (a group without rows has a zero mean)."""
    collector = ActivationCollector(model, paths, gather=gather)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    iterator = iter(batches)
    try:
        with preserve_model_state(model):
            model.eval()
            adapters_off(model)
            for p in paths:
                collector.attach(p)
            for _ in range(max_batches):
                batch = next(iterator, _END)
                has = batch is not _END
                if gather and not _all_ranks_have(has):
                    break
                if not has:
                    break
                collector.set_mask(None if mask_fn is None else mask_fn(batch), group_fn(batch))
                forward(model, batch)
                rows, groups = collector.pop(), collector.pop_groups()
                for p, x in rows.items():
                    g = groups[p]
                    n = max(int(g.max()) + 1 if g.numel() else 0, len(counts.get(p, ())))
                    total = x.new_zeros(n, x.shape[1])
                    count = x.new_zeros(n)
                    if p in sums:
                        total[: len(sums[p])] += sums[p]
                        count[: len(counts[p])] += counts[p]
                    sums[p] = total.index_add_(0, g, x)
                    counts[p] = count.index_add_(0, g, torch.ones_like(g, dtype=x.dtype))
    finally:
        collector.close()
    return {p: sums[p] / counts[p].clamp_min(1).unsqueeze(1) for p in sums}


class _EvaRun:
    """The state of one EVA pass over the batches.

    Layers that share an input form a group led by its first member; per leader there is
    one `IncrementalSVD`, the convergence flags of its components (vs the previous batch)
    and the batch count after which it converged. `ranks` is the current allocation.
    """

    def __init__(self, paths: list[str], config: EvaConfig) -> None:
        self.paths = paths
        self.config = config
        self.budget = len(paths) * config.rank
        self.groups: dict[str, list[str]] = {}
        self.leader: dict[str, str] = {}
        self.svds: dict[str, IncrementalSVD] = {}
        self.flags: dict[str, torch.Tensor] = {}
        self.converged_at: dict[str, int | None] = {}
        self.ranks: dict[str, int] = {}
        self.step = 0
        self.stop_reason = "exhausted"

    def setup_groups(self, collector: ActivationCollector) -> None:
        """After the first forward: group shared inputs, keep only leaders hooked, make the
        SVDs; every layer starts with all its components."""
        config = self.config
        raw = collector.pop_raw()
        collector.keep_raw = False
        unused = [p for p in self.paths if p not in raw]
        if unused:
            raise ValueError(f"EVA: target layers {unused} were not called by the forward; "
                             "narrow target_modules")
        self.groups = find_shared_inputs({p: raw[p] for p in self.paths})
        for lead, members in self.groups.items():
            for p in members:
                self.leader[p] = lead
            for p in members[1:]:
                collector.detach(p)
            d = raw[lead].shape[-1]
            k = min(config.n_components, d)
            self.svds[lead] = IncrementalSVD(k, center=config.center, svd=config.svd,
                                             seed=config.seed)
            self.flags[lead] = torch.zeros(k, dtype=torch.bool)
            self.converged_at[lead] = None
        shared = {lead: m for lead, m in self.groups.items() if len(m) > 1}
        if shared:
            logger.info("EVA: layers sharing one input: %s", list(shared.values()))
        self.ranks = {p: self.svds[self.leader[p]].n_components for p in self.paths}
        check_rank_possible(config.rank, config.rho,
                            [raw[self.leader[p]].shape[-1] for p in self.paths])

    def update(self, rows: Mapping[str, torch.Tensor]) -> None:
        """Feed one batch's rows to the SVDs, refresh the flags, then re-allocate ranks."""
        leaders = [p for p in rows if p in self.svds]
        if leaders:
            prev = {p: self.svds[p].components_ for p in leaders if self.svds[p].fitted}
            updated = partial_fit_many([self.svds[p] for p in leaders],
                                       [rows[p] for p in leaders],
                                       batched=self.config.batch_layers)
            for p, ok in zip(leaders, updated, strict=True):
                if ok and p in prev:
                    sim = F.cosine_similarity(self.svds[p].components_, prev[p], dim=1)
                    self.flags[p] = (sim >= self.config.tau).cpu()
                elif ok:
                    self.flags[p] = torch.zeros_like(self.flags[p])
        if all(s.fitted for s in self.svds.values()):
            self.ranks = allocate_ranks(
                {p: self.svds[self.leader[p]].explained_variance_ratio_ for p in self.paths},
                self.budget, reverse=self.config.reverse)

    def update_hooks(self, collector: ActivationCollector) -> dict[str, bool]:
        """Unhook groups whose needed components converged; re-hook ones that need more.
        Returns per leader whether it is converged."""
        done = {}
        active = set(collector.active)
        for lead, members in self.groups.items():
            need = max(self.ranks[p] for p in members)
            ok = bool(_needed(self.flags[lead], need, self.config.reverse).all())
            if ok and lead in active:
                collector.detach(lead)
                self.converged_at[lead] = self.step
            elif not ok and lead not in active:
                collector.attach(lead)
                self.converged_at[lead] = None
            done[lead] = ok
        return done

    def result(self, seconds: float, distributed: bool) -> EvaResult:
        """The final allocation over the current components (rank 0's under DDP)."""
        config, paths = self.config, self.paths
        comps, svals, ratios, n_samples, means = {}, {}, {}, {}, {}
        for lead in self.groups:
            s = self.svds[lead]
            c, sv, r = s.components_, s.singular_values_, s.explained_variance_ratio_
            if distributed:  # rank 0's numbers everywhere, so every rank builds the same A
                dev = _dist_device()
                c, sv, r = (t.to(dev).contiguous() for t in (c, sv, r))
                for t in (c, sv, r):
                    dist.broadcast(t, src=0)
            mu = s.mean_ if s.mean_ is not None else torch.zeros(c.shape[1])
            if distributed:
                mu = mu.to(_dist_device()).contiguous()
                dist.broadcast(mu, src=0)
            comps[lead], svals[lead], ratios[lead], means[lead] = c, sv, r, mu
            n_samples[lead] = s.n_samples_seen_
        shared = {p: self.leader[p] for p in paths}
        ranks = allocate_ranks({p: ratios[shared[p]] for p in paths}, self.budget,
                               reverse=config.reverse)
        alphas = {p: rescale_alpha(config.alpha, ranks[p], config.rank) if config.adjust_alpha
                  else config.alpha for p in paths}
        result = EvaResult(
            config=config,
            components={p: comps[shared[p]] for p in paths},
            singular_values={p: svals[shared[p]] for p in paths},
            explained_variance_ratio={p: ratios[shared[p]] for p in paths},
            ranks=ranks, alphas=alphas, shared=shared, batches_used=self.step,
            convergence_step={p: self.converged_at[shared[p]] for p in paths},
            n_samples={p: n_samples[shared[p]] for p in paths},
            means={p: means[shared[p]] for p in paths},
            seconds=seconds, stop_reason=self.stop_reason,
        )
        not_conv = [p for p in paths if result.convergence_step[p] is None]
        if self.stop_reason == "max_batches":
            logger.warning("EVA: reached max_batches=%d before convergence; layers not "
                           "converged: %s (their current components are used)",
                           config.max_batches, not_conv)
        elif self.stop_reason == "exhausted":
            logger.warning("EVA: the batches ran out after %d before convergence; layers not "
                           "converged: %s (their current components are used)", self.step,
                           not_conv)
        logger.info("EVA: %d batches, %.2fs, stop: %s", self.step, seconds, self.stop_reason)
        return result


def apply_eva(
    model: nn.Module, adapter_name: str, result: EvaResult, adapter_config: AdapterConfig
) -> list[str]:
    """Add adapter `adapter_name` with A from `result` (B = 0) to the model's adapter pool.

    `adapter_config` (method "lora" or "dora") supplies the method, alpha (incl. its
    `alpha_pattern`), dropout and scaling rule; each layer of the result gets rank
    `result.ranks[path]` (0 allowed; `target_modules`/`rank_pattern` are not consulted) and,
    with `result.config.adjust_alpha`, alpha * rank / r as an exact-path `alpha_pattern` entry. For
    DoRA the magnitude is the row norm of W + s B A = W, set after A. Other adapters are left
    untouched. Returns the adapted paths.
    """
    if adapter_config.method not in ("lora", "dora"):
        raise ValueError(f"EVA initialises 'lora' or 'dora' adapters, not "
                         f"{adapter_config.method!r}")
    check_has_layers(model, result.paths, "EVA result")
    r = result.config.rank
    alpha_pattern = {}
    for p in result.paths:
        alpha = adapter_config.alpha_for(p)
        alpha_pattern[p] = (rescale_alpha(alpha, result.ranks[p], r)
                            if result.config.adjust_alpha else alpha)
    # ranks come from A's shapes; every path gets an exact alpha entry
    config = dataclasses.replace(adapter_config, alpha_pattern=alpha_pattern, rank_pattern={})
    return add_adapter(model, adapter_name, config, lora_A=result.lora_A())
