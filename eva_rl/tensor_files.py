"""A directory's tensors with their metadata: a safetensors file and a checksummed JSON file
that carries the tensor file's SHA-256 (``"tensor_sha256"``), as EVA and CorDA/LoRA-GA
results are saved.

Kept apart from `eva_rl.io` (standard library only) because it needs safetensors and torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from eva_rl.io import atomic_write, read_checked_json, sha256_file, write_checked_json

TENSOR_SHA256 = "tensor_sha256"


@dataclass(frozen=True)
class TensorFiles:
    """One kind of saved pair: its file names, the metadata's format and version, and the
    name of what it holds in messages."""

    tensors: str
    """The safetensors file (``"eva.safetensors"``)."""
    meta: str
    """The JSON metadata file (``"eva.json"``)."""
    format: str
    """Its ``"format"`` value."""
    version: int
    """Its ``"version"`` value."""
    what: str
    """What it holds, in messages (``"EVA result"``)."""


def save_tensors_with_meta(directory: str | os.PathLike, files: TensorFiles,
                           tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                           overwrite: bool = False) -> Path:
    """Write ``tensors`` to ``directory/files.tensors`` and ``meta`` (after ``"format"`` and
    ``"version"``, before the tensor file's SHA-256) to ``directory/files.meta``
    (`write_checked_json`, indent 1), each atomically; returns ``directory``.

    `FileExistsError` if either file exists and ``overwrite`` is False."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensor_path, meta_path = d / files.tensors, d / files.meta
    if not overwrite and (tensor_path.exists() or meta_path.exists()):
        raise FileExistsError(f"{d} already holds an {files.what}; pass overwrite=True")
    head = {"format": files.format, "version": files.version}

    def write(tensor_tmp: Path) -> None:
        # the metadata (with the new tensors' checksum) is renamed in just before the
        # tensors, as adapters do: a failure before then leaves an older result intact
        save_file(dict(tensors), str(tensor_tmp))
        write_checked_json(meta_path, {**head, **meta, TENSOR_SHA256: sha256_file(tensor_tmp)},
                           indent=1)

    atomic_write(tensor_path, write)
    return d


def load_tensors_with_meta(directory: str | os.PathLike, files: TensorFiles
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` written by `save_tensors_with_meta`: a missing file, a metadata
    file of another format or version or modified since, tensors that do not match its
    checksum, or a corrupt tensor file raise one ``ValueError`` naming the file."""
    d = Path(directory)
    tensor_path, meta_path = d / files.tensors, d / files.meta
    what = files.what
    if not tensor_path.is_file():
        raise ValueError(f"{tensor_path}: no {what} tensors (file is missing)")
    meta = read_checked_json(meta_path, files.format, files.version, what)
    if meta.get(TENSOR_SHA256) != sha256_file(tensor_path):
        raise ValueError(f"{tensor_path} does not match {meta_path} (checksum differs): "
                         "modified or damaged since it was written")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{tensor_path}: corrupt {what} tensors: {err}") from err
    return tensors, meta
