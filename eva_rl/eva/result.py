"""`EvaResult`: what one EVA run found, saved as ``eva.safetensors`` + ``eva.json``.

``eva.json`` holds the SHA-256 of the tensor file and of its own content, so a result
modified or damaged after it was written is refused on load (as adapters are)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eva_rl.eva.config import EvaConfig
from eva_rl.tensor_files import TensorFiles, load_tensors_with_meta, save_tensors_with_meta

RESULT_FORMAT = "eva-rl-eva-result"
RESULT_VERSION = 1
TENSORS_FILE = "eva.safetensors"
META_FILE = "eva.json"
FILES = TensorFiles(TENSORS_FILE, META_FILE, RESULT_FORMAT, RESULT_VERSION, "EVA result")


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
    means: dict[str, torch.Tensor] | None = None
    """(d,) running mean of each layer's inputs (None in results saved before it was kept;
    zeros when `config.center` is False)."""

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
        """The A matrices (rank_i, d) per layer: top components (reverse: lowest computed),
        whitened or rescaled to `row_norm` where the config says so."""
        out = {}
        for path, comps in self.components.items():
            r = self.ranks[path]
            k = comps.shape[0]
            rows = slice(k - r, k) if self.config.reverse else slice(0, r)
            a = comps[rows].clone()
            if self.config.whiten and r > 0:
                a = a / self.singular_values[path][rows].sqrt().clamp_min(1e-12).unsqueeze(1)
            if self.config.row_norm is not None and r > 0:
                a = a * (self.config.row_norm / a.norm(dim=1, keepdim=True).clamp_min(1e-12))
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
        tensors = {}
        for p in self.paths:
            if self.shared[p] == p:
                tensors[f"components/{p}"] = self.components[p].detach().cpu().contiguous()
                tensors[f"singular_values/{p}"] = self.singular_values[p].detach().cpu()
                tensors[f"explained_variance_ratio/{p}"] = (
                    self.explained_variance_ratio[p].detach().cpu())
                if self.means is not None:
                    tensors[f"mean/{p}"] = self.means[p].detach().cpu().contiguous()
        meta = {
            "config": self.config.to_dict(), "layers": self.paths, "ranks": self.ranks,
            "alphas": self.alphas, "shared": self.shared, "batches_used": self.batches_used,
            "convergence_step": self.convergence_step, "n_samples": self.n_samples,
            "seconds": self.seconds, "stop_reason": self.stop_reason, "extra": self.extra,
        }
        return save_tensors_with_meta(directory, FILES, tensors, meta, overwrite)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EvaResult:
        """Read a result written by `save`; a clear `ValueError` on missing/corrupt files."""
        tensors, meta = load_tensors_with_meta(directory, FILES)
        comps, svals, ratios, means = {}, {}, {}, {}
        try:
            for p in meta["layers"]:
                lead = meta["shared"][p]
                comps[p] = tensors[f"components/{lead}"]
                svals[p] = tensors[f"singular_values/{lead}"]
                ratios[p] = tensors[f"explained_variance_ratio/{lead}"]
                if f"mean/{lead}" in tensors:
                    means[p] = tensors[f"mean/{lead}"]
        except KeyError as e:
            raise ValueError(f"{Path(directory) / TENSORS_FILE} lacks tensor {e}") from e
        return cls(
            config=EvaConfig.from_dict(meta["config"]), components=comps, singular_values=svals,
            explained_variance_ratio=ratios, ranks={k: int(v) for k, v in meta["ranks"].items()},
            alphas={k: float(v) for k, v in meta["alphas"].items()}, shared=meta["shared"],
            batches_used=int(meta["batches_used"]), convergence_step=meta["convergence_step"],
            n_samples=meta["n_samples"], seconds=float(meta["seconds"]),
            stop_reason=meta["stop_reason"], extra=meta.get("extra", {}),
            means=means if len(means) == len(comps) else None,
        )
