"""`EvaResult`: what one EVA run found, saved as ``eva.safetensors`` + ``eva.json``.

``eva.json`` holds the SHA-256 of the tensor file and of its own content, so a result
modified or damaged after it was written is refused on load (as adapters are)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from eva_rl.eva.config import EvaConfig
from eva_rl.io import atomic_write, read_checked_json, sha256_file, write_checked_json

RESULT_FORMAT = "eva-rl-eva-result"
RESULT_VERSION = 1
TENSORS_FILE = "eva.safetensors"
META_FILE = "eva.json"


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
                if self.means is not None:
                    tensors[f"mean/{p}"] = self.means[p].detach().cpu().contiguous()
        meta = {
            "format": RESULT_FORMAT, "version": RESULT_VERSION,
            "config": self.config.to_dict(), "layers": self.paths, "ranks": self.ranks,
            "alphas": self.alphas, "shared": self.shared, "batches_used": self.batches_used,
            "convergence_step": self.convergence_step, "n_samples": self.n_samples,
            "seconds": self.seconds, "stop_reason": self.stop_reason, "extra": self.extra,
        }

        def write(tensor_tmp: Path) -> None:
            # the metadata (with the new tensors' checksum) is renamed in just before the
            # tensors, as adapters do: a failure before then leaves an older result intact
            save_file(tensors, str(tensor_tmp))
            meta["tensor_sha256"] = sha256_file(tensor_tmp)
            write_checked_json(meta_path, meta, indent=1)

        atomic_write(tensor_path, write)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EvaResult:
        """Read a result written by `save`; a clear `ValueError` on missing/corrupt files."""
        d = Path(directory)
        tensor_path, meta_path = d / TENSORS_FILE, d / META_FILE
        if not tensor_path.is_file():
            raise ValueError(f"{tensor_path}: no EVA result tensors (file is missing)")
        meta = read_checked_json(meta_path, RESULT_FORMAT, RESULT_VERSION, "EVA result")
        if meta.get("tensor_sha256") != sha256_file(tensor_path):
            raise ValueError(f"{tensor_path} does not match {meta_path} (checksum differs): "
                             "modified or damaged since it was written")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{tensor_path}: corrupt EVA result tensors: {err}") from err
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
            raise ValueError(f"{tensor_path} lacks tensor {e}") from e
        return cls(
            config=EvaConfig.from_dict(meta["config"]), components=comps, singular_values=svals,
            explained_variance_ratio=ratios, ranks={k: int(v) for k, v in meta["ranks"].items()},
            alphas={k: float(v) for k, v in meta["alphas"].items()}, shared=meta["shared"],
            batches_used=int(meta["batches_used"]), convergence_step=meta["convergence_step"],
            n_samples=meta["n_samples"], seconds=float(meta["seconds"]),
            stop_reason=meta["stop_reason"], extra=meta.get("extra", {}),
            means=means if len(means) == len(comps) else None,
        )
