"""Import the EVA/L2M papers' per-task ``.npz`` trajectory files into our format."""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.data.format import DatasetError, TrajectoryDataset, write_dataset

logger = logging.getLogger(__name__)

NPZ_KEYS = ("observations", "next_observations", "actions", "rewards", "dones")
_REQUIRED = ("observations", "actions", "rewards")
_CHUNK_ROWS = 1 << 16


def import_npz(
    npz_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    task: str,
    episode_length: int = 200,
    *,
    success_reward: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> TrajectoryDataset:
    """Convert one ``.npz`` (keys ``observations, next_observations, actions, rewards,
    dones``) into a dataset at ``out_dir``; returns it opened.

    Episodes end after every step with ``dones`` true and, independently, after every
    ``episode_length`` steps since the previous end: files whose ``dones`` mark only
    terminal steps, every end, or nothing at all are all split correctly. Where
    ``next_observations`` is present, the number of steps inside an episode whose
    ``next_observations`` differ from the following ``observations`` is recorded in the
    manifest (``next_obs_mismatches``; non-zero hints at a wrong ``episode_length``).

    The files hold no success flags. By default every step is stored as not successful
    and the manifest says ``successes_known: false``. Meta-World's v2/v3 reward functions
    set the reward to 10 on success for most but not all tasks (40 of 50 have that line),
    so ``success_reward=10.0`` marks ``reward >= success_reward`` as success, recorded in
    the manifest as ``success_rule``; use it only for tasks where that holds.
    """
    npz_path = Path(npz_path)
    if int(episode_length) != episode_length or episode_length < 1:
        raise ValueError(f"episode_length must be a positive integer, got {episode_length!r}")
    data = _read_npz(npz_path)
    obs, actions = data["observations"], data["actions"]
    rewards = data["rewards"]
    n = len(obs)
    for key, arr in data.items():
        if len(arr) != n:
            raise DatasetError(
                f"{npz_path}: '{key}' has {len(arr)} rows but 'observations' has {n}"
            )
    if rewards.ndim != 1:
        raise DatasetError(f"{npz_path}: 'rewards' should be (N,), got shape {rewards.shape}")
    dones = data.get("dones")
    if dones is not None and dones.ndim != 1:
        raise DatasetError(f"{npz_path}: 'dones' should be (N,), got shape {dones.shape}")
    offsets = episode_offsets_from_dones(n, dones, int(episode_length))

    if success_reward is None:
        successes = np.zeros(n, dtype=bool)
        success_info: dict[str, Any] = {"successes_known": False}
    else:
        successes = rewards >= success_reward
        success_info = {"successes_known": True, "success_rule": f"reward >= {success_reward}"}

    info: dict[str, Any] = {
        "collector": "import_npz",
        "source": str(npz_path),
        "source_keys": sorted(data),
        "episode_length": int(episode_length),
        **success_info,
    }
    if "next_observations" in data:
        info["next_obs_mismatches"] = _next_obs_mismatches(
            obs, data["next_observations"], offsets, npz_path
        )
        if info["next_obs_mismatches"]:
            logger.warning(
                "%s: %d in-episode steps have next_observations != the next observation",
                npz_path,
                info["next_obs_mismatches"],
            )
    info.update(metadata or {})
    return write_dataset(
        out_dir,
        task=task,
        observations=obs,
        actions=actions,
        rewards=rewards,
        successes=successes,
        episode_offsets=offsets,
        metadata=info,
        overwrite=overwrite,
    )


def episode_offsets_from_dones(n: int, dones: np.ndarray | None, episode_length: int) -> np.ndarray:
    """(E + 1,) int64 offsets: an episode ends at a true ``dones`` row or after
    ``episode_length`` steps; a shorter final piece is kept as its own episode."""
    if n < 1:
        raise DatasetError("no transitions to split into episodes")
    ends = np.flatnonzero(np.asarray(dones, dtype=bool)) + 1 if dones is not None else []
    bounds = np.unique(np.concatenate(([0], np.asarray(ends, np.int64), [n])))
    pieces = [
        np.arange(lo, hi, episode_length) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return np.concatenate([*pieces, [n]]).astype(np.int64)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: npz file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _REQUIRED if k not in npz.files]
            if missing:
                raise DatasetError(
                    f"{path}: missing keys {missing} (has {sorted(npz.files)}; "
                    f"expected {list(NPZ_KEYS)})"
                )
            data = {k: npz[k] for k in NPZ_KEYS if k in npz.files}
    except DatasetError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        msg = f"{path}: cannot read npz (corrupt, or holds pickled objects): {err}"
        raise DatasetError(msg) from err
    # SB3 replay buffers store (N, n_envs, ...) with n_envs = 1, and rewards as (N, 1)
    for key, arr in data.items():
        if arr.ndim >= 2 and arr.shape[1] == 1 and (key in ("rewards", "dones") or arr.ndim == 3):
            data[key] = arr.reshape(arr.shape[0], *arr.shape[2:])
    return data


def _next_obs_mismatches(obs, next_obs, offsets, path: Path) -> int:
    if next_obs.shape != obs.shape:
        raise DatasetError(
            f"{path}: 'next_observations' has shape {next_obs.shape}, 'observations' {obs.shape}"
        )
    inside = np.ones(len(obs) - 1, dtype=bool)
    inside[offsets[1:-1] - 1] = False  # step before an episode start crosses a boundary
    mismatches = 0
    for lo in range(0, len(obs) - 1, _CHUNK_ROWS):  # chunks: isclose makes big temporaries
        hi = min(lo + _CHUNK_ROWS, len(obs) - 1)
        same = np.isclose(next_obs[lo:hi], obs[lo + 1 : hi + 1], rtol=1e-5, atol=1e-6)
        mismatches += int((~same.all(axis=1) & inside[lo:hi]).sum())
    return mismatches
