"""Activation collection for EVA: forward hooks on the target layers of a frozen model.

`ActivationCollector` hooks each target layer, keeps the rows of its input selected by the
batch's mask (`(B, L, d)` -> `(n, d)`), gathers them across ranks under torch.distributed,
and hands them to the caller after each forward. Hooks can be removed and re-attached per
layer (a converged layer costs nothing on later batches). `find_shared_inputs` groups layers
that received the same input tensor (q, k, v), so they share one decomposition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from eva_rl.adapters.config import match_pattern
from eva_rl.adapters.model import linear_layers

MaskFn = Callable[[Any], torch.Tensor]
GroupFn = Callable[[Any], torch.Tensor]
"""``group_fn(batch) -> long (B, L)``: the group of each token row (e.g. its token type)."""


def find_target_layers(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Paths of the `nn.Linear` / adapter layers matching `target_modules` (module order).

    The same matching as `add_adapter` (exact path or fnmatch glob; the insides of an adapter
    layer are skipped since the adapter layer itself receives the same input).
    """
    patterns = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    keys = dict.fromkeys(patterns)
    paths = [p for p in linear_layers(model) if match_pattern(p, keys) is not None]
    if not paths:
        raise ValueError(f"no nn.Linear layer of the model matches target_modules={patterns}")
    return paths


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `(n_rank, d)` rows (rank order); identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes_l = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(sizes_l), x.shape[1]))
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([t[:n] for t, n in zip(out, sizes_l, strict=True)], 0)


class ActivationCollector:
    """Forward hooks that store the selected input rows of each layer for the current batch.

    Usage: `set_mask(mask)` before a forward (None = every row), run the forward, then
    `pop()` returns `{path: (n, d) float32}` for the layers hooked during that forward.
    With `set_mask(mask, groups)`, `pop_groups()` returns each kept row's group, and a
    layer with an entry in `group_offsets` (`(n_groups, d)`) has its group's row subtracted
    from each of its rows.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], gather: bool = True) -> None:
        self.model = model
        self.gather = gather
        self._modules = {p: model.get_submodule(p) for p in paths}
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._rows: dict[str, torch.Tensor] = {}
        self._raw: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._groups: torch.Tensor | None = None
        self._row_groups: dict[str, torch.Tensor] = {}
        self.group_offsets: dict[str, torch.Tensor] = {}
        self.keep_raw = False  # keep each layer's unmasked input (for shared-input detection)

    @property
    def active(self) -> list[str]:
        return list(self._handles)

    def attach(self, path: str) -> None:
        if path not in self._handles:
            self._handles[path] = self._modules[path].register_forward_hook(self._hook(path))

    def detach(self, path: str) -> None:
        handle = self._handles.pop(path, None)
        if handle is not None:
            handle.remove()

    def close(self) -> None:
        for path in list(self._handles):
            self.detach(path)
        self._rows.clear()
        self._raw.clear()

    def set_mask(self, mask: torch.Tensor | None, groups: torch.Tensor | None = None) -> None:
        self._mask = None if mask is None else mask.reshape(-1).bool()
        self._groups = None if groups is None else groups.reshape(-1).long()

    def pop(self) -> dict[str, torch.Tensor]:
        rows, self._rows = self._rows, {}
        return rows

    def pop_groups(self) -> dict[str, torch.Tensor]:
        """The group of every row `pop` returned (empty without groups)."""
        groups, self._row_groups = self._row_groups, {}
        return groups

    def pop_raw(self) -> dict[str, torch.Tensor]:
        raw, self._raw = self._raw, {}
        return raw

    def _hook(self, path: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if isinstance(args, tuple) else args
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"EVA: layer {path} got a {type(x).__name__} input, not a Tensor")
            if self.keep_raw:
                self._raw[path] = x
            x = x.detach().reshape(-1, x.shape[-1])
            if self._mask is not None:
                if self._mask.numel() != x.shape[0]:
                    raise ValueError(
                        f"EVA: mask has {self._mask.numel()} entries but layer {path} has "
                        f"{x.shape[0]} token rows (input shape {tuple(args[0].shape)})"
                    )
                x = x[self._mask.to(x.device)]
            x = x.float()
            groups = None
            if self._groups is not None:
                groups = self._groups.to(x.device)
                groups = groups[self._mask.to(x.device)] if self._mask is not None else groups
                if path in self.group_offsets:
                    x = x - self.group_offsets[path].to(x.device)[groups]
            x = all_gather_rows(x) if self.gather else x
            if groups is not None and self.gather:  # the groups travel with their rows
                groups = all_gather_rows(groups.unsqueeze(1).float()).squeeze(1).long()
            if path in self._rows:  # the layer ran more than once in this forward
                x = torch.cat([self._rows[path], x])
                if groups is not None:
                    groups = torch.cat([self._row_groups[path], groups])
            self._rows[path] = x
            if groups is not None:
                self._row_groups[path] = groups

        return hook


def find_shared_inputs(inputs: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Group layers whose inputs are the same tensor or equal in value.

    Returns `{leader: [leader, *others]}` for every layer (a layer alone is its own group);
    the leader is the first of its group in `inputs`' order.
    """
    groups: dict[str, list[str]] = {}
    for path, x in inputs.items():
        for leader, members in groups.items():
            y = inputs[leader]
            same = x is y or (
                x.shape == y.shape
                and x.dtype == y.dtype
                and x.device == y.device
                and (x.data_ptr() == y.data_ptr() or torch.equal(x, y))
            )
            if same:
                members.append(path)
                break
        else:
            groups[path] = [path]
    return groups


def default_forward(model: nn.Module, batch: Any) -> Any:
    """`model(**batch)` for a mapping, `model(*batch)` for a tuple/list, else `model(batch)`."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


DT_BATCH_KEYS = ("states", "actions", "rewards", "returns_to_go", "timesteps", "mask")


def dt_forward_and_mask(
    model: nn.Module, token_types: Sequence[str] | None = None
) -> tuple[Callable[[nn.Module, Mapping], Any], MaskFn]:
    """`forward` and `mask_fn` for `compute_eva` on a Decision Transformer.

    The batch is a WindowSampler batch as torch tensors on the model's device (extra keys such
    as `task_index` are ignored). The mask keeps real (unpadded) tokens of the selected types
    (names from `model.config.token_layout`; None = all). Uses only the DT's public
    `token_mask(mask)` and `token_types()`.
    """
    layout = tuple(model.config.token_layout)
    chosen = layout if token_types is None else tuple(token_types)
    unknown = [t for t in chosen if t not in layout]
    if unknown or not chosen:
        raise ValueError(f"unknown token types {unknown or chosen}; valid: {layout}")
    wanted = torch.tensor([t in chosen for t in layout])

    def forward(m: nn.Module, batch: Mapping) -> Any:
        return m(**{k: batch[k] for k in DT_BATCH_KEYS if k in batch})

    def mask_fn(batch: Mapping) -> torch.Tensor:
        mask = batch.get("mask")
        if mask is None:
            mask = torch.ones(batch["states"].shape[:2], dtype=torch.bool,
                              device=batch["states"].device)
        tok = model.token_mask(mask)  # (B, K * n_tokens)
        types = model.token_types(mask.shape[1]).to(tok.device)  # (K * n_tokens,)
        return tok & wanted.to(tok.device)[types].unsqueeze(0)

    return forward, mask_fn


def dt_token_groups(model: nn.Module) -> GroupFn:
    """`group_fn` for `compute_eva` on a Decision Transformer: each token row's type (its index
    in `model.config.token_layout`), so that each type's mean can be removed before the SVD."""

    def group_fn(batch: Mapping) -> torch.Tensor:
        b, k = batch["states"].shape[:2]
        types = model.token_types(k).to(batch["states"].device)  # (K * n_tokens,)
        return types.unsqueeze(0).expand(b, -1)

    return group_fn
