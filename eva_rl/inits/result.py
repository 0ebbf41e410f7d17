"""`InitResult`: what a data-driven LoRA initialisation (CorDA, LoRA-GA) computed, per layer a
truncated SVD ``U diag(S) V^T``, saved as ``init.safetensors`` + ``init.json``.

``init.json`` holds the SHA-256 of the tensor file and of its own content, so a result
modified or damaged after it was written is refused on load (as EVA's results are)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eva_rl.tensor_files import TensorFiles, load_tensors_with_meta, save_tensors_with_meta

RESULT_FORMAT = "eva-rl-init-result"
RESULT_VERSION = 1
TENSORS_FILE = "init.safetensors"
META_FILE = "init.json"
FILES = TensorFiles(TENSORS_FILE, META_FILE, RESULT_FORMAT, RESULT_VERSION, "init result")
FACTORS = ("U", "S", "V")


@dataclass
class InitResult:
    """Per-layer factors ``U`` (out, k), ``S`` (k,), ``V`` (in, k) of one initialisation.

    CorDA: the kept components of ``W C = U S Vh`` with ``V = (Vh C^-1)^T`` (k = r);
    LoRA-GA: the top 2r singular triplets of the loss gradient w.r.t. ``W`` (k = 2r).
    """

    kind: str
    """"corda" | "lora_ga"."""
    config: dict[str, Any]
    """The settings it was computed with (its config's ``to_dict()``)."""
    U: dict[str, torch.Tensor]
    S: dict[str, torch.Tensor]
    V: dict[str, torch.Tensor]
    batches_used: int
    seconds: float
    """Wall time of the computation (batches + decompositions)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        """The layers, in model order."""
        return list(self.S)

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``init.safetensors`` + ``init.json`` into ``directory`` (atomically)."""
        tensors = {f"{key}/{p}": getattr(self, key)[p].detach().cpu().contiguous()
                   for p in self.paths for key in FACTORS}
        meta = {"kind": self.kind, "config": self.config, "layers": self.paths,
                "batches_used": self.batches_used, "seconds": self.seconds, "extra": self.extra}
        return save_tensors_with_meta(directory, FILES, tensors, meta, overwrite)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> InitResult:
        """Read a result written by `save`; a clear `ValueError` on missing/corrupt files."""
        tensors, meta = load_tensors_with_meta(directory, FILES)
        factors: dict[str, dict[str, torch.Tensor]] = {key: {} for key in FACTORS}
        try:
            for p in meta["layers"]:
                for key in FACTORS:
                    factors[key][p] = tensors[f"{key}/{p}"]
        except KeyError as e:
            raise ValueError(f"{Path(directory) / TENSORS_FILE} lacks tensor {e}") from e
        return cls(kind=meta["kind"], config=meta["config"], **factors,
                   batches_used=int(meta["batches_used"]), seconds=float(meta["seconds"]),
                   extra=meta.get("extra", {}))

