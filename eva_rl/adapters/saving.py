"""One adapter per directory: `adapter.safetensors` (its tensors) + `adapter_config.json`.

The JSON holds the method, config, per-layer ranks / alphas / scalings, each base layer's
shape and a cheap fingerprint of its weight (a few sums), and the SHA-256 of the tensor
file, so loading onto another base, other shapes or a half-written pair fails clearly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from eva_rl.adapters.config import AdapterConfig
from eva_rl.adapters.layer import TENSOR_KEYS, AdapterLinear
from eva_rl.adapters.model import (
    _check_exists,
    _check_name,
    _check_not_merged,
    _wrap,
    adapter_layers,
    adapter_names,
    linear_layers,
    set_active_adapter,
)
from eva_rl.adapters.variants import VARIANTS
from eva_rl.io import atomic_write, read_versioned_json, sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

TENSOR_FILE = "adapter.safetensors"
META_FILE = "adapter_config.json"
FORMAT = "eva-rl-adapter"
VERSION = 1
FINGERPRINT_RTOL = 1e-4


def save_adapter(
    model: nn.Module, name: str, directory: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write adapter `name` to `directory` (created if needed); returns the directory.

    Existing adapter files there are an error unless `overwrite`.
    """
    _check_exists(model, name)
    directory = Path(directory)
    targets = [directory / TENSOR_FILE, directory / META_FILE]
    if not overwrite and any(t.exists() for t in targets):
        raise FileExistsError(f"{directory} already holds an adapter; pass overwrite=True")
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    config: AdapterConfig | None = None
    for path, layer in adapter_layers(model).items():
        if name not in layer.ranks:
            continue
        config = layer.configs[name]
        for key, t in layer.adapter_tensors(name).items():
            tensors[f"{path}.{key}"] = t.detach().to("cpu", copy=True).contiguous()
        layers[path] = {
            "rank": layer.ranks[name],
            "alpha": layer.alphas[name],
            "scaling": layer.scaling[name],
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "base_fingerprint": weight_fingerprint(layer.unmerged_weight()),
        }
    assert config is not None  # _check_exists found the adapter on some layer

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "method": config.method,
        "config": config.to_dict(),
        "layers": layers,
    }

    def write(tensor_tmp: Path) -> None:
        # the metadata (with the new tensors' checksum) is renamed in just before the
        # tensors, so a failure before then leaves a previous adapter here untouched
        save_file(tensors, str(tensor_tmp), metadata={"format": FORMAT, "name": name})
        meta.update(tensor_sha256=sha256_file(tensor_tmp), torch_version=torch.__version__)
        write_json_atomic(targets[1], meta)

    atomic_write(targets[0], write)
    logger.info("saved adapter %r (%d layers) to %s", name, len(layers), directory)
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> str:
    """Add the adapter saved in `directory` to `model` (as `name`, default the saved name),
    make it active and return its name. A different base (shapes or weights) is an error
    naming the layer; nothing is changed in the model then."""
    directory = Path(directory)
    meta = read_adapter_meta(directory)
    name = meta["name"] if name is None else name
    _check_name(name)
    _check_not_merged(model, f"load adapter {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    config = AdapterConfig.from_dict(meta["config"])
    candidates = linear_layers(model)
    for path, info in meta["layers"].items():
        _check_layer(directory, path, info, candidates)
    tensors = load_file(str(directory / TENSOR_FILE))
    per_layer: dict[str, dict[str, Tensor]] = {p: {} for p in meta["layers"]}
    for key, t in tensors.items():
        path, _, field = key.rpartition(".")
        if path not in per_layer or field not in TENSOR_KEYS:
            raise ValueError(f"{directory / TENSOR_FILE}: unexpected tensor {key!r}")
        per_layer[path][field] = t
    for path, info in meta["layers"].items():
        _check_tensors(directory, path, info, per_layer[path], config.method)
    for path, info in meta["layers"].items():
        layer = _wrap(model, path, candidates[path])
        layer.add(name, config, info["rank"], info["alpha"], tensors=per_layer[path], path=path)
    set_active_adapter(model, name)
    logger.info("loaded adapter %r (%d layers) from %s", name, len(per_layer), directory)
    return name


def read_adapter_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated `adapter_config.json` of a saved adapter."""
    directory = Path(directory)
    meta_path, tensor_path = directory / META_FILE, directory / TENSOR_FILE
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: {directory} is not a saved adapter")
    meta = read_versioned_json(meta_path, FORMAT, VERSION, "adapter config")
    if meta.get("tensor_sha256") != sha256_file(tensor_path):
        raise ValueError(f"{tensor_path} does not match {meta_path} (checksum differs)")
    return meta


def weight_fingerprint(weight: Tensor) -> list[float]:
    """Cheap identity of a weight: sum, absolute sum, squared sum, sum of every other column."""
    w = weight.detach().double()
    return [float(w.sum()), float(w.abs().sum()), float(w.square().sum()), float(w[:, ::2].sum())]


def _check_layer(
    directory: Path, path: str, info: dict[str, Any], candidates: dict[str, nn.Module]
) -> None:
    where = f"adapter in {directory}: layer {path!r}"
    if path not in candidates:
        raise ValueError(f"{where} is not an nn.Linear of this model")
    layer = candidates[path]
    shape = (layer.out_features, layer.in_features)
    saved = (info["out_features"], info["in_features"])
    if shape != saved:
        raise ValueError(f"{where} has (out, in) = {shape}; the adapter was saved for {saved}")
    weight = layer.unmerged_weight() if isinstance(layer, AdapterLinear) else layer.weight
    now, then = weight_fingerprint(weight), info["base_fingerprint"]
    scale = max(abs(then[1]), 1e-12)
    if any(abs(a - b) > FINGERPRINT_RTOL * scale for a, b in zip(now, then, strict=True)):
        raise ValueError(
            f"{where}: the base weights differ from those the adapter was saved on "
            f"(fingerprint {now} vs {then}); load the matching base model first"
        )


def _check_tensors(
    directory: Path, path: str, info: dict[str, Any], found: dict[str, Tensor], method: str
) -> None:
    r, n_in, n_out = info["rank"], info["in_features"], info["out_features"]
    expected = VARIANTS[method].tensor_shapes(r, n_in, n_out, found) if r > 0 else {}
    got = {k: tuple(t.shape) for k, t in found.items()}
    if got != expected:
        raise ValueError(
            f"{directory / TENSOR_FILE}: layer {path!r} holds tensors {got}, expected {expected}"
        )

