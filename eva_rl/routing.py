"""Task routing from activation subspaces: pick a task's adapter without being told the task.

A task's *signature* is, per chosen layer of the frozen base model, the principal subspace of
that layer's inputs on the task's data (EVA's incremental SVD: components `V (k, d)`, their
variances `lambda (k,)`, the running mean `mu (d,)` and the total variance `T`), plus
nearest-centroid keys for the baseline routers and a fingerprint of the base weights.

Score of a window under a task (lower = better explained), per token row `x` of a layer,
`z = x - mu`, `p = V z`, residual `e = |z|^2 - |p|^2`:

- ``"residual"`` (default): `e / d`, the residual energy per dimension (dividing by
  the width `d` makes a 128-wide and a 512-wide layer count alike);
- ``"ppca"``: the probabilistic-PCA negative log-likelihood per dimension,
  `(e / s2 + sum(p^2 / lambda) + sum(log lambda) + (d - k) log s2) / d` with the task's
  residual variance per dimension `s2 = (T - sum(lambda)) / (d - k)`. The residual is
  measured in units of the task's own spread (so layers of any scale are comparable), a
  window far from the mean *inside* the subspace is penalised too, and the log-volume
  terms stop a broad task from explaining everything.

A window's score is the mean over its rows, summed over layers. Every number a task's score
uses is that task's own, so adding a task never changes another task's scores. A task's
threshold is a quantile of its own scores on its calibration windows; a window that no task
scores within its threshold is *unknown* (`None`).

Pure torch + numpy (no environment, no agent): `agents.routing` feeds it a DT's activations.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from eva_rl.eva.result import EvaResult
from eva_rl.io import atomic_write, sha256_file, write_json_atomic

SIGNATURE_FORMAT = "eva-rl-task-signature"
SIGNATURE_VERSION = 1
SIGNATURE_TENSORS = "signature.safetensors"
SIGNATURE_META = "signature.json"
SCORES = ("ppca", "residual")
DEFAULT_QUANTILE = 0.99
_EPS = 1e-8


class SignatureError(ValueError):
    """A task signature is missing, corrupt, or from another base model."""


def model_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a model's base weights."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class LayerSubspace:
    """One layer's principal subspace of a task's inputs."""

    components: torch.Tensor
    """(k, d) orthonormal rows."""
    variances: torch.Tensor
    """(k,) variance along each component (lambda)."""
    mean: torch.Tensor
    """(d,) mean of the inputs."""
    total_variance: float
    """Sum of the variances of all d directions (T)."""

    @property
    def residual_variance(self) -> float:
        """Variance per dimension outside the subspace (s2), floored above 0."""
        k, d = self.components.shape
        rest = self.total_variance - float(self.variances.sum())
        floor = _EPS * max(self.total_variance, _EPS)
        return max(rest, floor) / max(d - k, 1)

    def row_scores(self, x: torch.Tensor, score: str) -> torch.Tensor:
        """Score (lower = better explained) of every row of `x (n, d)`: `(n,)`."""
        z = x.float() - self.mean
        p = z @ self.components.T  # (n, k)
        resid = ((z * z).sum(1) - (p * p).sum(1)).clamp_min(0.0)
        d = z.shape[1]
        if score == "residual":
            return resid / d
        if score != "ppca":
            raise ValueError(f"unknown score {score!r}; valid: {SCORES}")
        lam = self.variances.clamp_min(_EPS * max(self.total_variance, _EPS))
        s2 = self.residual_variance
        k = lam.numel()
        logdet = float(lam.log().sum()) + (d - k) * math.log(s2)
        return (resid / s2 + (p * p / lam).sum(1) + logdet) / d


@dataclass
class TaskSignature:
    """What the routers keep of one task (see the module docstring)."""

    task: str
    layers: dict[str, LayerSubspace]
    fingerprint: str
    """`model_fingerprint` of the base model the activations came from."""
    centroids: dict[str, torch.Tensor] = field(default_factory=dict)
    """Keys of the nearest-centroid routers, e.g. ``obs`` and ``embedding``."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Per score kind: the largest own score still called this task (unknown above)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_eva(cls, task: str, result: EvaResult, layers: Sequence[str], fingerprint: str,
                 **kw: Any) -> TaskSignature:
        """The subspaces of `layers` from an EVA result (which must hold their means)."""
        if result.means is None:
            raise ValueError("this EVA result has no means (saved before they were kept); "
                             "recompute it")
        missing = [p for p in layers if p not in result.components]
        if missing:
            raise ValueError(f"the EVA result has no layers {missing}")
        subspaces = {}
        for p in layers:
            n = int(result.n_samples[p])
            dof = max(n - 1 if result.config.center else n, 1)
            lam = result.singular_values[p].double() ** 2 / dof
            ratio = float(result.explained_variance_ratio[p][0])
            total = float(lam[0]) / ratio if ratio > 0 else float(lam.sum())
            subspaces[p] = LayerSubspace(result.components[p].float(), lam.float(),
                                         result.means[p].float(), total)
        return cls(task=task, layers=subspaces, fingerprint=fingerprint, **kw)

    def window_scores(self, rows: Mapping[str, torch.Tensor], window: torch.Tensor,
                      n_windows: int, score: str = "residual") -> torch.Tensor:
        """Score of each window `(n_windows,)`: per layer the mean row score of its rows
        (`window[i]` = the window of row i), summed over layers."""
        total = torch.zeros(n_windows, dtype=torch.float64)
        window = window.cpu()
        count = torch.bincount(window, minlength=n_windows).clamp_min(1).double()
        for path, sub in self.layers.items():
            if path not in rows:
                raise ValueError(f"task {self.task}: no activations of layer {path!r}")
            s = sub.row_scores(rows[path].cpu(), score).double()
            total += torch.zeros(n_windows, dtype=torch.float64).index_add_(0, window, s) / count
        return total

    def calibrate(self, rows: Mapping[str, torch.Tensor], window: torch.Tensor, n_windows: int,
                  quantile: float = DEFAULT_QUANTILE) -> dict[str, float]:
        """Set `thresholds` to the `quantile` of the task's own window scores, every kind."""
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        for kind in SCORES:
            s = self.window_scores(rows, window, n_windows, kind)
            self.thresholds[kind] = float(torch.quantile(s, quantile))
        self.extra["calibration"] = {"quantile": quantile, "windows": n_windows}
        return self.thresholds

    # ----------------------------------------------------------------------- on disk
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``signature.safetensors`` + ``signature.json`` (with the tensors' sha256)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for p, sub in self.layers.items():
            tensors[f"components/{p}"] = sub.components.detach().cpu().contiguous()
            tensors[f"variances/{p}"] = sub.variances.detach().cpu().contiguous()
            tensors[f"mean/{p}"] = sub.mean.detach().cpu().contiguous()
        for name, c in self.centroids.items():
            tensors[f"centroid/{name}"] = c.detach().cpu().float().contiguous()
        meta = {"format": SIGNATURE_FORMAT, "version": SIGNATURE_VERSION, "task": self.task,
                "fingerprint": self.fingerprint, "layers": list(self.layers),
                "total_variance": {p: s.total_variance for p, s in self.layers.items()},
                "centroids": list(self.centroids), "thresholds": self.thresholds,
                "extra": self.extra}

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata={"format": SIGNATURE_FORMAT})
            meta["tensor_sha256"] = sha256_file(tmp)
            write_json_atomic(d / SIGNATURE_META, meta, indent=1)

        atomic_write(d / SIGNATURE_TENSORS, write)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, task: str | None = None,
             fingerprint: str | None = None) -> TaskSignature:
        """Read a signature; `SignatureError` naming the task and file if it is missing,
        corrupt, of another task than `task`, or of a base other than `fingerprint`."""
        d = Path(directory)
        meta_path, tensor_path = d / SIGNATURE_META, d / SIGNATURE_TENSORS
        who = f"task {task}" if task else "task signature"
        for path in (meta_path, tensor_path):
            if not path.is_file():
                raise SignatureError(f"{who}: {path}: no task signature (file is missing)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SignatureError(f"{who}: {meta_path}: corrupt task signature ({err})") from err
        if not isinstance(meta, dict) or meta.get("format") != SIGNATURE_FORMAT:
            raise SignatureError(f"{who}: {meta_path}: not an eva-rl task signature")
        if meta.get("version") != SIGNATURE_VERSION:
            raise SignatureError(f"{who}: {meta_path}: unknown signature version "
                                 f"{meta.get('version')!r} (this code reads "
                                 f"{SIGNATURE_VERSION})")
        if task is not None and meta.get("task") != task:
            raise SignatureError(f"task {task}: {meta_path} is the signature of task "
                                 f"{meta.get('task')!r}")
        who = f"task {meta.get('task')}"
        if meta.get("tensor_sha256") != sha256_file(tensor_path):
            raise SignatureError(f"{who}: {tensor_path} does not match {meta_path} "
                                 "(checksum differs: corrupt or modified)")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise SignatureError(f"{who}: {meta_path} was computed on another base model "
                                 "(fingerprint mismatch); recompute it on this one")
        try:
            tensors = load_file(str(tensor_path))
            layers = {p: LayerSubspace(tensors[f"components/{p}"], tensors[f"variances/{p}"],
                                       tensors[f"mean/{p}"], float(meta["total_variance"][p]))
                      for p in meta["layers"]}
            centroids = {n: tensors[f"centroid/{n}"] for n in meta["centroids"]}
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
            raise SignatureError(f"{who}: {tensor_path}: corrupt task signature ({err!r})") \
                from err
        return cls(task=meta["task"], layers=layers, fingerprint=meta["fingerprint"],
                   centroids=centroids,
                   thresholds={k: float(v) for k, v in meta.get("thresholds", {}).items()},
                   extra=meta.get("extra", {}))


class SignaturePool:
    """The signatures a router chooses among, by adapter name, all of one base model.

    Tasks are added one at a time (`add`); nothing of the others is recomputed."""

    def __init__(self) -> None:
        self.signatures: dict[str, TaskSignature] = {}

    @property
    def names(self) -> list[str]:
        return list(self.signatures)

    def add(self, signature: TaskSignature, name: str | None = None) -> None:
        """Add (or replace) the signature routed to adapter `name` (default its task)."""
        name = signature.task if name is None else name
        others = [s for n, s in self.signatures.items() if n != name]
        if others and others[0].fingerprint != signature.fingerprint:
            raise SignatureError(f"task {signature.task}: its signature comes from another "
                                 f"base model than {others[0].task}'s (fingerprint mismatch)")
        if others and list(others[0].layers) != list(signature.layers):
            raise SignatureError(f"task {signature.task}: its signature covers layers "
                                 f"{list(signature.layers)}, {others[0].task}'s "
                                 f"{list(others[0].layers)}")
        self.signatures[name] = signature

    def _require(self) -> None:
        if not self.signatures:
            raise ValueError("the router has no task signatures to choose among")

    def subspace_scores(self, rows: Mapping[str, torch.Tensor], window: torch.Tensor,
                        n_windows: int, score: str = "residual") -> torch.Tensor:
        """`(n_windows, n_tasks)` scores, tasks in `names` order."""
        self._require()
        return torch.stack([s.window_scores(rows, window, n_windows, score)
                            for s in self.signatures.values()], dim=1)

    def route_subspace(self, rows: Mapping[str, torch.Tensor], window: torch.Tensor,
                       n_windows: int, score: str = "residual", unknown: bool = True
                       ) -> list[str | None]:
        """The best-explaining task per window; None where no task scores within its
        threshold (with `unknown`; tasks without a threshold never say unknown)."""
        scores = self.subspace_scores(rows, window, n_windows, score)
        names = self.names
        best = scores.argmin(dim=1).tolist()
        out: list[str | None] = [names[i] for i in best]
        if unknown:
            thr = torch.tensor([s.thresholds.get(score, math.inf)
                                for s in self.signatures.values()], dtype=scores.dtype)
            none_fits = (scores > thr).all(dim=1).tolist()
            out = [None if nf else o for o, nf in zip(out, none_fits, strict=True)]
        return out

    def route_centroid(self, key: str, features: torch.Tensor) -> list[str]:
        """Nearest centroid `key` (Euclidean) to each row of `features (n, D)`."""
        self._require()
        missing = [s.task for s in self.signatures.values() if key not in s.centroids]
        if missing:
            raise SignatureError(f"tasks {missing}: their signatures have no {key!r} centroid")
        c = torch.stack([s.centroids[key].float() for s in self.signatures.values()])
        best = torch.cdist(features.float().cpu(), c).argmin(dim=1).tolist()
        names = self.names
        return [names[i] for i in best]
