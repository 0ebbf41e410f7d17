"""CorDA (Yang et al. 2024): LoRA from the SVD of each weight times its input covariance.

    result = compute_corda(model, batches, CordaConfig(mode="ipm", rank=8))
    apply_corda(model, "hammer", result, AdapterConfig(method="lora", rank=8, alpha=8.0))

Per target layer, C = mean over samples of X^T X (X: a sample's input rows, scaled by the
absolute value of its largest entry), damped until inverting it is accurate; then
``W C = U S Vh`` and V = (Vh C^-1)^T, so that ``U S V^T = W``. The adapter starts from kept
components: ``s·B A = U_k S_k V_k^T`` with A = sqrt(S_k/s) V_k^T, B = U_k sqrt(S_k/s), and the
frozen offset -s·B0 A0 keeps W_eff = W at init (PEFT subtracts it from W instead).

- IPM ("instruction-previewed"): the top r components, those the task's inputs use most.
- KPM ("knowledge-preserved"): the smallest r, leaving the components the inputs use alone
  (the CorDA paper feeds it data of the knowledge to keep; here it gets what it is given).

The same numbers as PEFT's ``preprocess_corda`` + ``init_lora_weights="corda"`` where every
forward there sees one window (a sample): here each window of a batch is a sample, its
padded and unselected rows dropped by ``mask_fn``.
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
from eva_rl.eva.hooks import MaskFn, default_forward
from eva_rl.inits.common import InitSettings, add_init_adapter, float_weight, target_ranks
from eva_rl.inits.result import InitResult
from eva_rl.state import preserve_model_state

logger = logging.getLogger(__name__)

CORDA_MODES = ("ipm", "kpm")
INVERSE_TOLERANCE = 0.05
"""PEFT's bound on ‖C C^-1 - I‖ (Frobenius); the damping doubles until it holds."""
MAX_DAMP = 1e6


@dataclass
class CordaConfig(InitSettings):
    """Settings of one CorDA initialisation."""

    mode: str = "ipm"
    """"ipm": the top-r components (fast adaptation); "kpm": the smallest r."""
    rank: int = 8
    """Components per layer (the adapter's rank; 0 leaves a layer alone)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-layer ranks: exact paths or globs, as `AdapterConfig.rank_pattern`."""
    target_modules: Sequence[str] = DEFAULT_TARGETS
    """Layers to initialise: paths or fnmatch globs, as `AdapterConfig.target_modules`."""
    max_batches: int = 50
    """Forward passes whose inputs enter the covariances."""

    def __post_init__(self) -> None:
        self.target_modules = ((self.target_modules,) if isinstance(self.target_modules, str)
                               else tuple(self.target_modules))
        if self.mode not in CORDA_MODES:
            raise ValueError(f"mode must be one of {CORDA_MODES}, got {self.mode!r}")
        self.check_shared()


@torch.no_grad()
def compute_corda(
    model: nn.Module,
    batches: Iterable[Any],
    config: CordaConfig | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    mask_fn: MaskFn | None = None,
) -> InitResult:
    """Input covariances of the target layers over ``batches``, then each layer's kept
    components of the covariance-weighted SVD.

    Args:
        model: any `nn.Module`; adapters are switched off during collection, its train /
            eval modes restored after.
        batches: iterated once, one forward each, at most ``config.max_batches``.
        forward: ``forward(model, batch)``; default ``model(**batch)`` for a mapping.
        mask_fn: ``mask_fn(batch) -> bool (B, L)``: the rows of each layer's ``(B, L, d)``
            input that enter (e.g. `eva_rl.eva.dt_forward_and_mask`); None = all. A layer
            input of shape ``(n, d)`` is one sample.
    """
    config = config or CordaConfig()
    forward = forward or default_forward
    t0 = time.perf_counter()
    ranks = target_ranks(model, config.target_modules, config.rank, config.rank_pattern, 1,
                         "CorDA")
    hooks = _CovarianceHooks(model, list(ranks))
    steps = 0
    try:
        with preserve_model_state(model):
            model.eval()
            adapters_off(model, "CorDA")
            hooks.attach()
            for batch in batches:
                if steps >= config.max_batches:
                    break
                hooks.mask = None if mask_fn is None else mask_fn(batch)
                forward(model, batch)
                hooks.end_forward()
                steps += 1
    finally:
        hooks.close()
    if steps == 0:
        raise ValueError("compute_corda got no batches")
    unseen = [p for p, n in hooks.samples.items() if n == 0]
    if unseen:
        raise ValueError(f"CorDA: target layers {unseen} saw no selected input rows; narrow "
                         "target_modules or loosen mask_fn")
    factors: dict[str, dict[str, Tensor]] = {"U": {}, "S": {}, "V": {}}
    damps: dict[str, float] = {}
    inverses: list[tuple[Tensor, Tensor, Tensor, float]] = []  # layers sharing an input
    for path, rank in ranks.items():
        cov = hooks.sums[path] / hooks.samples[path]
        fixed, inv, damps[path] = _damped_inverse(cov, inverses)
        u, s, v = corda_eigens(float_weight(model, path), fixed, inv, rank, config.mode)
        for key, t in zip("USV", (u, s, v), strict=True):
            factors[key][path] = t.cpu()
    seconds = time.perf_counter() - t0
    logger.info("CorDA (%s): %d layers, %d batches, %.2fs", config.mode, len(ranks), steps,
                seconds)
    return InitResult(kind="corda", config=config.to_dict(), **factors, batches_used=steps,
                      seconds=seconds, extra={"samples": dict(hooks.samples), "damp": damps})


def corda_eigens(weight: Tensor, fixed_cov: Tensor, cov_inv: Tensor, rank: int, mode: str
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Kept ``U`` (out, r), ``S`` (r,), ``V`` (in, r) of ``W C = U S Vh``, V = (Vh C^-1)^T:
    the top r (``ipm``) or the smallest r (``kpm``), in descending order."""
    u, s, vh = torch.linalg.svd(weight @ fixed_cov, full_matrices=False)
    v = (vh @ cov_inv).T
    keep = slice(0, rank) if mode == "ipm" else slice(s.numel() - rank, s.numel())
    return u[:, keep].contiguous(), s[keep].contiguous(), v[:, keep].contiguous()


def corda_factors(result: InitResult, scalings: Mapping[str, float], model: nn.Module
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(A, B) per layer: A = sqrt(S/s) V^T, B = U sqrt(S/s), so s·B A = U S V^T."""
    lora_a, lora_b = {}, {}
    for path in result.paths:
        root = (result.S[path] / scalings[path]).sqrt()  # (r,); r = 0: empty
        lora_a[path] = root[:, None] * result.V[path].T
        lora_b[path] = result.U[path] * root[None, :]
    return lora_a, lora_b


def apply_corda(model: nn.Module, adapter_name: str, result: InitResult,
                adapter_config: AdapterConfig) -> list[str]:
    """Add adapter ``adapter_name`` (method "lora") initialised from ``result``; the
    offset keeps the model's function at init. Returns the adapted paths."""
    return add_init_adapter(model, adapter_name, result, adapter_config, corda_factors,
                            "corda", "CorDA")


def _damped_inverse(cov: Tensor, seen: list[tuple[Tensor, Tensor, Tensor, float]]
                    ) -> tuple[Tensor, Tensor, float]:
    """(C + damp·mean(diag C)·I, its inverse, damp), damp = 0.01 doubled until the inverse
    is accurate (PEFT's rule); reused for a covariance equal to one in ``seen`` (q, k, v)."""
    for c, fixed, inv, damp in seen:
        if c.shape == cov.shape and torch.equal(c, cov):
            return fixed, inv, damp
    n = cov.shape[0]
    mean_diag = torch.mean(torch.diag(cov))
    if not bool(torch.isfinite(cov).all()) or float(mean_diag) <= 0:
        raise ValueError("CorDA: an input covariance is zero or not finite")
    eye = torch.eye(n, device=cov.device, dtype=cov.dtype)
    damp = 0.01
    while True:
        fixed = cov + torch.diag(torch.ones(n, device=cov.device) * mean_diag * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < INVERSE_TOLERANCE:
            break
        damp *= 2
        if damp > MAX_DAMP:
            raise ValueError("CorDA: the input covariance cannot be inverted accurately")
    seen.append((cov, fixed, inv, damp))
    return fixed, inv, damp


class _CovarianceHooks:
    """Forward hooks summing each target layer's per-sample normalised Gram matrix.

    A sample's selected rows are divided by |max entry| (PEFT's normalisation); layers
    that get the same input tensor in a forward (q, k, v) reuse one Gram product."""

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        self._modules = {p: model.get_submodule(p) for p in paths}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.sums: dict[str, Tensor | None] = dict.fromkeys(paths)
        self.samples: dict[str, int] = dict.fromkeys(paths, 0)
        self.mask: Tensor | None = None
        self._last: tuple[Tensor, Tensor, int] | None = None

    def attach(self) -> None:
        for path, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(path)))

    def end_forward(self) -> None:
        self._last = None  # drop the reference to this forward's activations

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def _hook(self, path: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            if not isinstance(x, Tensor):
                raise TypeError(f"CorDA: layer {path} got a {type(x).__name__} input")
            if self._last is not None and self._last[0] is x:
                gram, n = self._last[1], self._last[2]
            else:
                gram, n = self._gram(path, x)
                self._last = (x, gram, n)
            total = self.sums[path]
            self.sums[path] = gram.clone() if total is None else total.add_(gram)
            self.samples[path] += n

        return hook

    def _gram(self, path: str, x: Tensor) -> tuple[Tensor, int]:
        """(sum over samples of X^T X / max(X)^2, number of samples) of one layer input."""
        x = x.detach()
        x = x.unsqueeze(0) if x.ndim == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
        if self.mask is None:
            keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            keep = self.mask.to(x.device).bool()
            if keep.numel() != x.shape[0] * x.shape[1]:
                raise ValueError(f"CorDA: mask has {keep.numel()} entries but layer {path} "
                                 f"has {x.shape[0] * x.shape[1]} token rows")
            keep = keep.reshape(x.shape[:2])
        rows = x[keep].float()  # (n, d), sample by sample
        counts = keep.sum(dim=1)  # (B,)
        sample = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
        top = torch.full((len(counts),), float("-inf"), device=x.device)
        top = top.scatter_reduce(0, sample, rows.amax(dim=1), "amax").abs()  # |max| per sample
        used = top[counts > 0]
        if not bool(torch.isfinite(used).all() and (used > 0).all()):
            raise ValueError(f"CorDA: a window's selected inputs at layer {path} are all zero "
                             "or not finite")
        rows = rows / top.repeat_interleave(counts)[:, None]
        gram = rows.T @ rows
        if not bool(torch.isfinite(gram).all()):
            raise ValueError(f"CorDA: non-finite inputs at layer {path}")
        return gram, int((counts > 0).sum())
