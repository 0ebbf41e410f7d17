"""Hugging Face PEFT's LoRA and AdaLoRA directory formats: `export_peft` and `import_peft`.

A PEFT adapter directory holds `adapter_config.json` (a `LoraConfig` / `AdaLoraConfig` with
`peft_type`) and `adapter_model.safetensors`, whose keys are `base_model.model.<path>.lora_A
.weight`, `...lora_B.weight` and (DoRA) `...lora_magnitude_vector` for LoRA, and
`base_model.model.<path>.lora_A` / `.lora_E` / `.lora_B` for AdaLoRA; the shapes are ours.

- LoRA, DoRA and EVA adapters export as they are (EVA: `init_lora_weights="eva"` and an
  `eva_config`; its per-layer ranks and alphas as `rank_pattern` / `alpha_pattern`).
- PiSSA / OLoRA, and LoRA given A and B (CorDA, LoRA-GA), keep a frozen offset -s·B0 A0
  inside the adapter. PEFT has no such term (it edits the base weight instead), so they
  export as the exactly equivalent rank-2r LoRA  s'·[B, -B0] [A; A0]  with s' = s, i.e.
  alpha' = 2·alpha (rsLoRA: sqrt(2)·alpha): what PEFT's own conversion of such adapters
  (``path_initial_model_for_weight_conversion``) writes.
- AdaLoRA exports as PEFT's `save_pretrained` writes it: the pruned triplets (Λ = 0) are
  dropped from the tensors and `rank_pattern` holds each layer's mask of kept triplets
  (`<path>.lora_E`: [bool] x init_r). PEFT scales by `lora_alpha / (ranknum + 1e-5)` with
  `ranknum` = init_r even after its resize, ours by `alpha / r`: `lora_alpha` is written
  as `s·(init_r + 1e-5)`, the same scale s. PEFT has one `lora_alpha` and one `init_r`:
  a layer of a smaller initial rank gets its mask padded with False, one of another
  scale gets that scale's ratio folded into its Λ (the same product; noted per layer).
- `import_peft` reads a LoRA / DoRA / AdaLoRA directory as PEFT writes it
  (`save_pretrained`) into our adapter pool; whatever we cannot represent exactly is
  refused with the reason.

No import of `peft` here: the files are plain JSON and safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from eva_rl.adapters.adalora import AdaLoraSchedule
from eva_rl.adapters.config import AdapterConfig
from eva_rl.adapters.layer import AdapterLinear
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
from eva_rl.io import atomic_dir, write_json_atomic

logger = logging.getLogger(__name__)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PROVENANCE_FILE = "eva_rl_export.json"
"""Our side file in an exported directory (PEFT ignores it): source kind, EVA settings."""
PROVENANCE_FORMAT = "eva-rl-peft-export"
PROVENANCE_VERSION = 1
PEFT_PREFIX = "base_model.model."
EXPORTABLE_METHODS = ("lora", "dora", "pissa", "olora", "adalora")
OFFSET_METHODS = ("pissa", "olora")
IMPORTABLE_INITS = (True, False, "gaussian", "eva")
"""`init_lora_weights` values that only choose the initial A, B; the others (pissa, olora,
corda, loftq, ...) make PEFT rewrite the base weights, which an adapter file cannot undo."""
PEFT_ADALORA_EPS = 1e-5
"""PEFT's `SVDLinear` scales by `lora_alpha / (ranknum + 1e-5)`."""
PEFT_ADALORA_DEFAULT_INIT_R = 12
"""`AdaLoraConfig.init_r` when a config leaves it out."""

# LoraConfig fields that never change the adapted function (or are checked separately).
_NEUTRAL_FIELDS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "init_lora_weights", "eva_config", "megatron_core",
    "qalora_group_size", "runtime_config", "ensure_weight_tying", "loftq_config",
})
# AdaLoraConfig's own fields: its schedule (training only) and initial rank. PEFT's SVDLinear
# ignores use_rslora, alpha_pattern and init_lora_weights (the weights are loaded).
_ADALORA_NEUTRAL_FIELDS = _NEUTRAL_FIELDS | {
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
    "total_step",
}
# Fields that must hold exactly these values (other values change the function).
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {"bias": ("none",), "fan_in_fan_out": (False,)}
_TENSOR_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector": "lora_magnitude_vector",
    ".lora_magnitude_vector.weight": "lora_magnitude_vector",  # PEFT < 0.13 wrote this
}
_ADALORA_TENSOR_SUFFIXES = {".lora_A": "lora_A", ".lora_E": "lora_E", ".lora_B": "lora_B"}
# AdaLoraConfig field -> AdaLoraSchedule field
_ADALORA_SCHEDULE_FIELDS = {
    "total_step": "total_steps", "target_r": "target_rank", "tinit": "tinit",
    "tfinal": "tfinal", "deltaT": "delta_t", "beta1": "beta1", "beta2": "beta2",
    "orth_reg_weight": "orth_reg_weight",
}


# ------------------------------------------------------------------------------- export


def export_peft(
    model: nn.Module,
    adapter_name: str,
    directory: str | os.PathLike,
    *,
    eva: Mapping[str, Any] | Any | None = None,
    adalora: AdaLoraSchedule | Mapping[str, Any] | None = None,
    init: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write adapter `adapter_name` of `model` as a PEFT adapter directory; returns it.

    `peft.PeftModel.from_pretrained(base, directory)` then reproduces our outputs on the same
    base model (plain `nn.Linear`s at the same module paths). `eva` (an `EvaConfig` or its
    `to_dict()`) marks an EVA-initialised LoRA/DoRA adapter: `init_lora_weights="eva"` plus
    PEFT's `eva_config` fields, and all our EVA settings in `eva_rl_export.json`. An
    `adalora` adapter needs `adalora`, its `AdaLoraSchedule` (or `to_dict()`): PEFT's
    `AdaLoraConfig` requires `total_step`, `target_r`, ... Rank-0 layers are not targeted.
    `base_model` goes into PEFT's `base_model_name_or_path` (e.g. the pretraining run).
    `init` ({"kind": "corda", ...settings}) names the data-driven initialisation of a LoRA
    given A and B; it goes into `eva_rl_export.json` only (the offset is folded in).
    An existing non-empty `directory` needs `overwrite`.
    """
    _check_exists(model, adapter_name)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True")
    layers = {p: lay for p, lay in adapter_layers(model).items() if adapter_name in lay.ranks}
    for layer in layers.values():
        if layer.methods[adapter_name] not in EXPORTABLE_METHODS:
            raise ValueError(f"adapter {adapter_name!r} is of kind "
                             f"{layer.methods[adapter_name]!r}, which has no PEFT equivalent "
                             f"here; exportable kinds: {EXPORTABLE_METHODS}")
    methods = {layer.methods[adapter_name] for layer in layers.values()}
    if len(methods) != 1:
        raise ValueError(f"adapter {adapter_name!r} mixes kinds {sorted(methods)} across layers")
    (method,) = methods
    live = {p: lay for p, lay in layers.items() if lay.ranks[adapter_name] > 0}
    if not live:
        raise ValueError(f"adapter {adapter_name!r} has rank 0 on every layer: nothing to export")
    if method == "adalora":
        if eva is not None:
            raise ValueError(f"EVA initialises lora/dora adapters; {adapter_name!r} is 'adalora'")
        tensors, peft_config, provenance = _adalora_export(live, adapter_name, adalora)
    else:
        if adalora is not None:
            raise ValueError(f"adalora= (an AdaLoRA schedule) is for adalora adapters; "
                             f"{adapter_name!r} is {method!r}")
        tensors, peft_config, provenance = _lora_export(live, adapter_name, method, eva)
        if init is not None:
            provenance.update(kind=str(init.get("kind", method)), init=dict(init))
    peft_config["base_model_name_or_path"] = base_model
    provenance = {"format": PROVENANCE_FORMAT, "version": PROVENANCE_VERSION,
                  "adapter": adapter_name, **provenance, "torch_version": torch.__version__}
    with atomic_dir(directory, overwrite=directory.exists()) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        write_json_atomic(tmp / PEFT_CONFIG_FILE, peft_config)
        write_json_atomic(tmp / PROVENANCE_FILE, provenance)
    logger.info("exported %s adapter %r (%d layers) to PEFT format in %s",
                provenance["kind"], adapter_name, len(live), directory)
    return directory


def _lora_export(
    layers: Mapping[str, AdapterLinear], name: str, method: str, eva: Mapping[str, Any] | Any
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, LoraConfig JSON, provenance fields) of a LoRA-like adapter's layers."""
    eva_dict = _eva_dict(eva)
    if eva_dict is not None and method not in ("lora", "dora"):
        raise ValueError(f"EVA initialises lora/dora adapters; {name!r} is {method!r}")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    config = next(iter(layers.values())).configs[name]
    folded = any(name in layer.lora_offset_A for layer in layers.values())
    for path, layer in layers.items():
        layer_tensors, ranks[path], alphas[path] = _peft_tensors(layer, name, config)
        for key, t in layer_tensors.items():
            tensors[f"{PEFT_PREFIX}{path}.{key}"] = _cpu(t)
    provenance = {
        "kind": "eva" if eva_dict is not None else method, "method": method,
        "exported_as": (
            "rank-2r LoRA: A' = [A; A0], B' = [B, -B0] (the frozen offset folded in), "
            "alpha' chosen so that alpha'/rank' keeps the scale" if folded
            else ("DoRA" if method == "dora" else "LoRA")),
        "eva_config": eva_dict, "adapter_config": config.to_dict(),
        "layers": {p: {"rank": r, "alpha": alphas[p]} for p, r in ranks.items()},
    }
    return tensors, _peft_config(config, method, ranks, alphas, eva_dict), provenance


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _eva_dict(eva: Mapping[str, Any] | Any | None) -> dict[str, Any] | None:
    if eva is None:
        return None
    d = eva.to_dict() if hasattr(eva, "to_dict") else eva
    if not isinstance(d, Mapping):
        raise TypeError(f"eva must be an EvaConfig or a mapping, got {type(eva).__name__}")
    return dict(d)


def _peft_tensors(
    layer: AdapterLinear, name: str, config: AdapterConfig
) -> tuple[dict[str, Tensor], int, float]:
    """PEFT's tensors of one layer (suffix -> tensor), its PEFT rank and alpha."""
    t = layer.adapter_tensors(name)
    rank, alpha = layer.ranks[name], layer.alphas[name]
    if "lora_offset_A" in t:  # PiSSA, OLoRA; LoRA given A and B (CorDA, LoRA-GA)
        # s·(B A - B0 A0) = s·[B, -B0] [A; A0]: rank 2r with the same scale s
        a = torch.cat([t["lora_A"], t["lora_offset_A"]])
        b = torch.cat([t["lora_B"], -t["lora_offset_B"]], dim=1)
        rank, alpha = 2 * rank, alpha * (math.sqrt(2.0) if config.use_rslora else 2.0)
        t = {"lora_A": a, "lora_B": b}
    out = {"lora_A.weight": t["lora_A"], "lora_B.weight": t["lora_B"]}
    if "lora_magnitude_vector" in t:
        out["lora_magnitude_vector"] = t["lora_magnitude_vector"]
    return out, rank, alpha


def _peft_config(
    config: AdapterConfig, method: str, ranks: Mapping[str, int], alphas: Mapping[str, float],
    eva: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A `LoraConfig` as JSON: the most common rank / alpha, the others as exact patterns."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    rank_pattern = {p: k for p, k in ranks.items() if k != r}
    alpha_pattern = {p: a for p, a in alphas.items() if a != alpha}
    targets = list(ranks)
    for path in targets:  # PEFT matches pattern keys as regexes: check they resolve exactly
        if (peft_pattern_value(rank_pattern, path, r) != ranks[path]
                or peft_pattern_value(alpha_pattern, path, alpha) != alphas[path]):
            raise ValueError(f"layer path {path!r} is ambiguous as a PEFT pattern key")
    d: dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "inference_mode": True, "r": r, "lora_alpha": alpha, "lora_dropout": config.dropout,
        "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": config.use_rslora, "use_dora": method == "dora", "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": "eva" if eva is not None else True, "eva_config": None,
    }
    if eva is not None:
        d["eva_config"] = {
            "rho": eva.get("rho", 2.0), "tau": eva.get("tau", 0.99),
            "whiten": eva.get("whiten", False),
            "adjust_scaling_factors": eva.get("adjust_alpha", True),
        }
    return d


def peft_pattern_key(patterns: Mapping[str, Any], path: str) -> str | None:
    """The key of a PEFT `rank_pattern` / `alpha_pattern` that applies to module `path`:
    PEFT's rule, the first key `k` with `re.match(rf"(.*\\.)?({k})$", path)`; else None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def peft_pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """`patterns[key]` for PEFT's matching key of `path`, else `default`."""
    key = peft_pattern_key(patterns, path)
    return default if key is None else patterns[key]


def _adalora_export(
    layers: Mapping[str, AdapterLinear], name: str,
    schedule: AdaLoraSchedule | Mapping[str, Any] | None,
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, AdaLoraConfig JSON, provenance fields) of an AdaLoRA adapter's layers.

    Kept triplets are those with Λ != 0 (all of them when Λ = 0 everywhere: an adapter
    before training, which PEFT also saves whole)."""
    if schedule is None:
        raise ValueError(f"adapter {name!r} is an AdaLoRA adapter: pass adalora=<its "
                         "AdaLoraSchedule> (PEFT's AdaLoraConfig needs total_step, target_r, "
                         "tinit, tfinal, ...)")
    if not isinstance(schedule, AdaLoraSchedule):
        schedule = AdaLoraSchedule.from_dict(schedule)
    init_r = max(layer.ranks[name] for layer in layers.values())
    scalings = {p: layer.scaling[name] for p, layer in layers.items()}
    scale = Counter(scalings.values()).most_common(1)[0][0]  # > 0: add_adapter needs alpha > 0
    untrained = all(torch.count_nonzero(layer.lora_E[name]) == 0 for layer in layers.values())
    tensors: dict[str, Tensor] = {}
    rank_pattern: dict[str, list[bool]] = {}
    info: dict[str, dict[str, Any]] = {}
    for path, layer in layers.items():
        a, e, b = (getattr(layer, key)[name].detach() for key in ("lora_A", "lora_E", "lora_B"))
        rank = layer.ranks[name]
        keep = torch.ones(rank, dtype=torch.bool, device=e.device) if untrained else e.view(-1) != 0
        factor = scalings[path] / scale
        if factor != 1.0:  # s_l·P diag(Λ) Q = s·P diag(Λ·s_l/s) Q
            e = e * factor
        prefix = f"{PEFT_PREFIX}{path}."
        tensors[prefix + "lora_A"] = _cpu(a[keep])
        tensors[prefix + "lora_E"] = _cpu(e[keep])
        tensors[prefix + "lora_B"] = _cpu(b[:, keep])
        rank_pattern[f"{path}.lora_E"] = keep.tolist() + [False] * (init_r - rank)
        info[path] = {"init_rank": rank, "kept_rank": int(keep.sum()),
                      "alpha": layer.alphas[name], "lambda_factor": factor}
    config = next(iter(layers.values())).configs[name]
    peft_config = {
        "peft_type": "ADALORA", "task_type": None, "base_model_name_or_path": None,
        "inference_mode": True, "init_r": init_r, "target_r": schedule.target_rank,
        "lora_alpha": scale * (init_r + PEFT_ADALORA_EPS), "lora_dropout": config.dropout,
        "target_modules": list(layers), "rank_pattern": rank_pattern,
        "total_step": schedule.total_steps, "tinit": schedule.tinit, "tfinal": schedule.tfinal,
        "deltaT": schedule.delta_t, "beta1": schedule.beta1, "beta2": schedule.beta2,
        "orth_reg_weight": schedule.orth_reg_weight, "use_rslora": False, "use_dora": False,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True,
    }
    provenance = {
        "kind": "adalora", "method": "adalora",
        "exported_as": (
            "AdaLoRA: pruned triplets (lambda = 0) dropped, their masks in rank_pattern; "
            "lora_alpha = s*(init_r + 1e-5) for PEFT's scale lora_alpha / (ranknum + 1e-5); "
            "a layer of another scale s_l has lambda multiplied by lambda_factor = s_l / s"),
        "adalora_schedule": schedule.to_dict(), "adapter_config": config.to_dict(),
        "scale": scale, "layers": info,
    }
    return tensors, peft_config, provenance


# ------------------------------------------------------------------------------- import


def import_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str) -> str:
    """Add the PEFT LoRA / DoRA / AdaLoRA adapter saved in `directory` to `model` as
    `adapter_name`.

    LoRA / DoRA: ranks come from the tensors, alphas from `lora_alpha` / `alpha_pattern`
    (PEFT's matching rule), DoRA's magnitude is kept. AdaLoRA: an `adalora` adapter of rank
    `init_r` on every layer, the kept triplets at their places in `rank_pattern`'s masks
    and the pruned ones as zeros (Λ = 0; PEFT's file no longer holds their P, Q), alpha so
    that alpha / init_r is PEFT's `lora_alpha / (init_r + 1e-5)`; its schedule is
    `peft_adalora_schedule(directory)`. The adapter becomes active; its name is returned.
    Refused with a one-line `ValueError`: another `peft_type`, layers that are not
    `nn.Linear` modules of `model` (or of other shapes), and settings we cannot represent
    exactly (biases, `fan_in_fan_out`, `modules_to_save`, base-editing inits like PiSSA,
    ...). Nothing in `model` changes then.
    """
    directory = Path(directory)
    _check_name(adapter_name)
    _check_not_merged(model, f"import adapter {adapter_name!r}")
    if adapter_name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    cfg = read_peft_config(directory)
    candidates = linear_layers(model)
    if cfg["peft_type"] == "ADALORA":
        config, layers = _adalora_layers(directory, cfg, candidates)
    else:
        config, layers = _lora_layers(directory, cfg, candidates)
    for path in config.target_modules:
        rank, alpha, tensors = layers[path]
        layer = _wrap(model, path, candidates[path])
        layer.add(adapter_name, config, rank, alpha, tensors=tensors, path=path)
    set_active_adapter(model, adapter_name)
    logger.info("imported PEFT %s adapter %r (%d layers) from %s", config.method, adapter_name,
                len(layers), directory)
    return adapter_name


_Layers = dict[str, tuple[int, float, dict[str, Tensor]]]
"""{path: (rank, alpha, tensors)} of an adapter to add, checked against the model."""


def _lora_layers(
    directory: Path, cfg: Mapping[str, Any], candidates: Mapping[str, nn.Linear]
) -> tuple[AdapterConfig, _Layers]:
    """Our config and layers of a PEFT LoRA / DoRA directory."""
    per_layer = _read_peft_tensors(directory, _TENSOR_SUFFIXES)
    use_dora = bool(cfg.get("use_dora", False))
    r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    layers: _Layers = {}
    where = directory / PEFT_WEIGHTS_FILE
    for path, found in per_layer.items():
        layer = _candidate(candidates, path, where)
        if "lora_A" not in found or "lora_B" not in found:
            raise ValueError(f"{where}: layer {path!r} lacks lora_A or lora_B")
        rank = found["lora_A"].shape[0]
        expected = {"lora_A": (rank, layer.in_features), "lora_B": (layer.out_features, rank)}
        if use_dora:
            expected["lora_magnitude_vector"] = (layer.out_features,)
        _check_shapes(where, path, found, expected, " with DoRA" if use_dora else "")
        want = int(peft_pattern_value(rank_pattern, path, r_default))
        if rank != want:
            raise ValueError(f"{where}: layer {path!r} has rank {rank} but the config says {want}")
        alpha = float(peft_pattern_value(alpha_pattern, path, alpha_default))
        layers[path] = (rank, alpha, found)

    paths = [p for p in candidates if p in per_layer]  # model order
    ranks = {p: layers[p][0] for p in paths}
    alphas = {p: layers[p][1] for p in paths}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = AdapterConfig(
        method="dora" if use_dora else "lora", rank=r, alpha=alpha,
        dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=tuple(paths),
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: a for p, a in alphas.items() if a != alpha},
        use_rslora=bool(cfg.get("use_rslora", False)),
    )
    return config, layers


def _adalora_layers(
    directory: Path, cfg: Mapping[str, Any], candidates: Mapping[str, nn.Linear]
) -> tuple[AdapterConfig, _Layers]:
    """Our config and layers of a PEFT AdaLoRA directory (pruned triplets back as zeros)."""
    config_path = directory / PEFT_CONFIG_FILE
    init_r = cfg.get("init_r", PEFT_ADALORA_DEFAULT_INIT_R)
    if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r < 1:
        raise ValueError(f"{config_path}: init_r={init_r!r} is not an integer >= 1")
    lora_alpha = cfg.get("lora_alpha", 8)
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not (
            math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"{config_path}: lora_alpha={lora_alpha!r} is not a number > 0 (PEFT's "
                         "AdaLoRA then scales each layer by its kept rank)")
    masks = _adalora_masks(config_path, cfg.get("rank_pattern"), init_r)
    per_layer = _read_peft_tensors(directory, _ADALORA_TENSOR_SUFFIXES)
    orphans = sorted(set(masks) - set(per_layer))
    if orphans:
        raise ValueError(f"{config_path}: rank_pattern names layers {orphans} that "
                         f"{PEFT_WEIGHTS_FILE} holds no tensors for")
    # alpha / init_r = lora_alpha / (init_r + 1e-5): PEFT's scale (ranknum stays init_r)
    alpha = float(lora_alpha) * init_r / (init_r + PEFT_ADALORA_EPS)
    layers: _Layers = {}
    where = directory / PEFT_WEIGHTS_FILE
    for path, found in per_layer.items():
        layer = _candidate(candidates, path, where)
        keep = torch.tensor(masks.get(path, [True] * init_r), dtype=torch.bool)
        k = int(keep.sum())
        _check_shapes(where, path, found, {"lora_A": (k, layer.in_features), "lora_E": (k, 1),
                                           "lora_B": (layer.out_features, k)},
                      f" with {k} of init_r={init_r} triplets kept")
        dtype = found["lora_A"].dtype
        full = {"lora_A": torch.zeros(init_r, layer.in_features, dtype=dtype),
                "lora_E": torch.zeros(init_r, 1, dtype=dtype),
                "lora_B": torch.zeros(layer.out_features, init_r, dtype=dtype)}
        full["lora_A"][keep] = found["lora_A"]
        full["lora_E"][keep] = found["lora_E"]
        full["lora_B"][:, keep] = found["lora_B"]
        layers[path] = (init_r, alpha, full)
    paths = tuple(p for p in candidates if p in per_layer)  # model order
    config = AdapterConfig(method="adalora", rank=init_r, alpha=alpha,
                           dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=paths)
    return config, layers


def _adalora_masks(
    config_path: Path, rank_pattern: Any, init_r: int
) -> dict[str, list[bool]]:
    """{layer path: kept triplets} of an AdaLoraConfig's `rank_pattern` (keys `<path>.lora_E`,
    or `<path>.lora_E.<adapter>` as PEFT holds them before saving)."""
    if rank_pattern is None:
        return {}
    if not isinstance(rank_pattern, Mapping):
        raise ValueError(f"{config_path}: rank_pattern must be an object of masks")
    masks = {}
    for key, mask in rank_pattern.items():
        m = re.fullmatch(r"(.+)\.lora_E(\.[^.]+)?", key)
        if m is None:
            raise ValueError(f"{config_path}: rank_pattern key {key!r} is not <module>.lora_E")
        if (not isinstance(mask, list) or len(mask) != init_r
                or not all(isinstance(v, bool) for v in mask)):
            raise ValueError(f"{config_path}: rank_pattern[{key!r}] is not a list of {init_r} "
                             f"booleans (init_r)")
        masks[m.group(1)] = mask
    return masks


def peft_adalora_schedule(directory: str | os.PathLike) -> AdaLoraSchedule:
    """Our `AdaLoraSchedule` of the PEFT AdaLoRA directory `directory` (its `total_step`,
    `target_r`, `tinit`, `tfinal`, `deltaT`, `beta1`, `beta2`, `orth_reg_weight`)."""
    cfg = read_peft_config(directory)
    path = Path(directory) / PEFT_CONFIG_FILE
    if cfg["peft_type"] != "ADALORA":
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} has no AdaLoRA schedule")
    defaults = AdaLoraSchedule(total_steps=1)
    values = {ours: cfg.get(theirs, getattr(defaults, ours))
              for theirs, ours in _ADALORA_SCHEDULE_FIELDS.items()}
    if values["total_steps"] is None:
        raise ValueError(f"{path}: total_step is missing")
    try:
        return AdaLoraSchedule(**values)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _candidate(candidates: Mapping[str, nn.Linear], path: str, where: Path) -> nn.Linear:
    if path not in candidates:
        raise ValueError(f"{where}: adapted module {path!r} is not an nn.Linear of this "
                         f"model (its linear layers are e.g. {list(candidates)[:6]})")
    return candidates[path]


def _check_shapes(where: Path, path: str, found: Mapping[str, Tensor],
                  expected: Mapping[str, tuple[int, ...]], note: str) -> None:
    got = {k: tuple(t.shape) for k, t in found.items()}
    if got != dict(expected):
        raise ValueError(f"{where}: layer {path!r} holds {got}, expected {dict(expected)} for "
                         f"this model{note}")


def read_peft_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The `adapter_config.json` of a PEFT LoRA / AdaLoRA directory, checked for what we can
    represent."""
    path = Path(directory) / PEFT_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a PEFT adapter directory")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "peft_type" not in cfg:
        hint = ("it is an eva-rl adapter: use load_adapter" if "format" in cfg
                else "not a PEFT config")
        raise ValueError(f"{path} has no 'peft_type' ({hint})")
    if cfg["peft_type"] not in ("LORA", "ADALORA"):
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} is not supported "
                         "(only LORA, with or without use_dora, and ADALORA)")
    adalora = cfg["peft_type"] == "ADALORA"
    for key, allowed in _REQUIRED_VALUES.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (needs {allowed[0]!r})")
    if adalora and cfg.get("use_dora"):
        raise ValueError(f"{path}: use_dora with peft_type ADALORA (PEFT has no AdaLoRA DoRA)")
    init = cfg.get("init_lora_weights", True)
    if not adalora and init not in IMPORTABLE_INITS:
        raise ValueError(
            f"{path}: init_lora_weights={init!r} edits the base weights, which the adapter file "
            "does not hold; save it with PEFT's path_initial_model_for_weight_conversion to get "
            "a plain LoRA, then import that")
    neutral = _ADALORA_NEUTRAL_FIELDS if adalora else _NEUTRAL_FIELDS
    active = [k for k, v in cfg.items()
              if k not in neutral and k not in _REQUIRED_VALUES and v not in (None, False,
                                                                              [], {}, "")]
    if active:
        raise ValueError(f"{path}: settings {sorted(active)} are not supported "
                         f"(values {[cfg[k] for k in sorted(active)]}); only plain LoRA / DoRA "
                         "/ AdaLoRA on nn.Linear layers can be imported")
    return cfg


def _read_peft_tensors(
    directory: Path, suffixes: Mapping[str, str]
) -> dict[str, dict[str, Tensor]]:
    """{module path: {our tensor name: tensor}} of the weights file, by PEFT's key `suffixes`."""
    path = directory / PEFT_WEIGHTS_FILE
    if not path.is_file():
        bin_hint = " (a pickled adapter_model.bin is never loaded)" if (
            directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path} is missing{bin_hint}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    kind = "an AdaLoRA" if "lora_E" in suffixes.values() else "a LoRA/DoRA"
    example = next(iter(suffixes))
    per_layer: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        field = next(((s, f) for s, f in suffixes.items() if key.endswith(s)), None)
        if not key.startswith(PEFT_PREFIX) or field is None:
            raise ValueError(f"{path}: tensor {key!r} is not {kind} tensor of an nn.Linear "
                             f"(expected {PEFT_PREFIX}<module>{example} etc.)")
        suffix, name = field
        module = key[len(PEFT_PREFIX):-len(suffix)]
        per_layer.setdefault(module, {})[name] = t
    if not per_layer:
        raise ValueError(f"{path} holds no tensors")
    return per_layer
