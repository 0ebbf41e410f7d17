"""Adapters on a whole model: add, select, merge, count, delete; full fine-tuning."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from eva_rl.adapters.config import AdapterConfig, match_pattern
from eva_rl.adapters.layer import TRAINABLE_KEYS, AdapterLinear
from eva_rl.adapters.variants import VARIANTS

logger = logging.getLogger(__name__)

GIVEN_A_METHODS = tuple(m for m, v in VARIANTS.items() if v.accepts_given_A)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Every `AdapterLinear` of `model` by module path, in module order."""
    return {p: m for p, m in model.named_modules() if isinstance(m, AdapterLinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present in `model`, in the order they were added."""
    names: dict[str, None] = {}
    for layer in adapter_layers(model).values():
        names.update(dict.fromkeys(layer.ranks))
    return list(names)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear | AdapterLinear]:
    """Adaptable layers by path: plain `nn.Linear`s and `AdapterLinear`s (not their insides)."""
    out: dict[str, nn.Linear | AdapterLinear] = {}
    wrappers: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, AdapterLinear):
            wrappers.append(path)
            out[path] = module
        elif isinstance(module, nn.Linear):
            out[path] = module
    return out


def add_adapter(
    model: nn.Module,
    name: str,
    config: AdapterConfig,
    lora_A: Mapping[str, Tensor] | None = None,
    lora_B: Mapping[str, Tensor] | None = None,
) -> list[str]:
    """Add adapter `name` to the layers `config` targets; returns the adapted paths.

    With `lora_A` ({path: A (r, in)}), exactly those layers are adapted, each with rank
    `A.shape[0]` (0 allowed: identity there), that A and B = 0 ("given A", used by EVA);
    `config.method` must be "lora" or "dora" (DoRA's magnitude = row norms of W then),
    `target_modules` is not consulted and per-layer alpha comes from `alpha_pattern`.
    Layers already wrapped get one more adapter; nothing else on them changes. All
    non-adapter parameters of `model` are frozen and `name` becomes the active adapter.

    With `lora_B` too ({path: B (out, r)}, the same paths and ranks; "given A and B", used
    by CorDA and LoRA-GA), each layer starts from that A and B and keeps a frozen copy of
    them as PiSSA's offset -s·B0 A0, so W_eff = W at init and the shared base weight stays
    untouched; `config.method` must be "lora".
    """
    _check_name(name)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if config.method not in VARIANTS:
        raise ValueError(f"unknown adapter method {config.method!r}; expected {list(VARIANTS)}")
    _check_not_merged(model, f"add adapter {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    candidates = linear_layers(model)
    if lora_A is None:
        plan = {p: (config.rank_for(p), None) for p in _resolve_targets(candidates, config)}
        _check_patterns_used(config.rank_pattern, plan, "rank_pattern")
    else:
        plan = _given_a_plan(candidates, config, lora_A)
    if lora_B is not None:
        _check_given_b(candidates, config, lora_A, lora_B)
    _check_patterns_used(config.alpha_pattern, plan, "alpha_pattern")
    variant = VARIANTS[config.method]
    for path, (rank, _) in plan.items():
        layer = candidates[path]
        variant.check_rank(path, rank, layer.in_features, layer.out_features)
        if rank > 0 and config.alpha_for(path) <= 0:
            raise ValueError(f"alpha must be > 0 on layer {path!r} (rank {rank}), got "
                             f"{config.alpha_for(path)}")

    for path, (rank, a) in plan.items():
        layer = _wrap(model, path, candidates[path])
        tensors = None
        if lora_B is not None and rank > 0:  # `add` clones each: A0, B0 are copies
            b = lora_B[path]
            tensors = {"lora_A": a, "lora_B": b, "lora_offset_A": a, "lora_offset_B": b}
        layer.add(name, config, rank, config.alpha_for(path), lora_A=a, tensors=tensors,
                  path=path)
    set_active_adapter(model, name)
    n_zero = sum(r == 0 for r, _ in plan.values())
    logger.info(
        "added %s adapter %r on %d layers (%d at rank 0), %d trainable parameters",
        config.method, name, len(plan), n_zero, count_parameters(model, name),
    )
    return list(plan)


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Use adapter `name` in forward and make only its parameters trainable (None: bare base)."""
    layers = adapter_layers(model)
    if name is not None:
        _check_exists(model, name)
    elif not layers:
        return  # a model without adapters is the bare base already; leave it as it is
    merged = {layer.merged_adapter for layer in layers.values()} - {None}
    if merged and merged != {name}:
        raise RuntimeError(
            f"adapter {merged.pop()!r} is merged; call unmerge_adapter(model) before "
            f"switching to {name!r}"
        )
    model.requires_grad_(False)
    for layer in layers.values():
        layer.active_adapter = name if name in layer.ranks else None
        for key in TRAINABLE_KEYS:
            store = getattr(layer, key)
            if name in store and not merged:  # a merged adapter is for inference only
                store[name].requires_grad_(True)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter forward uses now (None: none)."""
    active = {layer.active_adapter for layer in adapter_layers(model).values()} - {None}
    return active.pop() if active else None


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights for fast inference (exactly reversible).

    While merged, forward runs the bare (merged) linears; training, adding, loading or
    deleting adapters and switching to another adapter are refused until `unmerge_adapter`.
    """
    _check_exists(model, name)
    _check_not_merged(model, f"merge adapter {name!r}")
    set_active_adapter(model, name)
    for layer in adapter_layers(model).values():
        if name in layer.ranks:
            layer.merge(name)
    model.requires_grad_(False)  # nothing trains while merged


def unmerge_adapter(model: nn.Module) -> None:
    """Undo `merge_adapter`: the base weights get their original bytes back."""
    merged = {layer.merged_adapter for layer in adapter_layers(model).values()} - {None}
    for layer in adapter_layers(model).values():
        layer.unmerge()
    for name in merged:
        set_active_adapter(model, name)


def count_parameters(model: nn.Module, name: str | None = None) -> int:
    """Trainable parameters of adapter `name` (A, B, DoRA magnitude, AdaLoRA E), or with
    `None` every parameter of `model` that requires grad now."""
    if name is None:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    _check_exists(model, name)
    return sum(
        getattr(layer, key)[name].numel()
        for layer in adapter_layers(model).values()
        for key in TRAINABLE_KEYS
        if name in getattr(layer, key)
    )


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; a layer left without adapters becomes its plain `nn.Linear`."""
    _check_exists(model, name)
    _check_not_merged(model, f"delete adapter {name!r}")
    for path, layer in adapter_layers(model).items():
        if name in layer.ranks:
            layer.remove(name)
        if not layer.ranks:
            _set_module(model, path, layer.base_layer)


def prepare_full_finetuning(model: nn.Module) -> int:
    """`fft`: no adapter, every parameter trainable; returns the trainable count."""
    layers = adapter_layers(model)
    if layers:
        raise ValueError(
            f"full fine-tuning needs a model without adapters; this one has {adapter_names(model)} "
            f"on {len(layers)} layers (delete_adapter them or start from the base model)"
        )
    model.requires_grad_(True)
    return count_parameters(model)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ValueError(f"adapter name must be a non-empty string without '.' or '/': {name!r}")


def _check_exists(model: nn.Module, name: str) -> None:
    names = adapter_names(model)
    if name not in names:
        raise KeyError(f"no adapter named {name!r}; the model has {names}")


def _check_not_merged(model: nn.Module, action: str) -> None:
    for layer in adapter_layers(model).values():
        layer._check_not_merged(action)


def _resolve_targets(
    candidates: Mapping[str, nn.Module], config: AdapterConfig
) -> list[str]:
    """Paths of `candidates` matching any of `config.target_modules` (each must match one)."""
    targets = [p for p in candidates if match_pattern(p, dict.fromkeys(config.target_modules))]
    for pattern in config.target_modules:
        if not any(p == pattern or fnmatch.fnmatchcase(p, pattern) for p in candidates):
            raise ValueError(
                f"target_modules pattern {pattern!r} matches no nn.Linear of the model; "
                f"linear layers are e.g. {list(candidates)[:8]}"
            )
    return targets


def _given_a_plan(
    candidates: Mapping[str, nn.Module], config: AdapterConfig, lora_A: Mapping[str, Tensor]
) -> dict[str, tuple[int, Tensor | None]]:
    if config.method not in GIVEN_A_METHODS:
        raise ValueError(
            f"a given lora_A works with methods {GIVEN_A_METHODS}, not {config.method!r}"
        )
    if not lora_A:
        raise ValueError("lora_A is empty: give at least one {path: A} entry")
    missing = [p for p in lora_A if p not in candidates]
    if missing:
        raise ValueError(
            f"lora_A names layers that are not nn.Linear modules of the model: {missing}"
        )
    for path, a in lora_A.items():
        in_features = candidates[path].in_features
        if not isinstance(a, Tensor) or a.ndim != 2 or a.shape[1] != in_features:
            shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(
                f"lora_A[{path!r}] must be a (rank, {in_features}) tensor, got {shape}"
            )
        if not torch.isfinite(a).all():
            raise ValueError(f"lora_A[{path!r}] has non-finite values")
        key = match_pattern(path, config.rank_pattern)
        if key is not None and config.rank_pattern[key] != a.shape[0]:
            raise ValueError(
                f"rank_pattern[{key!r}] = {config.rank_pattern[key]} contradicts "
                f"lora_A[{path!r}] of rank {a.shape[0]}"
            )
    # model order, so the returned paths and saved files do not depend on dict order
    return {p: (lora_A[p].shape[0], lora_A[p]) for p in candidates if p in lora_A}


def _check_given_b(
    candidates: Mapping[str, nn.Module], config: AdapterConfig,
    lora_A: Mapping[str, Tensor] | None, lora_B: Mapping[str, Tensor],
) -> None:
    """`lora_B` fits the given `lora_A` (checked already): same paths, (out, rank) shapes."""
    if lora_A is None:
        raise ValueError("lora_B needs lora_A: give both (A, B with an offset) or only lora_A")
    if config.method != "lora":
        raise ValueError(f"a given lora_A and lora_B (with offset) work with method 'lora', "
                         f"not {config.method!r}")
    if set(lora_B) != set(lora_A):
        raise ValueError(f"lora_A and lora_B name different layers: "
                         f"{sorted(set(lora_A) ^ set(lora_B))}")
    for path, b in lora_B.items():
        shape = (candidates[path].out_features, lora_A[path].shape[0])
        if not isinstance(b, Tensor) or tuple(b.shape) != shape:
            got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"lora_B[{path!r}] must be a {shape} tensor, got {got}")
        if not torch.isfinite(b).all():
            raise ValueError(f"lora_B[{path!r}] has non-finite values")


def _check_patterns_used(patterns: Mapping[str, object], plan: Mapping[str, object], what: str):
    for key in patterns:
        if not any(p == key or fnmatch.fnmatchcase(p, key) for p in plan):
            raise ValueError(f"{what} key {key!r} matches none of the adapted layers {list(plan)}")


def _wrap(model: nn.Module, path: str, module: nn.Module) -> AdapterLinear:
    if isinstance(module, AdapterLinear):
        return module
    if not path:
        raise ValueError("the model itself is an nn.Linear: wrap it in a container module first")
    layer = AdapterLinear(module).train(module.training)
    _set_module(model, path, layer)
    return layer


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, module)
