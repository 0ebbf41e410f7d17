"""Hugging Face PEFT's LoRA directory format: `export_peft` and `import_peft`.

A PEFT adapter directory holds `adapter_config.json` (a `LoraConfig` with `peft_type`) and
`adapter_model.safetensors`, whose keys are `base_model.model.<path>.lora_A.weight`,
`...lora_B.weight` and (DoRA) `...lora_magnitude_vector`; our tensors have the same shapes.

- LoRA, DoRA and EVA adapters export as they are (EVA: `init_lora_weights="eva"` and an
  `eva_config`; its per-layer ranks and alphas as `rank_pattern` / `alpha_pattern`).
- PiSSA / OLoRA keep a frozen offset -s·B0 A0 inside the adapter. PEFT has no such term
  (it edits the base weight instead), so they export as the exactly equivalent rank-2r
  LoRA  s'·[B, -B0] [A; A0]  with s' = s, i.e. alpha' = 2·alpha (rsLoRA: sqrt(2)·alpha).
- `import_peft` reads a LoRA / DoRA directory as PEFT writes it (`save_pretrained`) into
  our adapter pool; whatever we cannot represent exactly is refused with the reason.

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
EXPORTABLE_METHODS = ("lora", "dora", "pissa", "olora")
OFFSET_METHODS = ("pissa", "olora")
IMPORTABLE_INITS = (True, False, "gaussian", "eva")
"""`init_lora_weights` values that only choose the initial A, B; the others (pissa, olora,
corda, loftq, ...) make PEFT rewrite the base weights, which an adapter file cannot undo."""

# LoraConfig fields that never change the adapted function (or are checked separately).
_NEUTRAL_FIELDS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "init_lora_weights", "eva_config", "megatron_core",
    "qalora_group_size", "runtime_config", "ensure_weight_tying", "loftq_config",
})
# Fields that must hold exactly these values (other values change the function).
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {"bias": ("none",), "fan_in_fan_out": (False,)}
_TENSOR_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector": "lora_magnitude_vector",
    ".lora_magnitude_vector.weight": "lora_magnitude_vector",  # PEFT < 0.13 wrote this
}


# ------------------------------------------------------------------------------- export


def export_peft(
    model: nn.Module,
    adapter_name: str,
    directory: str | os.PathLike,
    *,
    eva: Mapping[str, Any] | Any | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write adapter `adapter_name` of `model` as a PEFT LoRA directory; returns it.

    `peft.PeftModel.from_pretrained(base, directory)` then reproduces our outputs on the same
    base model (plain `nn.Linear`s at the same module paths). `eva` (an `EvaConfig` or its
    `to_dict()`) marks an EVA-initialised LoRA/DoRA adapter: `init_lora_weights="eva"` plus
    PEFT's `eva_config` fields, and all our EVA settings in `eva_rl_export.json`. Rank-0
    layers (EVA's) are not targeted. `base_model` goes into PEFT's `base_model_name_or_path`
    (e.g. the pretraining run). An existing non-empty `directory` needs `overwrite`.
    """
    _check_exists(model, adapter_name)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True")
    eva_dict = _eva_dict(eva)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    methods: set[str] = set()
    config: AdapterConfig | None = None
    for path, layer in adapter_layers(model).items():
        if adapter_name not in layer.ranks:
            continue
        method, config = layer.methods[adapter_name], layer.configs[adapter_name]
        if method not in EXPORTABLE_METHODS:
            raise ValueError(f"adapter {adapter_name!r} is of kind {method!r}, which has no PEFT "
                             f"LoRA equivalent here; exportable kinds: {EXPORTABLE_METHODS}")
        methods.add(method)
        if layer.ranks[adapter_name] == 0:
            continue
        layer_tensors, ranks[path], alphas[path] = _peft_tensors(layer, adapter_name, config)
        for key, t in layer_tensors.items():
            tensors[f"{PEFT_PREFIX}{path}.{key}"] = t.detach().to("cpu", copy=True).contiguous()
    assert config is not None  # _check_exists found the adapter on some layer
    if len(methods) != 1:
        raise ValueError(f"adapter {adapter_name!r} mixes kinds {sorted(methods)} across layers")
    (method,) = methods
    if not ranks:
        raise ValueError(f"adapter {adapter_name!r} has rank 0 on every layer: nothing to export")
    if eva_dict is not None and method not in ("lora", "dora"):
        raise ValueError(f"EVA initialises lora/dora adapters; {adapter_name!r} is {method!r}")

    peft_config = _peft_config(config, method, ranks, alphas, eva_dict)
    peft_config["base_model_name_or_path"] = base_model
    provenance = {
        "format": PROVENANCE_FORMAT, "version": PROVENANCE_VERSION, "adapter": adapter_name,
        "kind": "eva" if eva_dict is not None else method, "method": method,
        "exported_as": (
            "rank-2r LoRA: A' = [A; A0], B' = [B, -B0] (the frozen offset folded in), "
            "alpha' chosen so that alpha'/rank' keeps the scale" if method in OFFSET_METHODS
            else ("DoRA" if method == "dora" else "LoRA")),
        "eva_config": eva_dict, "adapter_config": config.to_dict(),
        "layers": {p: {"rank": r, "alpha": alphas[p]} for p, r in ranks.items()},
        "torch_version": torch.__version__,
    }
    with atomic_dir(directory, overwrite=directory.exists()) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        write_json_atomic(tmp / PEFT_CONFIG_FILE, peft_config)
        write_json_atomic(tmp / PROVENANCE_FILE, provenance)
    logger.info("exported %s adapter %r (%d layers) to PEFT format in %s",
                provenance["kind"], adapter_name, len(ranks), directory)
    return directory


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
    if layer.methods[name] in OFFSET_METHODS:
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


# ------------------------------------------------------------------------------- import


def import_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str) -> str:
    """Add the PEFT LoRA / DoRA adapter saved in `directory` to `model` as `adapter_name`.

    Ranks come from the tensors, alphas from `lora_alpha` / `alpha_pattern` (PEFT's matching
    rule), DoRA's magnitude is kept; the adapter becomes active and its name is returned.
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
    per_layer = _read_peft_tensors(directory)
    use_dora = bool(cfg.get("use_dora", False))
    candidates = linear_layers(model)
    r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    ranks, alphas = {}, {}
    where = directory / PEFT_WEIGHTS_FILE
    for path, found in per_layer.items():
        if path not in candidates:
            raise ValueError(f"{where}: adapted module {path!r} is not an nn.Linear of this "
                             f"model (its linear layers are e.g. {list(candidates)[:6]})")
        layer = candidates[path]
        if "lora_A" not in found or "lora_B" not in found:
            raise ValueError(f"{where}: layer {path!r} lacks lora_A or lora_B")
        rank = found["lora_A"].shape[0]
        expected = {"lora_A": (rank, layer.in_features), "lora_B": (layer.out_features, rank)}
        if use_dora:
            expected["lora_magnitude_vector"] = (layer.out_features,)
        got = {k: tuple(t.shape) for k, t in found.items()}
        if got != expected:
            raise ValueError(f"{where}: layer {path!r} holds {got}, expected {expected} for this "
                             f"model{' with DoRA' if use_dora else ''}")
        want = int(peft_pattern_value(rank_pattern, path, r_default))
        if rank != want:
            raise ValueError(f"{where}: layer {path!r} has rank {rank} but the config says {want}")
        ranks[path] = rank
        alphas[path] = float(peft_pattern_value(alpha_pattern, path, alpha_default))

    paths = [p for p in candidates if p in per_layer]  # model order
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = AdapterConfig(
        method="dora" if use_dora else "lora", rank=r, alpha=alpha,
        dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=tuple(paths),
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: a for p, a in alphas.items() if a != alpha},
        use_rslora=bool(cfg.get("use_rslora", False)),
    )
    for path in paths:
        layer = _wrap(model, path, candidates[path])
        layer.add(adapter_name, config, ranks[path], alphas[path], tensors=per_layer[path],
                  path=path)
    set_active_adapter(model, adapter_name)
    logger.info("imported PEFT %s adapter %r (%d layers) from %s", config.method, adapter_name,
                len(paths), directory)
    return adapter_name


def read_peft_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The `adapter_config.json` of a PEFT LoRA directory, checked for what we can represent."""
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
    if cfg["peft_type"] != "LORA":
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} is not supported "
                         "(only LORA, with or without use_dora)")
    for key, allowed in _REQUIRED_VALUES.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (needs {allowed[0]!r})")
    init = cfg.get("init_lora_weights", True)
    if init not in IMPORTABLE_INITS:
        raise ValueError(
            f"{path}: init_lora_weights={init!r} edits the base weights, which the adapter file "
            "does not hold; save it with PEFT's path_initial_model_for_weight_conversion to get "
            "a plain LoRA, then import that")
    active = [k for k, v in cfg.items()
              if k not in _NEUTRAL_FIELDS and k not in _REQUIRED_VALUES and v not in (None, False,
                                                                                      [], {}, "")]
    if active:
        raise ValueError(f"{path}: settings {sorted(active)} are not supported "
                         f"(values {[cfg[k] for k in sorted(active)]}); only plain LoRA / DoRA "
                         "on nn.Linear layers can be imported")
    return cfg


def _read_peft_tensors(directory: Path) -> dict[str, dict[str, Tensor]]:
    path = directory / PEFT_WEIGHTS_FILE
    if not path.is_file():
        bin_hint = " (a pickled adapter_model.bin is never loaded)" if (
            directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path} is missing{bin_hint}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    per_layer: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        field = next(((s, f) for s, f in _TENSOR_SUFFIXES.items() if key.endswith(s)), None)
        if not key.startswith(PEFT_PREFIX) or field is None:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA/DoRA tensor of an nn.Linear "
                             f"(expected {PEFT_PREFIX}<module>.lora_A.weight etc.)")
        suffix, name = field
        module = key[len(PEFT_PREFIX):-len(suffix)]
        per_layer.setdefault(module, {})[name] = t
    if not per_layer:
        raise ValueError(f"{path} holds no tensors")
    return per_layer
