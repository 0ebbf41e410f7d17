"""Import the EVA/L2M papers' ``.npz`` trajectories (flat buffer files or per-episode
directories) into our format."""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.data.format import DatasetError, TrajectoryDataset, write_dataset

logger = logging.getLogger(__name__)

NPZ_KEYS = ("observations", "next_observations", "actions", "rewards", "dones")
_REQUIRED = ("observations", "actions", "rewards")
EPISODE_KEYS = ("states", "actions", "rewards", "dones")
"""Keys of one L2M per-episode file (``returns_to_go``, if present, is not needed)."""
TAIL_POLICIES = ("drop", "keep", "error")
"""What `import_npz` does with a flat file's trailing piece without ``done``."""
_CHUNK_ROWS = 1 << 16


def import_npz(
    npz_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    task: str,
    episode_length: int = 200,
    *,
    incomplete_tail: str = "drop",
    success_reward: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> TrajectoryDataset:
    """Convert L2M-style ``.npz`` trajectories into a dataset at ``out_dir``; returns it opened.

    Two layouts (L2M's ``src/buffers``):

    - a flat replay-buffer file (keys ``observations, next_observations, actions, rewards,
      dones``). Episodes end after every step with ``dones`` true and, independently, after
      every ``episode_length`` steps since the previous end: files whose ``dones`` mark only
      terminal steps, every end, or nothing at all are all split correctly. A trailing piece
      that neither ends with ``done`` nor reaches ``episode_length`` is an unfinished
      episode: ``incomplete_tail="drop"`` (default, L2M's behaviour: its buffer only adds an
      episode on ``done`` or when full) leaves it out, ``"keep"`` stores it as a short
      episode (this importer's behaviour before), ``"error"`` refuses the file. The manifest
      records ``dropped_tail_steps`` (also logged). Where ``next_observations`` is present,
      the number of steps inside an episode whose ``next_observations`` differ from the
      following ``observations`` is recorded (``next_obs_mismatches``; non-zero hints at a
      wrong ``episode_length``).
    - a directory of per-episode files, one episode each with keys ``states``, ``actions``,
      ``rewards`` and a scalar ``dones`` (read in natural file-name order: 2 before 10);
      ``episode_length`` does not apply and the manifest counts ``terminal_episodes``.

    The files hold no success flags. By default every step is stored as not successful
    and the manifest says ``successes_known: false``. Meta-World's v2/v3 reward functions
    set the reward to 10 on success for most but not all tasks (40 of 50 have that line),
    so ``success_reward=10.0`` marks ``reward >= success_reward`` as success, recorded in
    the manifest as ``success_rule``; use it only for tasks where that holds.
    """
    npz_path = Path(npz_path)
    if int(episode_length) != episode_length or episode_length < 1:
        raise ValueError(f"episode_length must be a positive integer, got {episode_length!r}")
    if incomplete_tail not in TAIL_POLICIES:
        raise ValueError(f"incomplete_tail must be one of {TAIL_POLICIES}, got {incomplete_tail!r}")
    if npz_path.is_dir():
        obs, actions, rewards, offsets, info = _read_episode_dir(npz_path)
    else:
        obs, actions, rewards, offsets, info = _read_buffer_file(
            npz_path, int(episode_length), incomplete_tail)

    if success_reward is None:
        successes = np.zeros(len(obs), dtype=bool)
        info["successes_known"] = False
    else:
        successes = rewards >= success_reward
        info.update(successes_known=True, success_rule=f"reward >= {success_reward}")
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


def _read_buffer_file(path: Path, episode_length: int, incomplete_tail: str):
    """The flat layout: arrays, episode offsets and manifest info (see `import_npz`)."""
    data = _read_npz(path)
    obs, actions = data["observations"], data["actions"]
    rewards = data["rewards"]
    n = len(obs)
    for key, arr in data.items():
        if len(arr) != n:
            raise DatasetError(f"{path}: '{key}' has {len(arr)} rows but 'observations' has {n}")
    if rewards.ndim != 1:
        raise DatasetError(f"{path}: 'rewards' should be (N,), got shape {rewards.shape}")
    dones = data.get("dones")
    if dones is not None and dones.ndim != 1:
        raise DatasetError(f"{path}: 'dones' should be (N,), got shape {dones.shape}")
    next_obs = data.get("next_observations")
    if next_obs is not None and next_obs.shape != obs.shape:
        raise DatasetError(
            f"{path}: 'next_observations' has shape {next_obs.shape}, 'observations' {obs.shape}"
        )
    offsets = episode_offsets_from_dones(n, dones, episode_length)

    tail = int(offsets[-1] - offsets[-2])
    finished = tail == episode_length or (dones is not None and bool(dones[-1]))
    dropped = 0
    if not finished and incomplete_tail == "error":
        raise DatasetError(f"{path}: the last {tail} steps end without done before "
                           f"episode_length={episode_length} (incomplete_tail='error')")
    if not finished and incomplete_tail == "drop":
        if len(offsets) == 2:
            raise DatasetError(f"{path}: its only episode ({tail} steps) ends without done "
                               f"before episode_length={episode_length}; nothing would be "
                               "left (pass incomplete_tail='keep' to keep it)")
        dropped, n = tail, int(offsets[-2])
        offsets = offsets[:-1]
        obs, actions, rewards = obs[:n], actions[:n], rewards[:n]
        next_obs = None if next_obs is None else next_obs[:n]
        logger.info("%s: dropped the trailing %d steps without done (an unfinished episode, "
                    "as L2M does; incomplete_tail='keep' keeps them)", path, dropped)

    info: dict[str, Any] = {
        "collector": "import_npz",
        "source": str(path),
        "source_layout": "buffer",
        "source_keys": sorted(data),
        "episode_length": episode_length,
        "incomplete_tail": incomplete_tail,
        "dropped_tail_steps": dropped,
    }
    if next_obs is not None:
        info["next_obs_mismatches"] = _next_obs_mismatches(obs, next_obs, offsets, path)
        if info["next_obs_mismatches"]:
            logger.warning(
                "%s: %d in-episode steps have next_observations != the next observation",
                path,
                info["next_obs_mismatches"],
            )
    return obs, actions, rewards, offsets, info


def _read_episode_dir(path: Path):
    """The per-episode layout: one ``.npz`` per episode (``states, actions, rewards``, scalar
    ``dones``), concatenated in natural file-name order."""
    files = sorted((f for f in path.iterdir() if f.suffix == ".npz" and f.is_file()),
                   key=lambda f: _natural_key(f.name))
    if not files:
        found = sorted(f.name for f in path.iterdir())[:5]
        raise DatasetError(f"{path}: no per-episode .npz files (found {found}); other formats "
                           "(.pkl, .hdf5) are not read")
    obs, actions, rewards, lengths = [], [], [], []
    terminal = 0
    keys: set[str] = set()
    for f in files:
        ep = _read_npz(f, EPISODE_KEYS, EPISODE_KEYS)
        keys.update(ep)
        t = len(ep["states"])
        r = ep["rewards"]
        if t < 1:
            raise DatasetError(f"{f}: an empty episode")
        for key in ("actions", "rewards"):
            if len(ep[key]) != t:
                raise DatasetError(f"{f}: '{key}' has {len(ep[key])} rows but 'states' has {t}")
        if r.ndim != 1:
            raise DatasetError(f"{f}: 'rewards' should be (T,), got shape {r.shape}")
        if ep["dones"].size != 1:
            raise DatasetError(f"{f}: 'dones' should be a scalar (one episode per file), got "
                               f"shape {ep['dones'].shape}")
        for key, ref in (("states", obs), ("actions", actions)):
            if ref and ep[key].shape[1:] != ref[0].shape[1:]:
                raise DatasetError(f"{f}: '{key}' rows have shape {ep[key].shape[1:]}, but "
                                   f"{files[0].name} has {ref[0].shape[1:]}")
        obs.append(ep["states"])
        actions.append(ep["actions"])
        rewards.append(r)
        lengths.append(t)
        terminal += bool(ep["dones"].reshape(()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    info = {
        "collector": "import_npz",
        "source": str(path),
        "source_layout": "episodes",
        "source_keys": sorted(keys),
        "n_files": len(files),
        "terminal_episodes": terminal,
    }
    return np.concatenate(obs), np.concatenate(actions), np.concatenate(rewards), offsets, info


def _natural_key(name: str) -> list[int | str]:
    """``ep_2.npz`` before ``ep_10.npz``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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


def _read_npz(
    path: Path, keys: tuple[str, ...] = NPZ_KEYS, required: tuple[str, ...] = _REQUIRED
) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: npz file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in required if k not in npz.files]
            if missing:
                layouts = (f"expected {list(keys)}; a per-episode L2M file has {list(EPISODE_KEYS)}"
                           " and is read from its directory")
                raise DatasetError(
                    f"{path}: missing keys {missing} (has {sorted(npz.files)}; {layouts})"
                )
            data = {k: npz[k] for k in keys if k in npz.files}
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
    inside = np.ones(len(obs) - 1, dtype=bool)
    inside[offsets[1:-1] - 1] = False  # step before an episode start crosses a boundary
    mismatches = 0
    for lo in range(0, len(obs) - 1, _CHUNK_ROWS):  # chunks: isclose makes big temporaries
        hi = min(lo + _CHUNK_ROWS, len(obs) - 1)
        same = np.isclose(next_obs[lo:hi], obs[lo + 1 : hi + 1], rtol=1e-5, atol=1e-6)
        mismatches += int((~same.all(axis=1) & inside[lo:hi]).sum())
    return mismatches
