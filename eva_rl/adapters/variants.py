"""Adapter variants as small strategy objects: how to initialise, run and merge one adapter.

A variant holds no state; the tensors live in the `AdapterLinear`'s per-adapter dicts:

- LoRA:  W_eff = W + s·B A                      (A Kaiming-uniform or given, B = 0)
- DoRA:  W_eff = m ⊙ (W + s·B A) / ‖W + s·B A‖   (row norms, detached; m starts at the norm)
- PiSSA / OLoRA: LoRA whose A, B come from the SVD / QR of W, plus a frozen offset
  -s·B0 A0 kept in the adapter (`lora_offset_A/B`), so W_eff = W at init while the shared
  base weight W stays untouched for every other task.
- AdaLoRA: W_eff = W + s·P diag(Λ) Q in SVD form: `lora_B` = P (out, r), `lora_E` = Λ (r, 1),
  `lora_A` = Q (r, in), s = alpha / r with r the initial rank (Λ = 0, P, Q ~ N(0, 0.02²)).
  The rank budget (masking entries of Λ) is `eva_rl.adapters.adalora.AdaLoraAllocator`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from eva_rl.adapters.layer import AdapterLinear


class LoraVariant:
    """Plain LoRA (Hu et al. 2021): `y = base(x) + s · B A dropout(x)` (+ a frozen offset)."""

    name = "lora"
    accepts_given_A = True
    has_budget = False
    """Whether the adapter's rank shrinks to a budget while it trains (AdaLoRA: it starts
    at a larger rank and an allocator masks singular values in the training loop)."""
    supports_rslora = True
    """Whether rank-stabilised scaling (alpha / sqrt(r)) is defined for this variant."""

    def check_rank(self, path: str, rank: int, in_features: int, out_features: int) -> None:
        """Raise `ValueError` if this variant cannot have `rank` on that layer."""

    def tensor_shapes(self, rank: int, in_features: int, out_features: int,
                      names: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
        """The tensors a saved adapter of this variant holds on one layer, by name, and their
        shapes. ``names`` are the ones found: a LoRA given A and B (CorDA, LoRA-GA) keeps
        PiSSA's frozen offset too."""
        offset = any(n.startswith("lora_offset_") for n in names)
        return _lora_shapes(rank, in_features, out_features, offset)

    def init(
        self, layer: AdapterLinear, path: str, rank: int, scaling: float, lora_A: Tensor | None
    ) -> dict[str, Tensor]:
        """Initial tensors of a new adapter: `lora_A` (r, in), `lora_B` (out, r) = 0."""
        w = layer.weight
        if lora_A is None:
            a = torch.empty(rank, layer.in_features, device=w.device, dtype=w.dtype)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's / PEFT's default
        else:
            a = lora_A.detach().to(device=w.device, dtype=w.dtype).clone()
        b = torch.zeros(layer.out_features, rank, device=w.device, dtype=w.dtype)
        return {"lora_A": a, "lora_B": b}

    def forward(self, layer: AdapterLinear, name: str, x: Tensor) -> Tensor:
        """`base(x) + s · B A dropout(x)` (`- s · B0 A0 x` with an offset); adds fused in addmm."""
        x2 = x.reshape(-1, layer.in_features)  # (N, in)
        a, b, scaling = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        y = layer.base_layer(x2)  # (N, out)
        if name in layer.lora_offset_A:
            a0, b0 = layer.lora_offset_A[name], layer.lora_offset_B[name]
            if _dropping(layer, name):
                y = low_rank_addmm(y, x2, a0, b0, -scaling)
            else:  # BA - B0A0 = B(A - A0) + (B - B0)A0: one rank-2r product of small
                # differences, so no cancellation of the large top-r part (matters in bf16)
                a, b = torch.cat([a - a0, a0]), torch.cat([b, b - b0], dim=1)
        y = low_rank_addmm(y, layer.lora_dropout[name](x2), a, b, scaling)
        return y.view(*x.shape[:-1], layer.out_features)

    def delta_weight(self, layer: AdapterLinear, name: str, weight: Tensor) -> Tensor:
        """W_eff - W for the unmerged base weight `weight` (out, in)."""
        scaling = layer.scaling[name]
        delta = scaling * (layer.lora_B[name] @ layer.lora_A[name])
        if name in layer.lora_offset_A:
            delta = delta - scaling * (layer.lora_offset_B[name] @ layer.lora_offset_A[name])
        return delta


class DoraVariant(LoraVariant):
    """DoRA (Liu et al. 2024): magnitude times the unit-row direction of W + s·B A.

    The row norm is detached from the graph (DoRA paper, section 4.3) and computed without
    the dense (out, in) delta: ‖W + sBA‖² = ‖W‖² + 2s⟨W A^T, B⟩ + s²⟨B (A A^T), B⟩ row-wise.
    Same maths as PEFT's `DoraLinearLayer`; forward and backward are fused (`dora_linear`).
    """

    name = "dora"

    def init(
        self, layer: AdapterLinear, path: str, rank: int, scaling: float, lora_A: Tensor | None
    ) -> dict[str, Tensor]:
        """LoRA's tensors plus `lora_magnitude_vector` = row norms of W + s·B A (= ‖W‖)."""
        state = super().init(layer, path, rank, scaling, lora_A)
        state["lora_magnitude_vector"] = dora_weight_norm(
            layer.weight, layer.base_row_sq_norm(), state["lora_A"], state["lora_B"], scaling
        )
        return state

    def tensor_shapes(self, rank: int, in_features: int, out_features: int,
                      names: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
        """LoRA's pair and the magnitude vector (out,)."""
        return {**_lora_shapes(rank, in_features, out_features),
                "lora_magnitude_vector": (out_features,)}

    def forward(self, layer: AdapterLinear, name: str, x: Tensor) -> Tensor:
        """`m/‖W + sBA‖ ⊙ (x W^T + s x A^T B^T) + bias`; bias is not rescaled (as in PEFT)."""
        weight, bias = layer.weight, layer.base_layer.bias
        a, b, scaling = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        norm = dora_weight_norm(weight, layer.base_row_sq_norm(), a, b, scaling)
        mag_scale = layer.lora_magnitude_vector[name] / norm  # (out,), grad flows to m only
        x2 = x.reshape(-1, layer.in_features)  # (N, in)
        if not _dropping(layer, name):
            y = dora_linear(x2, weight, bias, a, b, mag_scale, scaling)
        else:  # PEFT's form: base(x) + (m/n - 1) ⊙ W x_d + m/n ⊙ s·B A x_d, x_d = dropout(x)
            x_d = layer.lora_dropout[name](x2)
            wx_d = F.linear(x_d, weight)
            y = F.linear(x2, weight, bias) + mag_scale * low_rank_addmm(wx_d, x_d, a, b, scaling)
            y = y - wx_d
        return y.view(*x.shape[:-1], layer.out_features)

    def delta_weight(self, layer: AdapterLinear, name: str, weight: Tensor) -> Tensor:
        """W_eff - W with W_eff = m/‖W + sBA‖ ⊙ (W + sBA) (rows)."""
        direction = weight + super().delta_weight(layer, name, weight)
        norm = torch.linalg.vector_norm(direction, dim=1, keepdim=True)
        return layer.lora_magnitude_vector[name][:, None] / norm * direction - weight


class _WeightDrivenVariant(LoraVariant):
    """LoRA initialised from a factorisation of W: rank at most min(in, out)."""

    accepts_given_A = False

    def check_rank(self, path: str, rank: int, in_features: int, out_features: int) -> None:
        """The factorisation has min(in, out) components."""
        if rank > min(in_features, out_features):
            raise ValueError(
                f"{self.name} rank {rank} on layer {path!r} exceeds min(in, out) = "
                f"{min(in_features, out_features)} of its weight"
            )

    def tensor_shapes(self, rank: int, in_features: int, out_features: int,
                      names: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
        """LoRA's pair and its frozen offset (always)."""
        return _lora_shapes(rank, in_features, out_features, offset=True)


class PissaVariant(_WeightDrivenVariant):
    """PiSSA (Meng et al. 2024): A, B from the top-r singular triplets of W, sqrt(S) split."""

    name = "pissa"

    def init(
        self, layer: AdapterLinear, path: str, rank: int, scaling: float, lora_A: Tensor | None
    ) -> dict[str, Tensor]:
        """s·B A = the top-r SVD part of W; offset -s·B0 A0 keeps W_eff = W at init."""
        self.check_rank(path, rank, layer.in_features, layer.out_features)
        w = layer.weight.detach().float()
        u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s_vals[:rank] / scaling)
        a = root[:, None] * vh[:rank]
        b = u[:, :rank] * root[None, :]
        return _with_offset(a, b, layer.weight.dtype)


class OloraVariant(_WeightDrivenVariant):
    """OLoRA (Büyükakyüz 2024): A = R[:r], B = Q[:, :r] from the QR of W."""

    name = "olora"

    def init(
        self, layer: AdapterLinear, path: str, rank: int, scaling: float, lora_A: Tensor | None
    ) -> dict[str, Tensor]:
        """Orthonormal B, offset -s·B0 A0 keeps W_eff = W at init."""
        self.check_rank(path, rank, layer.in_features, layer.out_features)
        q, r = torch.linalg.qr(layer.weight.detach().float())
        return _with_offset(r[:rank], q[:, :rank], layer.weight.dtype)


class AdaLoraVariant(LoraVariant):
    """AdaLoRA (Zhang et al. 2023): `y = base(x) + s · P (Λ ⊙ Q dropout(x))`.

    Same parametrisation and initialisation as PEFT's `SVDLinear`, whose scale is
    `alpha / (r + 1e-5)`; ours is `alpha / r` (1e-6 relative apart at r = 8). A masked
    singular value is an exact zero in Λ, so saving, merging and counting need nothing extra.
    """

    name = "adalora"
    accepts_given_A = False
    has_budget = True
    supports_rslora = False  # its scaling is alpha / rank

    def tensor_shapes(self, rank: int, in_features: int, out_features: int,
                      names: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
        """Q (r, in), P (out, r) and Λ (r, 1)."""
        return {**_lora_shapes(rank, in_features, out_features), "lora_E": (rank, 1)}

    def init(
        self, layer: AdapterLinear, path: str, rank: int, scaling: float, lora_A: Tensor | None
    ) -> dict[str, Tensor]:
        """`lora_A` = Q (r, in), `lora_B` = P (out, r) ~ N(0, 0.02²); `lora_E` = Λ (r, 1) = 0."""
        w = layer.weight
        kw = {"device": w.device, "dtype": w.dtype}
        q = torch.empty(rank, layer.in_features, **kw).normal_(0.0, 0.02)
        p = torch.empty(layer.out_features, rank, **kw).normal_(0.0, 0.02)
        return {"lora_A": q, "lora_B": p, "lora_E": torch.zeros(rank, 1, **kw)}

    def forward(self, layer: AdapterLinear, name: str, x: Tensor) -> Tensor:
        """`base(x) + s · (x (Λ ⊙ Q)^T) P^T`, the rank-r product fused as LoRA's."""
        x2 = x.reshape(-1, layer.in_features)  # (N, in)
        q_scaled = layer.lora_A[name] * layer.lora_E[name]  # (r, in): Λ folded into Q's rows
        y = low_rank_addmm(layer.base_layer(x2), layer.lora_dropout[name](x2), q_scaled,
                           layer.lora_B[name], layer.scaling[name])
        return y.view(*x.shape[:-1], layer.out_features)

    def delta_weight(self, layer: AdapterLinear, name: str, weight: Tensor) -> Tensor:
        """`s · P diag(Λ) Q`."""
        q_scaled = layer.lora_A[name] * layer.lora_E[name]
        return layer.scaling[name] * (layer.lora_B[name] @ q_scaled)


VARIANTS: dict[str, LoraVariant] = {
    v.name: v
    for v in (LoraVariant(), DoraVariant(), PissaVariant(), OloraVariant(), AdaLoraVariant())
}


@torch.no_grad()
def dora_weight_norm(
    weight: Tensor, row_sq: Tensor, a: Tensor, b: Tensor, scaling: float
) -> Tensor:
    """Row norms of `weight + scaling * b @ a` (out,), detached, without forming b @ a.

    Computed in the weights' dtype even under autocast (a bf16 norm would be coarse)."""
    with torch.autocast(weight.device.type, enabled=False):
        return _dora_weight_norm(weight, row_sq, a.detach(), b.detach(), scaling)


def _dora_weight_norm(weight: Tensor, row_sq: Tensor, a: Tensor, b: Tensor, scaling: float):
    cross = (F.linear(weight, a) * b).sum(dim=1)  # ⟨W_i, (BA)_i⟩ via W A^T (out, r)
    ba_sq = ((b @ (a @ a.T)) * b).sum(dim=1)  # ‖(BA)_i‖² via the (r, r) Gram of A
    sq = row_sq + (2.0 * scaling) * cross + (scaling * scaling) * ba_sq
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def low_rank_addmm(base: Tensor, x: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """`base + scaling · (x A^T) B^T` for 2-D `base` (N, out), `x` (N, in)."""
    return _LowRankAddmm.apply(base, x, a, b, scaling)


class _LowRankAddmm(torch.autograd.Function):
    """`base + s · (x A^T) B^T` with a hand-written backward.

    Autograd's own backward of the rank-r products hits slow layouts of CPU BLAS for small
    r: `grad^T @ h` (out, N) @ (N, r) took as long as the whole base matmul at r = 8 here.
    The same products with the transposes placed otherwise are 3-6x faster.
    """

    @staticmethod
    def forward(ctx, base: Tensor, x: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
        h = x @ a.t()  # (N, r)
        ctx.save_for_backward(x, a, b, h)
        ctx.scaling = scaling
        return torch.addmm(base, h, b.t(), alpha=scaling)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, a, b, h = (t.to(grad.dtype) for t in ctx.saved_tensors)  # autocast saves mixed
        need_base, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        g_x = g_a = g_b = None
        if need_x or need_a:
            g_h = (grad @ b.t().contiguous().t()) * ctx.scaling  # (N, r)
            if need_x:
                g_x = g_h @ a
            if need_a:
                g_a = g_h.t() @ x
        if need_b:
            g_b = (torch.mm(h.t().contiguous(), grad) * ctx.scaling).t().contiguous()
        return grad if need_base else None, g_x, g_a, g_b, None


def dora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, ms: Tensor,
    scaling: float,
) -> Tensor:
    """`ms ⊙ (x W^T + scaling · (x A^T) B^T) + bias` for 2-D `x` (N, in); `ms` (out,)."""
    return _DoraLinear.apply(x, weight, bias, a, b, ms, scaling)


class _DoraLinear(torch.autograd.Function):
    """`ms ⊙ (x W^T + s · (x A^T) B^T) + bias` (ms = m / norm, the norm already detached).

    Hand-written backward: autograd's for the broadcast product took ~4x the time of the
    same few element-wise passes written out here; and `ms` is folded into the small
    (out, in) / (out, r) weights, never into an (N, out) gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, ms, scaling: float) -> Tensor:
        h = x @ a.t()  # (N, r)
        z = torch.addmm(x @ weight.t(), h, b.t(), alpha=scaling)  # (N, out) direction output
        ms_z = ms.to(z.dtype)  # keep autocast's dtype, as the base layer does
        y = z * ms_z if bias is None else torch.addcmul(bias.to(z.dtype), ms_z, z)
        ctx.save_for_backward(x, weight, a, b, ms, h, z)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, a, b, ms, h, z = (t.to(grad.dtype) for t in ctx.saved_tensors)
        s = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b, need_ms = ctx.needs_input_grad[:6]
        g_x = g_w = g_bias = g_a = g_b = g_ms = None
        if need_ms:
            g_ms = (grad * z).sum(0)
        if need_x or need_a:
            g_h = grad @ (b * (ms * s)[:, None]).t().contiguous().t()  # (grad ⊙ ms) s B
            if need_x:
                g_x = torch.addmm(g_h @ a, grad, weight * ms[:, None])
            if need_a:
                g_a = g_h.t() @ x
        if need_b:
            g_b = (torch.mm(h.t().contiguous(), grad) * s).t() * ms[:, None]
        if need_w:
            g_w = (grad * ms).t() @ x
        if need_bias:
            g_bias = grad.sum(0)
        return g_x, g_w, g_bias, g_a, g_b, g_ms, None


def _dropping(layer: AdapterLinear, name: str) -> bool:
    """Whether adapter `name`'s dropout is active now."""
    return layer.training and isinstance(layer.lora_dropout[name], torch.nn.Dropout)


def _lora_shapes(rank: int, in_features: int, out_features: int, offset: bool = False
                 ) -> dict[str, tuple[int, ...]]:
    """`lora_A` (r, in) and `lora_B` (out, r), with the frozen offset's pair when ``offset``."""
    shapes = {"lora_A": (rank, in_features), "lora_B": (out_features, rank)}
    if offset:
        shapes.update(lora_offset_A=(rank, in_features), lora_offset_B=(out_features, rank))
    return shapes


def _with_offset(a: Tensor, b: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    a, b = a.contiguous().to(dtype), b.contiguous().to(dtype)
    return {"lora_A": a, "lora_B": b, "lora_offset_A": a.clone(), "lora_offset_B": b.clone()}
