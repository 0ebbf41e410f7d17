"""The run-directory format: what pretraining writes and `DTAgent.load` reads.

    RUN/config.json          `write_run_config` / `read_run_config`: format, version and the
                             RUN_KEYS (model, train, tasks, data, state_mean, state_std,
                             target_returns), plus any extra keys the writer adds
    RUN/model.safetensors    WEIGHTS_FILE: the base model's final weights
    RUN/adapters/<task>/     ADAPTERS_DIR: task adapters (`eva_rl.adapters.save_adapter`)
    RUN/tb/, RUN/checkpoints/  the Trainer's tensorboard events and checkpoints

A task's target return (the return-to-go the agent conditions on) is, by default, the
largest episode return in that task's dataset: `default_target_return`. Every file is
written under a temporary name and renamed (docs/CONTRACTS.md, "Run directory").
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from eva_rl.io import atomic_write, read_versioned_json, to_json_safe, write_json_atomic

logger = logging.getLogger(__name__)

RUN_FORMAT = "eva-rl-run"
RUN_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTERS_DIR = "adapters"
RUN_KEYS = ("model", "train", "tasks", "data", "state_mean", "state_std", "target_returns")
"""The keys every run config has (besides ``format`` and ``version``)."""


class CheckpointError(ValueError):
    """A run, weights or checkpoint file is missing, corrupt, or does not fit the model."""


def write_run_config(
    run_dir: str | os.PathLike,
    *,
    model: Any,
    train: Any,
    tasks: Sequence[str],
    data: str | os.PathLike,
    state_mean: Sequence[float],
    state_std: Sequence[float],
    target_returns: Mapping[str, float],
    overwrite: bool = False,
    **extra: Any,
) -> Path:
    """Write ``run_dir/config.json``; ``model``/``train`` are configs or dicts.

    An existing file is refused unless ``overwrite=True``. ``extra`` keys are stored
    alongside the contract's keys.
    """
    path = Path(run_dir) / CONFIG_FILE
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    mean, std = [float(x) for x in state_mean], [float(x) for x in state_std]
    if len(mean) != len(std):
        raise ValueError(f"state_mean has {len(mean)} values but state_std has {len(std)}")
    if not all(math.isfinite(x) for x in mean + std) or min(std, default=1.0) <= 0:
        raise ValueError("state_mean/state_std must be finite and state_std > 0")
    config = {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "model": to_json_safe(model),
        "train": to_json_safe(train),
        "tasks": list(tasks),
        "data": str(data),
        "state_mean": mean,
        "state_std": std,
        "target_returns": {str(k): float(v) for k, v in target_returns.items()},
        **{k: to_json_safe(v) for k, v in extra.items()},
    }
    return write_json_atomic(path, config)


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``run_dir/config.json``; a clear ``ValueError`` if it is unusable."""
    path = Path(run_dir) / CONFIG_FILE
    config = read_versioned_json(
        path, RUN_FORMAT, RUN_VERSION, "run config", error_cls=CheckpointError
    )
    missing = [k for k in RUN_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{path}: run config lacks {missing}")
    if len(config["state_mean"]) != len(config["state_std"]):
        raise CheckpointError(f"{path}: state_mean and state_std differ in length")
    return config


def default_target_return(dataset: Any) -> float:
    """The return a task is conditioned on: its dataset's largest episode return.

    ``dataset`` is a `TrajectoryDataset` (anything with ``episode_returns``)."""
    returns = np.asarray(dataset.episode_returns)
    if returns.size == 0:
        raise ValueError(f"{getattr(dataset, 'path', dataset)}: no episodes, so no target return")
    return float(returns.max())


def default_target_returns(datasets: Mapping[str, Any]) -> dict[str, float]:
    """`default_target_return` of every task's dataset, in the mapping's order."""
    return {task: default_target_return(ds) for task, ds in datasets.items()}


def adapter_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The saved task adapters of a run, ``RUN/adapters/<task>/``, sorted by name
    (half-written ``.``-prefixed temporary directories are skipped)."""
    root = Path(run_dir) / ADAPTERS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def save_weights(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save a module's ``state_dict`` (or a tensor dict) as safetensors, atomically."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen:  # safetensors refuses aliased tensors
            t = t.clone()
        seen.add(ident)
        tensors[key] = t
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file into CPU tensors; ``CheckpointError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file: {err}") from err


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load safetensors weights into ``model`` in place after checking keys and shapes.

    Missing or unexpected keys (with ``strict``) and shape mismatches raise
    ``CheckpointError`` naming the file and the first offending keys.
    """
    path = Path(path)
    state = read_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if shapes:
        problems.append(f"shape mismatch {_first(shapes)}")
    if strict and missing:
        problems.append(f"missing keys {_first(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if problems:
        raise CheckpointError(f"{path}: does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=strict)
    return model


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
