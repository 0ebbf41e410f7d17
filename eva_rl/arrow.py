"""Arrow routing from adapter weights alone (Ostapenko et al. 2024, "Towards Modular LLMs by
Building and Reusing a Library of LoRAs"; PEFT's `ArrowConfig` / `create_arrow_model`).

Per adapted layer and per adapter, Arrow's *prototype* is the top right-singular vector `v`
of the adapter's update `dW = s·B A` (out, in): the input direction the adapter changes
most. It is defined up to sign, so a token row `x` of the layer's input is scored by
`|x · v|`; per token, the `top_k` adapters by score share a softmax of score / temperature
(the others get weight 0).

Which `dW` (`update_factors`): LoRA and DoRA `B A` (for DoRA this is the low-rank update of
the direction, before its row normalisation and magnitude: PEFT's Arrow reads `lora_A` and
`lora_B` alone, whatever the adapter), PiSSA / OLoRA `B A - B0 A0` (their frozen offset
folded in, as `export_peft` writes them), AdaLoRA `P diag(Λ) Q`. The scale `s > 0` does not
change the direction. A layer where an adapter has rank 0 or a zero update (a LoRA whose B
is still 0) has no prototype for it: that adapter takes no part in the layer's top-k.
PEFT cannot hold a rank-0 layer (`export_peft` leaves it out) and would give a zero update
a zero prototype (score 0 for every token).

PEFT finds `v` by 15 steps of power iteration from a random start; here it is exact (QR of
B, then the SVD of the small `R A`), so the two agree up to sign where the top singular
value is well separated from the second.

Pure torch: `agents.routing` feeds it a DT's layer inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eva_rl.adapters.layer import AdapterLinear
from eva_rl.adapters.model import adapter_layers

DEFAULT_TOP_K = 3
"""PEFT's `ArrowConfig.top_k` default."""
DEFAULT_TEMPERATURE = 1.0
"""PEFT's `ArrowConfig.router_temperature` default."""


@dataclass
class ArrowLayer:
    """One layer's prototypes of the adapters Arrow routes among."""

    prototypes: Tensor
    """(E, in) float32 unit rows; a zero row where `valid` is False."""
    valid: Tensor
    """(E,) bool: the adapter has a prototype (a non-zero update) on this layer."""


def update_factors(layer: AdapterLinear, name: str) -> tuple[Tensor, Tensor] | None:
    """`(A', B')` with the adapter's update `dW ∝ B' A'` on this layer (see the module
    docstring); None where it has rank 0 here."""
    t = layer.adapter_tensors(name)
    if not t:
        return None
    a, b = t["lora_A"], t["lora_B"]
    if "lora_E" in t:  # AdaLoRA: Q (r, in) with Λ folded into its rows, P (out, r)
        a = a * t["lora_E"]
    if "lora_offset_A" in t:  # B A - B0 A0 = [B, -B0] [A; A0]
        a = torch.cat([a, t["lora_offset_A"]])
        b = torch.cat([b, -t["lora_offset_B"]], dim=1)
    return a, b


@torch.no_grad()
def top_right_singular_vector(a: Tensor, b: Tensor) -> Tensor | None:
    """The top right-singular vector `(in,)` float32 of `B A` without forming it; sign
    fixed so its largest-magnitude entry is positive. None if `B A = 0`."""
    a64, b64 = a.detach().double(), b.detach().double()
    _, r = torch.linalg.qr(b64)  # B = Q R, Q orthonormal: B A and R A share right vectors
    _, s, vh = torch.linalg.svd(r @ a64, full_matrices=False)
    if not len(s) or not float(s[0]) > 0.0:
        return None
    v = vh[0]
    v = v * torch.sign(v[v.abs().argmax()])
    return v.float()


@torch.no_grad()
def arrow_prototypes(model: nn.Module, names: Sequence[str],
                     layers: Sequence[str] | None = None) -> dict[str, ArrowLayer]:
    """Per adapted layer (`layers`, default every one, in module order) the prototypes of
    adapters `names` (rows in that order); layers where none of them has one are left out.
    ValueError if no layer is left."""
    all_layers = adapter_layers(model)
    paths = list(all_layers) if layers is None else list(layers)
    missing = [p for p in paths if p not in all_layers]
    if missing:
        raise ValueError(f"layers {missing} hold no adapters")
    out: dict[str, ArrowLayer] = {}
    for path in paths:
        layer = all_layers[path]
        protos = torch.zeros(len(names), layer.in_features)
        valid = torch.zeros(len(names), dtype=torch.bool)
        for i, name in enumerate(names):
            factors = update_factors(layer, name) if name in layer.ranks else None
            v = None if factors is None else top_right_singular_vector(*factors)
            if v is not None:
                protos[i], valid[i] = v.cpu(), True
        if bool(valid.any()):
            out[path] = ArrowLayer(protos, valid)
    if not out:
        raise ValueError(f"adapters {list(names)} have no non-zero update on any layer: "
                         "Arrow has no prototype to route by")
    return out


def arrow_weights(x: Tensor, layer: ArrowLayer, top_k: int = DEFAULT_TOP_K,
                  temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Arrow's routing weights `(n, E)` of token rows `x (n, in)`: a softmax of `|x · v| /
    temperature` over each row's `top_k` adapters (fewer where fewer have a prototype
    here), 0 elsewhere; rows sum to 1."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    protos = layer.prototypes.to(x.device)
    sim = (x.float() @ protos.T).abs()  # (n, E)
    sim = sim.masked_fill(~layer.valid.to(x.device), float("-inf"))
    k = min(int(top_k), int(layer.valid.sum()))
    top, idx = torch.topk(sim, k, dim=1)
    full = torch.full_like(sim, float("-inf")).scatter(1, idx, top)
    return torch.softmax(full / temperature, dim=1)


def arrow_votes(rows: Mapping[str, Tensor], window: Tensor, n_windows: int,
                layers: Mapping[str, ArrowLayer], top_k: int = DEFAULT_TOP_K,
                temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Per window, each adapter's Arrow weight summed over the window's token rows and over
    `layers`: `(n_windows, E)` float64 (`rows[path] (n, in)`, `window[i]` = row i's window)."""
    window = window.cpu()
    n_adapters = len(next(iter(layers.values())).valid)
    votes = torch.zeros(n_windows, n_adapters, dtype=torch.float64)
    for path, layer in layers.items():
        if path not in rows:
            raise ValueError(f"Arrow: no inputs of layer {path!r}")
        w = arrow_weights(rows[path], layer, top_k, temperature).double().cpu()
        votes.index_add_(0, window, w)
    return votes
