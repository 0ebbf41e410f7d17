"""AdaLoRA's rank allocation (Zhang et al. 2023) for one `adalora` adapter: the cubic budget
schedule, sensitivity importance of the singular triplets, masking of the least important
singular values, and the orthogonality regulariser of P and Q.

    schedule = AdaLoraSchedule(total_steps=T, target_rank=8, tinit=100, tfinal=200)
    allocator = AdaLoraAllocator(model, "hammer-v3", schedule)
    for step in range(1, T + 1):
        loss = task_loss(model, batch) + allocator.orthogonal_loss()
        loss.backward()
        optimizer.step()
        info = allocator.update(step)  # after optimizer.step(), before zero_grad()
        optimizer.zero_grad()
        logger.scalars(info.scalars(), step)

The maths is that of PEFT's `RankAllocator` and `AdaLoraModel.update_and_allocate`
(tests/test_adalora_peft.py runs both side by side): importance |p · ∂L/∂p| of every entry
of P, Λ, Q, smoothed (beta1) and multiplied by its uncertainty (beta2); a triplet's score
is its Λ entry's plus the mean of its Q row's and of its P column's; every `delta_t` steps of
the budget phase the lowest-scoring triplets over all layers get Λ = 0 until the budget is
met (a masked value keeps training and may come back); from step `total_steps - tfinal` on,
one final mask is fixed and reapplied after every update.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from eva_rl.adapters.layer import AdapterLinear
from eva_rl.adapters.model import adapter_layers
from eva_rl.schema import check_known_fields

STATE_FORMAT = "eva-rl-adalora-allocator"
STATE_VERSION = 1
FACTORS = ("lora_A", "lora_E", "lora_B")
"""Q (r, in), Λ (r, 1), P (out, r): the tensors whose importance is tracked."""


@dataclass
class AdaLoraSchedule:
    """AdaLoRA's budget schedule and importance settings (PEFT's `AdaLoraConfig` names in
    brackets). The initial rank per layer is the adapter's `AdapterConfig.rank` (`init_r`)."""

    total_steps: int
    """Optimizer updates of the whole fine-tuning run (`total_step`)."""
    target_rank: int = 8
    """Average rank per adapted layer at the end: budget = target_rank x layers (`target_r`)."""
    tinit: int = 0
    """Warm-up updates at the full initial budget before any masking (`tinit`)."""
    tfinal: int = 0
    """Final updates with the allocation frozen (`tfinal`)."""
    delta_t: int = 1
    """Updates between two allocations in the budget phase (`deltaT`)."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity |p · grad| (`beta1`)."""
    beta2: float = 0.85
    """EMA coefficient of its uncertainty |sensitivity - smoothed| (`beta2`)."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser in the loss (`orth_reg_weight`)."""

    def __post_init__(self) -> None:
        for key in ("total_steps", "target_rank", "tinit", "tfinal", "delta_t"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"AdaLoraSchedule.{key} must be an integer, got {value!r}")
        if self.total_steps < 1:
            raise ValueError(f"AdaLoraSchedule.total_steps must be >= 1, got {self.total_steps}")
        if min(self.target_rank, self.tinit, self.tfinal) < 0:
            raise ValueError(f"AdaLoraSchedule: target_rank, tinit, tfinal must be >= 0: {self}")
        if self.delta_t < 1:
            raise ValueError(f"AdaLoraSchedule.delta_t must be >= 1, got {self.delta_t}")
        if self.tinit >= self.total_steps - self.tfinal:
            raise ValueError(
                f"AdaLoraSchedule: tinit={self.tinit} >= total_steps - tfinal = "
                f"{self.total_steps - self.tfinal} leaves no budget phase"
            )
        for key in ("beta1", "beta2"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ValueError(f"AdaLoraSchedule.{key} must be in (0, 1), got "
                                 f"{getattr(self, key)!r}")
        if not (math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise ValueError(f"AdaLoraSchedule.orth_reg_weight must be a finite number >= 0, "
                             f"got {self.orth_reg_weight!r}")

    @property
    def final_start(self) -> int:
        """The step from which the allocation is frozen: `total_steps - tfinal`."""
        return self.total_steps - self.tfinal

    def budget_at(self, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask) at `step`: PEFT's cubic `budget_schedule`."""
        if step <= self.tinit:
            return init_budget, False
        if step > self.final_start:
            return target_budget, True
        remaining = 1 - (step - self.tinit) / (self.final_start - self.tinit)
        budget = int((init_budget - target_budget) * (remaining**3) + target_budget)
        return budget, step % self.delta_t == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdaLoraSchedule:
        """Inverse of `to_dict`; unknown keys are an error."""
        check_known_fields(cls, d, "AdaLoraSchedule fields")
        return cls(**d)


@dataclass(frozen=True)
class AdaLoraStep:
    """What one `AdaLoraAllocator.update` did."""

    step: int
    budget: int
    """Total rank budget of the schedule at this step."""
    ranks: dict[str, int]
    """Triplets per layer path kept by the latest allocation (the initial ranks before
    the first one): the rank schedule to log."""
    active_ranks: dict[str, int]
    """Non-zero singular values per layer now. Equal to `ranks` right after an allocation;
    in between (delta_t > 1) masked values keep training and come back."""
    masked: bool
    """Whether singular values were masked at this step."""

    @property
    def rank_total(self) -> int:
        """Sum of `ranks` (at most the budget after an allocation: ties are masked too)."""
        return sum(self.ranks.values())

    def scalars(self, prefix: str = "adalora") -> dict[str, float]:
        """Tensorboard scalars `<prefix>/budget`, `<prefix>/rank_total`, `<prefix>/rank/<layer>`."""
        out = {f"{prefix}/budget": float(self.budget),
               f"{prefix}/rank_total": float(self.rank_total)}
        out.update({f"{prefix}/rank/{path}": float(r) for path, r in self.ranks.items()})
        return out


class AdaLoraAllocator:
    """Budget schedule, importance scores and singular-value masks of adapter `name`.

    Holds the model's `adalora` layers of that adapter (rank > 0); the initial budget is
    the sum of their ranks, the target budget `schedule.target_rank` times their number.
    Call `update(step)` once per optimizer update, after `optimizer.step()` and before the
    gradients are cleared; add `orthogonal_loss()` to the training loss.
    """

    def __init__(self, model: nn.Module, name: str, schedule: AdaLoraSchedule) -> None:
        if not isinstance(schedule, AdaLoraSchedule):
            raise TypeError(f"schedule must be an AdaLoraSchedule, got {type(schedule).__name__}")
        self.name = name
        self.schedule = schedule
        self.layers = _adalora_layers(model, name)
        self.init_budget = sum(layer.ranks[name] for layer in self.layers.values())
        self.target_budget = schedule.target_rank * len(self.layers)
        if self.target_budget > self.init_budget:
            raise ValueError(
                f"AdaLoRA target budget {schedule.target_rank} x {len(self.layers)} layers = "
                f"{self.target_budget} exceeds the initial total rank {self.init_budget} of "
                f"adapter {name!r}"
            )
        self.ema_ipt: dict[str, Tensor] = {}
        """Smoothed sensitivity per `<layer>.<factor>` (empty before the first update)."""
        self.ema_unc: dict[str, Tensor] = {}
        """Smoothed uncertainty per `<layer>.<factor>`."""
        self.final_mask: dict[str, Tensor] | None = None
        """Kept triplets (bool (r,)) per layer, fixed at `schedule.final_start`."""
        self.allocated = {path: layer.ranks[name] for path, layer in self.layers.items()}
        """Triplets per layer kept by the latest allocation (the initial ranks before it)."""
        self.last_step: int | None = None

    # ------------------------------------------------------------------ per update

    def budget_at(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether the schedule masks) at `step`."""
        return self.schedule.budget_at(step, self.init_budget, self.target_budget)

    @torch.no_grad()
    def update(self, step: int) -> AdaLoraStep:
        """Update the importance scores and mask Λ to the budget of `step` (PEFT's
        `update_and_allocate(step)`); at `schedule.final_start` (or the first call after
        it) fix the final mask, and reapply it on every later call."""
        masked = True
        if step < self.schedule.final_start:
            self._update_importance()
            budget, masked = self.budget_at(step)
            if masked:
                self._mask_to_budget(budget)
        elif self.final_mask is None:
            budget = self.target_budget
            self.final_mask = self._mask_to_budget(budget)
            self.ema_ipt.clear()  # as PEFT's reset_ipt: the scores are no longer used
            self.ema_unc.clear()
        else:
            budget = self.target_budget
            for path, layer in self.layers.items():
                _apply_mask(layer.lora_E[self.name], self.final_mask[path])
        self.last_step = step
        active = self.ranks()
        if masked:
            self.allocated = active
        return AdaLoraStep(step, budget, dict(self.allocated), active, masked)

    def ranks(self) -> dict[str, int]:
        """Non-zero singular values of each layer now."""
        counts = torch.stack([torch.count_nonzero(layer.lora_E[self.name])
                              for layer in self.layers.values()])
        return dict(zip(self.layers, counts.tolist(), strict=True))

    def orthogonal_loss(self) -> Tensor:
        """`schedule.orth_reg_weight` x the orthogonality regulariser of this adapter."""
        return self.schedule.orth_reg_weight * _orthogonality(self.layers, self.name)

    def _factors(self) -> Iterator[tuple[str, Tensor]]:
        for path, layer in self.layers.items():
            for key in FACTORS:
                yield f"{path}.{key}", getattr(layer, key)[self.name]

    def _update_importance(self) -> None:
        b1, b2 = self.schedule.beta1, self.schedule.beta2
        for key, p in self._factors():
            if p.grad is None:
                raise RuntimeError(
                    f"AdaLoRA: {key} of adapter {self.name!r} has no gradient; call update() "
                    "after backward() and optimizer.step(), before zero_grad()"
                )
            ipt = (p * p.grad).abs()
            if key not in self.ema_ipt:
                self.ema_ipt[key], self.ema_unc[key] = torch.zeros_like(p), torch.zeros_like(p)
            # b·e + (1 - b)·x with each product rounded on its own, as PEFT computes it, so
            # the scores (and the masks) are bit-identical to PEFT's for the same history
            ema = self.ema_ipt[key].mul_(b1).add_((1 - b1) * ipt)
            self.ema_unc[key].mul_(b2).add_((1 - b2) * (ipt - ema).abs_())

    def triplet_scores(self) -> dict[str, Tensor]:
        """Score (r,) of every singular triplet per layer: s(Λ_i) + mean s(Q_i,:) + mean
        s(P_:,i), with s = smoothed sensitivity x uncertainty."""
        if not self.ema_ipt:
            raise RuntimeError(f"AdaLoRA adapter {self.name!r}: no importance scores yet "
                               "(update() has not run in the budget phase)")
        scores = {}
        for path in self.layers:
            s = {k: self.ema_ipt[f"{path}.{k}"] * self.ema_unc[f"{path}.{k}"] for k in FACTORS}
            q_and_p = s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)  # (r,) each
            scores[path] = s["lora_E"].view(-1) + q_and_p
        return scores

    def _mask_to_budget(self, budget: int) -> dict[str, Tensor]:
        """Zero Λ of the triplets scoring at or below the (init - budget)-th smallest score
        over all layers (ties go too, as in PEFT); returns the kept triplets per layer."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        threshold = -math.inf
        if k > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item()
        keep = {}
        for path, layer in self.layers.items():
            keep[path] = scores[path] > threshold
            _apply_mask(layer.lora_E[self.name], keep[path])
        return keep

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """`{"meta": JSON-able dict, "tensors": {str: CPU tensor}}` (tensors: safetensors-able).

        meta: format, version, adapter, schedule, init_budget, target_budget, layers
        ({path: initial rank}), last_step, allocated ({path: rank kept by the latest
        allocation}), has_final_mask. tensors: `<layer>.<factor>.ema_ipt` and
        `.ema_unc` for factor in lora_A, lora_E, lora_B (absent before the first update and
        after the final mask), and `<layer>.final_mask` (bool (r,)) once fixed.
        """
        tensors = {}
        for key in self.ema_ipt:
            tensors[f"{key}.ema_ipt"] = _cpu(self.ema_ipt[key])
            tensors[f"{key}.ema_unc"] = _cpu(self.ema_unc[key])
        for path, mask in (self.final_mask or {}).items():
            tensors[f"{path}.final_mask"] = _cpu(mask)
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "adapter": self.name,
            "schedule": self.schedule.to_dict(),
            "init_budget": self.init_budget,
            "target_budget": self.target_budget,
            "layers": {path: layer.ranks[self.name] for path, layer in self.layers.items()},
            "last_step": self.last_step,
            "allocated": dict(self.allocated),
            "has_final_mask": self.final_mask is not None,
        }
        return {"meta": meta, "tensors": tensors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`'s output; a different adapter layout or schedule is an error."""
        meta, tensors = state["meta"], state["tensors"]
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise ValueError(f"not an AdaLoRA allocator state of version {STATE_VERSION}: "
                             f"format {meta.get('format')!r}, version {meta.get('version')!r}")
        mine = self.state_dict()["meta"]
        for key in ("schedule", "layers"):
            if meta[key] != mine[key]:
                raise ValueError(f"AdaLoRA allocator state of adapter {meta['adapter']!r} has "
                                 f"{key} {meta[key]}, this allocator {mine[key]}")
        shapes = {key: p for key, p in self._factors()}
        ema_ipt, ema_unc, final = {}, {}, {}
        for full_key, t in tensors.items():
            key, _, field = full_key.rpartition(".")
            if field in ("ema_ipt", "ema_unc") and key in shapes and t.shape == shapes[key].shape:
                p = shapes[key]
                store = ema_ipt if field == "ema_ipt" else ema_unc
                store[key] = t.to(device=p.device, dtype=p.dtype, copy=True)
            elif field == "final_mask" and key in self.layers and t.dtype == torch.bool \
                    and t.shape == (self.layers[key].ranks[self.name],):
                final[key] = t.to(self.layers[key].lora_E[self.name].device, copy=True)
            else:
                raise ValueError(f"AdaLoRA allocator state: unexpected tensor {full_key!r} "
                                 f"{tuple(t.shape)}")
        if ema_ipt.keys() != ema_unc.keys() or (ema_ipt and ema_ipt.keys() != shapes.keys()):
            raise ValueError("AdaLoRA allocator state: incomplete importance tensors")
        if meta["has_final_mask"] != bool(final) or (final and final.keys() != self.layers.keys()):
            raise ValueError("AdaLoRA allocator state: final mask missing or incomplete")
        self.ema_ipt, self.ema_unc = ema_ipt, ema_unc
        self.final_mask = final or None
        self.allocated = {path: int(r) for path, r in meta["allocated"].items()}
        self.last_step = meta["last_step"]


def orthogonal_regularization(model: nn.Module, name: str) -> Tensor:
    """Mean over the `adalora` layers of adapter `name` of ‖Q Q^T - I‖_F and ‖P^T P - I‖_F
    (each counted once: 2 terms per layer), as PEFT's `AdaLoraModel.forward` (unweighted)."""
    return _orthogonality(_adalora_layers(model, name), name)


def _orthogonality(layers: Mapping[str, AdapterLinear], name: str) -> Tensor:
    total: Tensor | None = None
    for layer in layers.values():
        q, p = layer.lora_A[name], layer.lora_B[name]
        for cov in (q @ q.T, p.T @ p):  # (r, r) each
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            term = torch.linalg.vector_norm(cov - eye)
            total = term if total is None else total + term  # in order, as PEFT sums
    assert total is not None  # _adalora_layers found at least one layer
    return total / (2 * len(layers))


def _adalora_layers(model: nn.Module, name: str) -> dict[str, AdapterLinear]:
    layers = {p: lay for p, lay in adapter_layers(model).items() if name in lay.lora_E}
    if not layers:
        methods = {lay.methods[name] for lay in adapter_layers(model).values()
                   if name in lay.methods}
        raise ValueError(f"the model has no adalora adapter named {name!r} with rank > 0 "
                         f"(found methods {sorted(methods)})")
    return layers


def _apply_mask(values: Tensor, keep: Tensor) -> None:
    values.masked_fill_(~keep.view(-1, 1), 0.0)


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu", copy=True).contiguous()
