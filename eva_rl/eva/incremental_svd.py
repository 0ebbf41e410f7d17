"""Streaming truncated SVD: the sequential Karhunen-Loeve / incremental-PCA update.

Each `partial_fit(x)` stacks the previous `S V` (k rows) on the new centred batch and the
mean-correction row `sqrt(n_prev n_new / (n_prev + n_new)) (mean_prev - mean_new)`,
decomposes that small matrix and keeps the top k right-singular vectors (Ross et al. 2008;
scikit-learn's `IncrementalPCA`). Memory and time per batch depend on `d` and `k`, never on
how many rows were seen before.

Three solvers give the same decomposition of the stacked matrix:
  - "exact":   `torch.linalg.svd`
  - "lowrank": `torch.svd_lowrank` (q = 2k, 4 power iterations, fixed seed)
  - "gram":    `torch.linalg.eigh` of the d x d (or m x m) Gram matrix of the stacked matrix.
"auto" picks by the rule measured in scripts/bench/bench_eva.py (see `choose_solver`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SOLVERS = ("auto", "exact", "lowrank", "gram")


def choose_solver(n_features: int, n_components: int, device: torch.device) -> str:
    """The fastest solver for a `(m, n_features)` update, as measured on the bench machines.

    CPU (shared 2-core machine, torch 2.13, one update of 640..2560 rows, k = 16; table in
    scripts/bench/bench_eva.py): Gram + `eigh` was 1.6-4x faster than the exact SVD and
    2.3-13x faster than `svd_lowrank` for d <= 128 (and fastest at d = 256 too); at d = 512
    `svd_lowrank` (q = 2k) was 1.9-4x faster than Gram. The Gram route squares the condition
    number, which costs accuracy only in the small trailing singular values, not the top-k
    components EVA keeps. GPU (not measured here): `svd_lowrank`, a few GEMMs.
    """
    if 2 * n_components >= n_features:
        return "gram" if device.type == "cpu" else "exact"
    if device.type == "cpu" and n_features <= 256:
        return "gram"
    return "lowrank"


def svd_flip_rows(vt: torch.Tensor) -> torch.Tensor:
    """Make the largest-|.| entry of every row (component) positive; works on (..., k, d)."""
    idx = vt.abs().argmax(dim=-1, keepdim=True)
    signs = torch.sign(torch.gather(vt, -1, idx))
    signs[signs == 0] = 1.0
    return vt * signs


def decompose(
    m: torch.Tensor, k: int, solver: str, *, lowrank_niter: int = 4, seed: int = 42
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k singular values `(..., k)` and sign-fixed right vectors `(..., k, d)` of `m`.

    `m` may carry leading batch dimensions (several layers decomposed in one call).
    """
    rows, d = m.shape[-2], m.shape[-1]
    if solver == "exact":
        _, s, vt = torch.linalg.svd(m, full_matrices=False)
    elif solver == "lowrank":
        q = min(2 * k, rows, d)
        devices = [m.device] if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            _, s, v = torch.svd_lowrank(m, q=q, niter=lowrank_niter)
        vt = v.mT
    elif solver == "gram":
        if rows >= d:
            evals, evecs = torch.linalg.eigh(m.mT @ m)  # ascending
            s = evals.flip(-1).clamp_min(0).sqrt()
            vt = evecs.flip(-1).mT
        else:  # wide: eigenvectors of m m^T are the left vectors; v = m^T u / s
            evals, evecs = torch.linalg.eigh(m @ m.mT)
            s = evals.flip(-1).clamp_min(0).sqrt()
            u = evecs.flip(-1)
            vt = (u.mT @ m) / s.clamp_min(torch.finfo(m.dtype).tiny).unsqueeze(-1)
    else:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS[1:]}")
    return s[..., :k], svd_flip_rows(vt[..., :k, :])


class IncrementalSVD:
    """Incremental (streaming) truncated SVD of the rows fed to `partial_fit`.

    Args:
        n_components: components kept (k).
        center: subtract the running mean (incremental PCA, the default as in the reference
            code); `False` decomposes the raw rows (uncentred second moment).
        svd: "auto" | "exact" | "lowrank" | "gram" (see module docstring).
        lowrank_niter: power iterations of `torch.svd_lowrank`.
        seed: seed of the randomized solver, so results are reproducible.

    Attributes (after the first `partial_fit`): `components_ (k, d)`, `singular_values_
    (k,)`, `explained_variance_ (k,)`, `explained_variance_ratio_ (k,)` (sigma^2 over the total
    variance of all rows seen), `mean_ (d,)`, `n_samples_seen_`.
    """

    def __init__(
        self,
        n_components: int,
        center: bool = True,
        svd: str = "auto",
        lowrank_niter: int = 4,
        seed: int = 42,
    ) -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        if svd not in SOLVERS:
            raise ValueError(f"unknown svd solver {svd!r}; expected one of {SOLVERS}")
        self.n_components = n_components
        self.center = center
        self.svd = svd
        self.lowrank_niter = lowrank_niter
        self.seed = seed
        self.n_samples_seen_ = 0
        self.n_features_: int | None = None
        self.components_: torch.Tensor | None = None
        self.singular_values_: torch.Tensor | None = None
        self.mean_: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None  # float64 running sum of rows
        self._m2: torch.Tensor | None = None  # float64 total (centred or raw) sum of squares
        self._pending: tuple | None = None

    @property
    def fitted(self) -> bool:
        return self.components_ is not None

    @property
    def solver(self) -> str:
        if self.svd != "auto":
            return self.svd
        device = self.components_.device if self.fitted else torch.device("cpu")
        return choose_solver(self.n_features_ or 0, self.n_components, device)

    @property
    def explained_variance_(self) -> torch.Tensor:
        dof = self.n_samples_seen_ - 1 if self.center else self.n_samples_seen_
        return self.singular_values_**2 / max(dof, 1)

    @property
    def explained_variance_ratio_(self) -> torch.Tensor:
        total = float(self._m2)
        if total <= 0:
            return torch.zeros_like(self.singular_values_)
        return (self.singular_values_.double() ** 2 / total).float()

    def partial_fit(self, x: torch.Tensor) -> IncrementalSVD:
        """Update with a batch of rows `x (n, d)`; needs n >= k on the first call."""
        m = self.prepare(x)
        if m is None:
            return self
        solver = self.svd
        if solver == "auto":
            solver = choose_solver(m.shape[-1], self.n_components, m.device)
        s, vt = decompose(m, self.n_components, solver, lowrank_niter=self.lowrank_niter,
                          seed=self.seed)
        self.finish(s, vt)
        return self

    # The update in two halves, so several layers' decompositions can run as one batched call
    # (`partial_fit_many`).
    def prepare(self, x: torch.Tensor) -> torch.Tensor | None:
        """Validate `x`, update the running statistics and return the matrix to decompose.

        Returns None (and changes nothing) if `x` has fewer rows than components on the first
        call, as the reference implementation does.
        """
        if x.ndim != 2:
            raise ValueError(f"partial_fit expects a 2-d (n, d) tensor, got shape {tuple(x.shape)}")
        n, d = x.shape
        if self.n_features_ is None:
            if self.n_components > d:
                raise ValueError(f"n_components={self.n_components} > n_features={d}")
            if n < self.n_components:
                return None
        elif d != self.n_features_:
            raise ValueError(f"batch has {d} features, earlier batches had {self.n_features_}")
        if n == 0:
            return None
        x = x.detach().float()
        x64_sum = x.sum(0, dtype=torch.float64)
        n_prev = self.n_samples_seen_
        n_tot = n_prev + n
        if self.center:
            mean_new = (x64_sum / n).float()
            xc = x - mean_new
            m2_new = xc.double().square().sum()
            if n_prev == 0:
                m, mean = xc, mean_new
                m2 = m2_new
            else:
                mean_prev = self.mean_
                corr = math.sqrt(n_prev * n / n_tot) * (mean_prev - mean_new)
                rows = [self.singular_values_.unsqueeze(1) * self.components_, xc, corr[None]]
                m = torch.cat(rows, 0)
                delta = (mean_prev.double() - mean_new.double())
                m2 = self._m2 + m2_new + delta.square().sum() * (n_prev * n / n_tot)
                mean = ((self._sum + x64_sum) / n_tot).float()
        else:
            m2_new = x.double().square().sum()
            if n_prev == 0:
                m = x
                m2 = m2_new
            else:
                m = torch.cat([self.singular_values_.unsqueeze(1) * self.components_, x], 0)
                m2 = self._m2 + m2_new
            mean = ((x64_sum if self._sum is None else self._sum + x64_sum) / n_tot).float()
        self._pending = (n_tot, mean, m2, x64_sum if self._sum is None else self._sum + x64_sum)
        self.n_features_ = d
        return m

    def finish(self, s: torch.Tensor, vt: torch.Tensor) -> None:
        """Store the decomposition of the matrix returned by `prepare`."""
        n_tot, mean, m2, total_sum = self._pending
        self._pending = None
        self.n_samples_seen_ = n_tot
        self.mean_, self._m2, self._sum = mean, m2, total_sum
        self.singular_values_ = s.contiguous()
        self.components_ = vt.contiguous()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors needed to continue fitting (for saving)."""
        if not self.fitted:
            raise ValueError("IncrementalSVD has not been fitted yet")
        return {
            "components": self.components_,
            "singular_values": self.singular_values_,
            "mean": self.mean_,
            "sum": self._sum,
            "m2": self._m2.reshape(1),
            "n_samples_seen": torch.tensor([self.n_samples_seen_], dtype=torch.int64),
        }


def batch_pays_off(n_features: int, device: torch.device) -> bool:
    """Whether one batched solver call beats a loop over layers (bench_eva, 6 layers):
    CPU 1.1-1.8x at d <= 128, 0.9-1.05x at d = 512; on a GPU one call saves launches."""
    return device.type == "cuda" or n_features <= 128


def partial_fit_many(
    svds: Sequence[IncrementalSVD], xs: Sequence[torch.Tensor], batched: bool | None = None
) -> list[bool]:
    """`partial_fit` several estimators; equal-shaped updates go through one batched solver call
    (`batched=None`: where `batch_pays_off`).

    Returns, per estimator, whether it was updated (False: too few rows on its first batch).
    """
    mats = [svd.prepare(x) for svd, x in zip(svds, xs, strict=True)]
    groups: dict[tuple, list[int]] = {}
    for i, (svd, m) in enumerate(zip(svds, mats, strict=True)):
        if m is None:
            continue
        solver = svd.svd if svd.svd != "auto" else choose_solver(m.shape[1], svd.n_components,
                                                                 m.device)
        key = (tuple(m.shape), svd.n_components, solver, svd.lowrank_niter, svd.seed, m.device)
        together = batch_pays_off(m.shape[1], m.device) if batched is None else batched
        groups.setdefault(key if together else (i,) + key, []).append(i)
    for key, idx in groups.items():
        first = svds[idx[0]]
        solver = key[-4]
        if len(idx) == 1:
            s, vt = decompose(mats[idx[0]], first.n_components, solver,
                              lowrank_niter=first.lowrank_niter, seed=first.seed)
            first.finish(s, vt)
            continue
        s, vt = decompose(torch.stack([mats[i] for i in idx]), first.n_components, solver,
                          lowrank_niter=first.lowrank_niter, seed=first.seed)
        for j, i in enumerate(idx):
            svds[i].finish(s[j], vt[j])
    return [m is not None for m in mats]
