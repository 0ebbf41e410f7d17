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
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from eva_rl.adapters import (
    DEFAULT_TARGETS,
    AdapterConfig,
    active_adapter,
    adapter_layers,
    add_adapter,
    set_active_adapter,
)
from eva_rl.eva.allocation import allocate_ranks, rescale_alpha
from eva_rl.eva.hooks import (
    ActivationCollector,
    MaskFn,
    default_forward,
    find_shared_inputs,
    find_target_layers,
)
from eva_rl.eva.incremental_svd import SOLVERS, IncrementalSVD, partial_fit_many
from eva_rl.io import atomic_write, read_versioned_json, write_json_atomic
from eva_rl.schema import check_known_fields

logger = logging.getLogger(__name__)

RESULT_FORMAT = "eva-rl-eva-result"
RESULT_VERSION = 1
TENSORS_FILE = "eva.safetensors"
META_FILE = "eva.json"
STOP_REASONS = ("converged", "max_batches", "exhausted")


@dataclass
class EvaConfig:
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
        if self.svd not in SOLVERS:
            raise ValueError(f"svd must be one of {SOLVERS}, got {self.svd!r}")

    @property
    def n_components(self) -> int:
        """Components computed per layer: round(r * rho)."""
        return round(self.rank * self.rho)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaConfig:
        check_known_fields(cls, d, "EvaConfig fields")
        return cls(**d)


@dataclass
class EvaResult:
    """What EVA found: per-layer components, spectra, ranks, alphas and run statistics.

    Layers that shared an input share one decomposition: `shared[path]` is the path whose
    decomposition they use (itself for a leader) and their tensors are the same objects.
    """

    config: EvaConfig
    components: dict[str, torch.Tensor]
    """(k, d) orthonormal rows, k = round(r * rho) (or fewer if d is smaller), descending."""
    singular_values: dict[str, torch.Tensor]
    explained_variance_ratio: dict[str, torch.Tensor]
    ranks: dict[str, int]
    alphas: dict[str, float]
    shared: dict[str, str]
    batches_used: int
    convergence_step: dict[str, int | None]
    """Batch count after which the layer last became converged (None: never)."""
    n_samples: dict[str, int]
    seconds: float
    stop_reason: str
    """"converged" | "max_batches" (cap reached) | "exhausted" (the batches ran out)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return list(self.components)

    @property
    def converged(self) -> bool:
        return self.stop_reason == "converged"

    @property
    def cap_reached(self) -> bool:
        return self.stop_reason == "max_batches"

    def lora_A(self) -> dict[str, torch.Tensor]:
        """The A matrices (rank_i, d) per layer: top components (reverse: lowest computed)."""
        out = {}
        for path, comps in self.components.items():
            r = self.ranks[path]
            k = comps.shape[0]
            rows = slice(k - r, k) if self.config.reverse else slice(0, r)
            a = comps[rows].clone()
            if self.config.whiten and r > 0:
                a = a / self.singular_values[path][rows].sqrt().clamp_min(1e-12).unsqueeze(1)
            out[path] = a
        return out

    def table(self) -> str:
        """Markdown table: layer, rank, alpha, batches to convergence, top ratio."""
        lines = ["| layer | rank | alpha | converged at batch | shares with | top EV ratio |",
                 "|---|---|---|---|---|---|"]
        for p in self.paths:
            step = self.convergence_step.get(p)
            lead = self.shared[p] if self.shared[p] != p else ""
            ev = float(self.explained_variance_ratio[p][0])
            lines.append(f"| {p} | {self.ranks[p]} | {self.alphas[p]:.4g} | "
                         f"{'-' if step is None else step} | {lead} | {ev:.4f} |")
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `eva.safetensors` + `eva.json` into `directory` (atomically, per file)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensor_path, meta_path = d / TENSORS_FILE, d / META_FILE
        if not overwrite and (tensor_path.exists() or meta_path.exists()):
            raise FileExistsError(f"{d} already holds an EVA result; pass overwrite=True")
        tensors = {}
        for p in self.paths:
            if self.shared[p] == p:
                tensors[f"components/{p}"] = self.components[p].detach().cpu().contiguous()
                tensors[f"singular_values/{p}"] = self.singular_values[p].detach().cpu()
                tensors[f"explained_variance_ratio/{p}"] = (
                    self.explained_variance_ratio[p].detach().cpu())
        meta = {
            "format": RESULT_FORMAT, "version": RESULT_VERSION,
            "config": self.config.to_dict(), "layers": self.paths, "ranks": self.ranks,
            "alphas": self.alphas, "shared": self.shared, "batches_used": self.batches_used,
            "convergence_step": self.convergence_step, "n_samples": self.n_samples,
            "seconds": self.seconds, "stop_reason": self.stop_reason, "extra": self.extra,
        }
        atomic_write(tensor_path, lambda tmp: save_file(tensors, str(tmp)))
        write_json_atomic(meta_path, meta, indent=1)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EvaResult:
        """Read a result written by `save`; a clear `ValueError` on missing/corrupt files."""
        d = Path(directory)
        tensor_path, meta_path = d / TENSORS_FILE, d / META_FILE
        if not tensor_path.is_file():
            raise ValueError(f"{tensor_path}: no EVA result tensors (file is missing)")
        meta = read_versioned_json(meta_path, RESULT_FORMAT, RESULT_VERSION, "EVA result")
        tensors = load_file(str(tensor_path))
        comps, svals, ratios = {}, {}, {}
        try:
            for p in meta["layers"]:
                lead = meta["shared"][p]
                comps[p] = tensors[f"components/{lead}"]
                svals[p] = tensors[f"singular_values/{lead}"]
                ratios[p] = tensors[f"explained_variance_ratio/{lead}"]
        except KeyError as e:
            raise ValueError(f"{tensor_path} lacks tensor {e}") from e
        return cls(
            config=EvaConfig.from_dict(meta["config"]), components=comps, singular_values=svals,
            explained_variance_ratio=ratios, ranks={k: int(v) for k, v in meta["ranks"].items()},
            alphas={k: float(v) for k, v in meta["alphas"].items()}, shared=meta["shared"],
            batches_used=int(meta["batches_used"]), convergence_step=meta["convergence_step"],
            n_samples=meta["n_samples"], seconds=float(meta["seconds"]),
            stop_reason=meta["stop_reason"], extra=meta.get("extra", {}),
        )


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


class _AdaptersOff:
    """Context: `set_active_adapter(model, None)`, then the previous adapter and every
    parameter's `requires_grad` are restored."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> _AdaptersOff:
        merged = [p for p, m in adapter_layers(self.model).items() if m.merged_adapter]
        if merged:
            raise RuntimeError(f"EVA needs the base model but adapters are merged in {merged}; "
                               "call unmerge_adapter(model) first")
        self.previous = active_adapter(self.model)
        self.grads = [(p, p.requires_grad) for p in self.model.parameters()]
        set_active_adapter(self.model, None)
        return self

    def __exit__(self, *exc: object) -> None:
        if adapter_layers(self.model):
            set_active_adapter(self.model, self.previous)
        for p, flag in self.grads:
            p.requires_grad_(flag)


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
    training = model.training
    model.eval()

    svds: dict[str, IncrementalSVD] = {}
    groups: dict[str, list[str]] = {}
    flags: dict[str, torch.Tensor] = {}
    converged_at: dict[str, int | None] = {}
    ranks: dict[str, int] = {}
    budget = len(paths) * config.rank
    step, stop_reason = 0, "exhausted"
    iterator = iter(batches)
    bar = None
    if config.progress and (not distributed or dist.get_rank() == 0):
        from eva_rl.progress import progress_bar

        bar = progress_bar(total=config.max_batches, desc="EVA", unit="batch", leave=False)
    try:
        with _AdaptersOff(model):
            collector.keep_raw = True
            for p in paths:
                collector.attach(p)
            while True:
                if step >= config.max_batches:
                    stop_reason = "max_batches"
                    break
                batch = next(iterator, _END)
                has = batch is not _END
                if distributed:
                    has = _all_ranks_have(has)
                if not has:
                    break
                collector.set_mask(None if mask_fn is None else mask_fn(batch))
                forward(model, batch)
                step += 1
                rows = collector.pop()
                if not groups:
                    groups = _setup_groups(collector, paths, config, svds, flags, converged_at)
                    ranks = {p: svds[_leader(groups, p)].n_components for p in paths}
                _update(svds, rows, flags, config)
                if all(s.fitted for s in svds.values()):
                    ranks = allocate_ranks(
                        {p: svds[_leader(groups, p)].explained_variance_ratio_ for p in paths},
                        budget, reverse=config.reverse)
                done = _update_hooks(collector, groups, flags, ranks, converged_at, step, config)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{sum(done.values())}/{len(done)} converged")
                if all(done.values()):
                    stop_reason = "converged"
                    break
    finally:
        collector.close()
        model.train(training)
        if bar is not None:
            bar.close()
    if step == 0:
        raise ValueError("compute_eva got no batches")
    missing = [p for p, s in svds.items() if not s.fitted]
    if missing:
        raise ValueError(f"EVA: layers {missing} never saw >= {config.n_components} selected "
                         f"token rows in one batch; use larger batches or a looser mask_fn")
    return _make_result(config, paths, groups, svds, converged_at, step, stop_reason,
                        time.perf_counter() - t0, distributed)


_END = object()


def _leader(groups: Mapping[str, list[str]], path: str) -> str:
    for lead, members in groups.items():
        if path in members:
            return lead
    raise KeyError(path)


def _setup_groups(
    collector: ActivationCollector,
    paths: list[str],
    config: EvaConfig,
    svds: dict[str, IncrementalSVD],
    flags: dict[str, torch.Tensor],
    converged_at: dict[str, int | None],
) -> dict[str, list[str]]:
    """After the first forward: group shared inputs, keep only leaders hooked, make the SVDs."""
    raw = collector.pop_raw()
    collector.keep_raw = False
    unused = [p for p in paths if p not in raw]
    if unused:
        raise ValueError(f"EVA: target layers {unused} were not called by the forward; "
                         "narrow target_modules")
    groups = find_shared_inputs({p: raw[p] for p in paths})
    for lead, members in groups.items():
        for p in members[1:]:
            collector.detach(p)
        d = raw[lead].shape[-1]
        k = min(config.n_components, d)
        svds[lead] = IncrementalSVD(k, center=config.center, svd=config.svd, seed=config.seed)
        flags[lead] = torch.zeros(k, dtype=torch.bool)
        converged_at[lead] = None
    shared = {lead: m for lead, m in groups.items() if len(m) > 1}
    if shared:
        logger.info("EVA: layers sharing one input: %s", list(shared.values()))
    return groups


def _update(
    svds: dict[str, IncrementalSVD],
    rows: Mapping[str, torch.Tensor],
    flags: dict[str, torch.Tensor],
    config: EvaConfig,
) -> None:
    leaders = [p for p in rows if p in svds]
    if not leaders:
        return
    prev = {p: svds[p].components_ for p in leaders if svds[p].fitted}
    updated = partial_fit_many([svds[p] for p in leaders], [rows[p] for p in leaders],
                               batched=config.batch_layers)
    for p, ok in zip(leaders, updated, strict=True):
        if ok and p in prev:
            sim = F.cosine_similarity(svds[p].components_, prev[p], dim=1)
            flags[p] = (sim >= config.tau).cpu()
        elif ok:
            flags[p] = torch.zeros_like(flags[p])


def _update_hooks(
    collector: ActivationCollector,
    groups: Mapping[str, list[str]],
    flags: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    converged_at: dict[str, int | None],
    step: int,
    config: EvaConfig,
) -> dict[str, bool]:
    """Unhook layers whose needed components converged; re-hook ones that need more."""
    done = {}
    active = set(collector.active)
    for lead, members in groups.items():
        need = max(ranks[p] for p in members)
        ok = bool(_needed(flags[lead], need, config.reverse).all())
        if ok and lead in active:
            collector.detach(lead)
            converged_at[lead] = step
        elif not ok and lead not in active:
            collector.attach(lead)
            converged_at[lead] = None
        done[lead] = ok
    return done


def _make_result(
    config: EvaConfig,
    paths: list[str],
    groups: Mapping[str, list[str]],
    svds: Mapping[str, IncrementalSVD],
    converged_at: Mapping[str, int | None],
    step: int,
    stop_reason: str,
    seconds: float,
    distributed: bool,
) -> EvaResult:
    comps, svals, ratios, n_samples = {}, {}, {}, {}
    for lead in groups:
        s = svds[lead]
        c, sv, r = s.components_, s.singular_values_, s.explained_variance_ratio_
        if distributed:  # rank 0's numbers everywhere, so every rank builds the same A
            dev = _dist_device()
            c, sv, r = (t.to(dev).contiguous() for t in (c, sv, r))
            for t in (c, sv, r):
                dist.broadcast(t, src=0)
        comps[lead], svals[lead], ratios[lead] = c, sv, r
        n_samples[lead] = s.n_samples_seen_
    shared = {p: _leader(groups, p) for p in paths}
    ranks = allocate_ranks({p: ratios[shared[p]] for p in paths}, len(paths) * config.rank,
                           reverse=config.reverse)
    alphas = {p: rescale_alpha(config.alpha, ranks[p], config.rank) if config.adjust_alpha
              else config.alpha for p in paths}
    result = EvaResult(
        config=config,
        components={p: comps[shared[p]] for p in paths},
        singular_values={p: svals[shared[p]] for p in paths},
        explained_variance_ratio={p: ratios[shared[p]] for p in paths},
        ranks=ranks, alphas=alphas, shared=shared, batches_used=step,
        convergence_step={p: converged_at[shared[p]] for p in paths},
        n_samples={p: n_samples[shared[p]] for p in paths},
        seconds=seconds, stop_reason=stop_reason,
    )
    not_conv = [p for p in paths if result.convergence_step[p] is None]
    if stop_reason == "max_batches":
        logger.warning("EVA: reached max_batches=%d before convergence; layers not converged: "
                       "%s (their current components are used)", config.max_batches, not_conv)
    elif stop_reason == "exhausted":
        logger.warning("EVA: the batches ran out after %d before convergence; layers not "
                       "converged: %s (their current components are used)", step, not_conv)
    logger.info("EVA: %d batches, %.2fs, stop: %s", step, seconds, stop_reason)
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
    modules = dict(model.named_modules())
    missing = [p for p in result.paths if p not in modules]
    if missing:
        raise ValueError(f"the model has no layers {missing} of this EVA result")
    r = result.config.rank
    alpha_pattern = {}
    for p in result.paths:
        alpha = adapter_config.alpha_for(p)
        alpha_pattern[p] = (rescale_alpha(alpha, result.ranks[p], r)
                            if result.config.adjust_alpha else alpha)
    # ranks come from A's shapes; every path gets an exact alpha entry
    config = dataclasses.replace(adapter_config, alpha_pattern=alpha_pattern, rank_pattern={})
    return add_adapter(model, adapter_name, config, lora_A=result.lora_A())
