"""`AdapterLinear`: a frozen `nn.Linear` holding any number of named adapters (one per task)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from eva_rl.adapters.config import AdapterConfig
from eva_rl.adapters.variants import VARIANTS, LoraVariant

TENSOR_KEYS = (
    "lora_A", "lora_B", "lora_magnitude_vector", "lora_E", "lora_offset_A", "lora_offset_B"
)
"""Per-adapter tensors of a layer, as saved; the first four are trainable."""
TRAINABLE_KEYS = TENSOR_KEYS[:4]


class BufferDict(nn.Module):
    """A dict of (frozen, persistent) buffers, the buffer counterpart of `nn.ParameterDict`."""

    def __getitem__(self, key: str) -> Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.register_buffer(key, value)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._buffers.items())


class AdapterLinear(nn.Module):
    """Wraps `base_layer` (kept frozen) and adds named low-rank adapters to it.

    PEFT-style per-adapter dicts: `lora_A[name]` (r, in), `lora_B[name]` (out, r),
    `lora_magnitude_vector[name]` (out,) for DoRA, `lora_E[name]` (r, 1) the singular
    values of AdaLoRA (whose A, B are its Q, P), frozen `lora_offset_A/B[name]` for
    PiSSA/OLoRA, `lora_dropout[name]`, `scaling[name]`, `ranks[name]`, `alphas[name]`,
    `methods[name]`. A rank-0 adapter is registered (in `ranks`) but holds no tensors: it is
    the identity on this layer. Forward uses `active_adapter` (None = the bare base layer).
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"AdapterLinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_offset_A = BufferDict()
        self.lora_offset_B = BufferDict()
        self.lora_dropout = nn.ModuleDict()
        self.ranks: dict[str, int] = {}
        self.alphas: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.methods: dict[str, str] = {}
        self.configs: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self._merge_backup: Tensor | None = None

    @property
    def weight(self) -> Tensor:
        """The (frozen) base weight (out, in)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The (frozen) base bias."""
        return self.base_layer.bias

    def variant(self, name: str) -> LoraVariant:
        """The strategy object of adapter `name`."""
        return VARIANTS[self.methods[name]]

    def add(
        self,
        name: str,
        config: AdapterConfig,
        rank: int,
        alpha: float,
        *,
        lora_A: Tensor | None = None,
        tensors: Mapping[str, Tensor] | None = None,
        path: str = "",
    ) -> None:
        """Register adapter `name` of `config.method`: a fresh init (with `lora_A`: given A,
        B = 0), or the saved `tensors`. Rank 0 registers the name and holds no tensors."""
        self._check_not_merged(f"add adapter {name!r}")
        if name in self.ranks:
            raise ValueError(f"layer {path!r} already has an adapter named {name!r}")
        scaling = config.scaling_for(rank, alpha)
        if rank > 0:
            if tensors is None:
                tensors = VARIANTS[config.method].init(self, path, rank, scaling, lora_A)
            unknown = set(tensors) - set(TENSOR_KEYS)
            if unknown:
                raise ValueError(f"unknown adapter tensors {sorted(unknown)} for layer {path!r}")
            w = self.weight
            for key, value in tensors.items():
                value = value.detach().to(device=w.device, dtype=w.dtype).clone()
                store = getattr(self, key)
                store[name] = nn.Parameter(value) if key in TRAINABLE_KEYS else value
            drop = config.dropout
            dropout = nn.Dropout(drop) if drop > 0 else nn.Identity()
            self.lora_dropout[name] = dropout.train(self.training)  # eval stays eval
        self.ranks[name] = rank
        self.alphas[name] = float(alpha)
        self.scaling[name] = scaling
        self.methods[name] = config.method
        self.configs[name] = config

    def remove(self, name: str) -> None:
        """Delete adapter `name` from this layer."""
        self._check_not_merged(f"delete adapter {name!r}")
        for key in (*TENSOR_KEYS, "lora_dropout"):
            store = getattr(self, key)
            if name in store:
                del store[name]
        for d in (self.ranks, self.alphas, self.scaling, self.methods, self.configs):
            d.pop(name)
        if self.active_adapter == name:
            self.active_adapter = None

    def adapter_tensors(self, name: str) -> dict[str, Tensor]:
        """The tensors of adapter `name` on this layer (empty for rank 0)."""
        return {k: getattr(self, k)[name] for k in TENSOR_KEYS if name in getattr(self, k)}

    def forward(self, x: Tensor) -> Tensor:
        """Base output plus the active adapter's update (nothing when none is active)."""
        if self.merged_adapter is not None:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    f"adapter {self.merged_adapter!r} is merged into the base weights: training "
                    "through it is refused; call unmerge_adapter(model) first (or use eval())"
                )
            return self.base_layer(x)
        name = self.active_adapter
        if name is None or self.ranks.get(name, 0) == 0:
            return self.base_layer(x)
        return self.variant(name).forward(self, name, x)

    def base_row_sq_norm(self) -> Tensor:
        """Row-wise ‖W‖² of the unmerged base weight (out,), detached.

        Not cached: it costs 1/r of the W A^T product DoRA's norm needs anyway, and a cache
        keyed on the weight would miss in-place edits made through `.data`."""
        return self.unmerged_weight().detach().square().sum(dim=1)

    def unmerged_weight(self) -> Tensor:
        """The base weight without any merged adapter."""
        return self.weight if self._merge_backup is None else self._merge_backup

    @torch.no_grad()
    def effective_weight(self, name: str | None) -> Tensor:
        """W_eff (out, in) of adapter `name` (`None`: the base weight), detached."""
        if name is not None and name not in self.ranks:
            raise KeyError(f"no adapter named {name!r} on this layer")
        w = self.unmerged_weight().detach()
        if name is None or self.ranks[name] == 0:
            return w.clone()
        return w + self.variant(name).delta_weight(self, name, w)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weight; the original bytes are kept for `unmerge`."""
        self._check_not_merged(f"merge adapter {name!r}")
        merged = self.effective_weight(name)
        self._merge_backup = self.weight.detach().clone()
        self.weight.copy_(merged)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit (no-op when nothing is merged)."""
        if self._merge_backup is None:
            return
        self.weight.copy_(self._merge_backup)
        self._merge_backup = None
        self.merged_adapter = None

    def _check_not_merged(self, action: str) -> None:
        if self.merged_adapter is not None:
            raise RuntimeError(
                f"cannot {action}: adapter {self.merged_adapter!r} is merged; "
                "call unmerge_adapter(model) first"
            )

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: {self.methods[n]} r={r}" for n, r in self.ranks.items())
        return f"adapters={{{ranks}}}, active={self.active_adapter!r}"
