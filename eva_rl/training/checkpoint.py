"""Training checkpoints: ``run_dir/checkpoints/step_<n>/{model.safetensors,state.pt}``.

Weights are safetensors (with ``checksums.json``: the SHA-256 of both files, checked on
load); the rest (optimizer, schedule step, sampler, RNG, loss history)
is a ``torch.save`` of plain tensors, numbers, strings, lists and dicts, read back with
``weights_only=True`` so nothing is ever unpickled. A checkpoint directory is written
under a temporary name and renamed into place, so a complete-looking one is complete.
"""

from __future__ import annotations

import json
import logging
import os
import pickle  # only for its exception type: torch.load raises it; nothing is unpickled
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eva_rl.io import atomic_dir, fsync_file, sha256_file, write_json_atomic
from eva_rl.training.run import WEIGHTS_FILE, CheckpointError, load_weights, save_weights

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.pt"
CHECKSUMS_FILE = "checksums.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The directory of the checkpoint after ``step`` updates."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, path)``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / WEIGHTS_FILE).is_file() and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(path: str | os.PathLike, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write ``model`` weights and ``state`` to the new directory ``path`` atomically."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: checkpoint already exists; not overwriting it")
    with atomic_dir(path) as tmp:
        save_weights(model, tmp / WEIGHTS_FILE)
        torch.save(state, tmp / STATE_FILE)
        fsync_file(tmp / STATE_FILE)
        write_json_atomic(tmp / CHECKSUMS_FILE, {
            name: sha256_file(tmp / name) for name in (WEIGHTS_FILE, STATE_FILE)})
    return path


def verify_checkpoint(path: str | os.PathLike) -> None:
    """``CheckpointError`` naming the file if a checkpoint's files differ from the checksums
    written with them (a checkpoint written before checksums existed is accepted)."""
    path = Path(path)
    file = path / CHECKSUMS_FILE
    if not file.is_file():
        return
    try:
        sums = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable checkpoint checksums: {err}") from err
    for name in (WEIGHTS_FILE, STATE_FILE):
        if (path / name).is_file() and sums.get(name) != sha256_file(path / name):
            raise CheckpointError(f"{path / name}: corrupt or modified since it was written "
                                  f"(checksum differs from {file})")


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's ``state.pt`` with ``weights_only=True``; clear errors."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: checkpoint state file not found")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{file}: corrupt or unreadable checkpoint state: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: checkpoint state is not a dict")
    return state


def load_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load weights into ``model`` (keys and shapes checked) and return the saved state."""
    path = Path(path)
    verify_checkpoint(path)
    state = read_state(path)
    load_weights(model, path / WEIGHTS_FILE)
    return state


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    old = [p for _, p in list_checkpoints(run_dir)[:-keep]]
    for p in old:
        shutil.rmtree(p)
        logger.info("deleted old checkpoint %s", p)
    return old
