"""On-disk trajectory format: one ``.npy`` per field plus ``manifest.json`` per task.

Layout of a dataset directory (one task)::

    <path>/observations.npy      (N, obs_dim) float32
    <path>/actions.npy           (N, act_dim) float32
    <path>/rewards.npy           (N,) float32
    <path>/successes.npy         (N,) bool      info["success"] at each step
    <path>/episode_offsets.npy   (E + 1,) int64  episode e is rows offsets[e]:offsets[e+1]
    <path>/manifest.json         format version, task, counts, return statistics, metadata

Arrays are memory-mapped on open (``allow_pickle=False``) and validated. Writing goes to a
sibling temporary directory ``.<name>.tmp-<pid>-<hex>`` that is fsynced and renamed into
place, and ``manifest.json`` is the last file written, so a directory at ``path`` is a
complete dataset exactly when :func:`is_complete_dataset` says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.io import (
    OLD_MARKER,
    TMP_MARKER,
    fsync_dir,
    read_versioned_json,
    replace_dir,
    temp_sibling,
    write_synced,
)

logger = logging.getLogger(__name__)

FORMAT_NAME = "eva-rl-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# field -> (dtype, ndim)
FIELDS: dict[str, tuple[np.dtype, int]] = {
    "observations": (np.dtype(np.float32), 2),
    "actions": (np.dtype(np.float32), 2),
    "rewards": (np.dtype(np.float32), 1),
    "successes": (np.dtype(np.bool_), 1),
    "episode_offsets": (np.dtype(np.int64), 1),
}
_FLOAT_FIELDS = ("observations", "actions", "rewards")
_PER_STEP_FIELDS = ("observations", "actions", "rewards", "successes")
# manifest keys written by this module; caller metadata may not reuse them
RESERVED_KEYS = frozenset(
    {
        "format",
        "format_version",
        "task",
        "n_episodes",
        "n_transitions",
        "obs_dim",
        "act_dim",
        "return_stats",
        "success_rate",
        "episode_length_stats",
    }
)
_FINITE_CHUNK_BYTES = 1 << 24  # 16 MiB per finiteness check keeps memory flat


class DatasetError(ValueError):
    """A dataset on disk (or about to be written) is missing, corrupt or inconsistent."""


class TrajectoryDataset:
    """One task's trajectories, memory-mapped; built by :func:`open_dataset`."""

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: Mapping[str, np.ndarray]):
        self.path = Path(path)
        self.manifest = manifest
        self.task: str = manifest["task"]
        self.observations: np.ndarray = arrays["observations"]
        self.actions: np.ndarray = arrays["actions"]
        self.rewards: np.ndarray = arrays["rewards"]
        self.successes: np.ndarray = arrays["successes"]
        self.episode_offsets: np.ndarray = arrays["episode_offsets"]
        self._returns: np.ndarray | None = None
        self._episode_success: np.ndarray | None = None

    @property
    def n_episodes(self) -> int:
        return len(self.episode_offsets) - 1

    @property
    def n_transitions(self) -> int:
        return len(self.rewards)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def episode_lengths(self) -> np.ndarray:
        """(E,) int64 number of steps of each episode."""
        return np.diff(self.episode_offsets)

    @property
    def episode_returns(self) -> np.ndarray:
        """(E,) float64 undiscounted return of each episode."""
        if self._returns is None:
            self._returns = _episode_returns(self.rewards, self.episode_offsets)
        return self._returns

    @property
    def episode_success(self) -> np.ndarray:
        """(E,) bool: success at any step of the episode."""
        if self._episode_success is None:
            self._episode_success = np.logical_or.reduceat(
                self.successes, self.episode_offsets[:-1]
            )
        return self._episode_success

    def episode(self, e: int) -> dict[str, np.ndarray]:
        """Arrays of episode ``e`` (views into the memory maps)."""
        if not -self.n_episodes <= e < self.n_episodes:
            raise IndexError(f"episode {e} out of range for {self.n_episodes} episodes")
        e %= self.n_episodes
        lo, hi = int(self.episode_offsets[e]), int(self.episode_offsets[e + 1])
        return {name: getattr(self, name)[lo:hi] for name in _PER_STEP_FIELDS}

    def __len__(self) -> int:
        return self.n_transitions

    def __repr__(self) -> str:
        return (
            f"TrajectoryDataset(task={self.task!r}, episodes={self.n_episodes}, "
            f"transitions={self.n_transitions}, path='{self.path}')"
        )


# ----------------------------------------------------------------------------- reading


def open_dataset(path: str | os.PathLike, check_finite: bool = True) -> TrajectoryDataset:
    """Memory-map and validate the dataset at ``path``.

    Raises :class:`DatasetError` naming the file and the problem for a missing or
    truncated array, wrong dtype or dimensions, disagreeing lengths, bad episode offsets,
    NaN/inf (``check_finite``), an unknown format version or manifest counts, success
    rate or return statistics that disagree with the arrays.
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: no dataset directory here")
    manifest = _read_manifest(path)
    arrays = {name: _load_array(path, name) for name in FIELDS}
    _check_arrays(arrays, where=path)
    _check_manifest_counts(manifest, arrays, path)
    if check_finite:
        for name in _FLOAT_FIELDS:
            _check_finite(arrays[name], f"{path / (name + '.npy')}")
    ds = TrajectoryDataset(path, manifest, arrays)
    _check_manifest_statistics(ds)
    return ds


def open_datasets(
    root: str | os.PathLike, tasks: Iterable[str], check_finite: bool = True
) -> dict[str, TrajectoryDataset]:
    """Open ``root/<task>`` for each task, in order; a missing task raises ``DatasetError``."""
    root = Path(root)
    out: dict[str, TrajectoryDataset] = {}
    for task in tasks:
        task_dir = root / task
        if not is_complete_dataset(task_dir):
            reason = "is missing" if not task_dir.exists() else "is incomplete (no manifest)"
            raise DatasetError(f"{task_dir}: dataset for task {task!r} {reason}")
        ds = open_dataset(task_dir, check_finite=check_finite)
        if ds.task != task:
            raise DatasetError(f"{task_dir / MANIFEST}: holds task {ds.task!r}, but the "
                               f"directory is {task!r}'s")
        out[task] = ds
    return out


def is_complete_dataset(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a manifest and every array file (a cheap check, no reads).

    Only :func:`write_dataset`'s final rename puts a directory at ``path``, and it writes
    the manifest last, so a directory failing this check was not made by it (or was
    damaged afterwards); :func:`open_dataset` does the full validation.
    """
    path = Path(path)
    return (path / MANIFEST).is_file() and all((path / f"{n}.npy").is_file() for n in FIELDS)


def temp_dirs(path: str | os.PathLike) -> list[Path]:
    """Leftover temporary/old sibling directories of the dataset ``path`` (from a crash)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefixes = (f".{path.name}{TMP_MARKER}", f".{path.name}{OLD_MARKER}")
    return sorted(p for p in path.parent.iterdir() if p.is_dir() and p.name.startswith(prefixes))


def remove_temp_dirs(path: str | os.PathLike) -> list[Path]:
    """Delete :func:`temp_dirs` of ``path``; returns what was removed.

    If ``path`` itself is gone and a complete previous dataset was left under an ``.old-``
    name (a crash in the middle of an ``overwrite=True`` write), that one is renamed back
    to ``path`` rather than deleted. Call it only when no other process writes ``path``.
    """
    path = Path(path)
    leftovers = temp_dirs(path)
    if not path.exists():
        for p in leftovers:
            if p.name.startswith(f".{path.name}{OLD_MARKER}") and is_complete_dataset(p):
                os.rename(p, path)
                leftovers.remove(p)
                logger.warning("restored previous dataset %s from %s", path, p.name)
                break
    for p in leftovers:
        shutil.rmtree(p)
        logger.info("removed leftover temporary dataset directory %s", p)
    return leftovers


# ----------------------------------------------------------------------------- writing


def write_dataset(
    path: str | os.PathLike,
    *,
    task: str,
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    successes: np.ndarray,
    episode_offsets: np.ndarray,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> TrajectoryDataset:
    """Validate and write a dataset atomically; returns it opened from disk.

    The arrays go into a sibling temporary directory, are fsynced, and the directory is
    renamed to ``path``. An existing dataset is refused unless ``overwrite=True``, which
    moves it aside, renames the new one in and only then deletes the old one.
    ``metadata`` (collector, noise, seed, package versions, ...) is stored in the manifest
    next to the counts and return statistics; it must be JSON-serialisable.
    """
    path = Path(path)
    _check_replaceable(path, overwrite)
    if not isinstance(task, str) or not task:
        raise DatasetError(f"{path}: task must be a non-empty string, got {task!r}")
    arrays = {
        "observations": _as_array(observations, np.float32, "observations", path),
        "actions": _as_array(actions, np.float32, "actions", path),
        "rewards": _as_array(rewards, np.float32, "rewards", path),
        "successes": _as_array(successes, np.bool_, "successes", path),
        "episode_offsets": _as_array(episode_offsets, np.int64, "episode_offsets", path),
    }
    _check_arrays(arrays, where=path)
    for name in _FLOAT_FIELDS:
        _check_finite(arrays[name], f"{name} (to be written to {path})")
    manifest = _build_manifest(task, arrays, metadata or {}, path)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.mkdir()
    try:
        for name, arr in arrays.items():
            _write_file(tmp / f"{name}.npy", lambda f, a=arr: np.save(f, a, allow_pickle=False))
        text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
        _write_file(tmp / MANIFEST, lambda f: f.write(text.encode()))
        fsync_dir(tmp)
        if path.exists():
            _check_replaceable(path, overwrite)  # it may have appeared while we were writing
        # a crash between replace_dir's two renames leaves the old dataset intact under an
        # .old- name, where remove_temp_dirs finds and restores it
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s: %d episodes, %d transitions", path, *_counts(arrays))
    return open_dataset(path, check_finite=False)


def _check_replaceable(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    # overwrite replaces datasets (complete or damaged) and empty directories, nothing else
    if not path.is_dir() or not ((path / MANIFEST).exists() or not any(path.iterdir())):
        raise FileExistsError(f"{path}: exists and is not a dataset; refusing to replace it")


_write_file = write_synced  # a module attribute, so tests can make writes fail


def _build_manifest(
    task: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any], path: Path
) -> dict[str, Any]:
    clash = sorted(RESERVED_KEYS.intersection(metadata))
    if clash:
        raise DatasetError(f"{path}: metadata keys {clash} are reserved for the manifest")
    n_episodes, n_transitions = _counts(arrays)
    returns = _episode_returns(arrays["rewards"], arrays["episode_offsets"])
    lengths = np.diff(arrays["episode_offsets"])
    success = np.logical_or.reduceat(arrays["successes"], arrays["episode_offsets"][:-1])
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "task": task,
        "n_episodes": n_episodes,
        "n_transitions": n_transitions,
        "obs_dim": int(arrays["observations"].shape[1]),
        "act_dim": int(arrays["actions"].shape[1]),
        "return_stats": {
            "mean": float(returns.mean()),
            "std": float(returns.std()),
            "min": float(returns.min()),
            "max": float(returns.max()),
        },
        "success_rate": float(success.mean()),
        "episode_length_stats": {
            "mean": float(lengths.mean()),
            "min": int(lengths.min()),
            "max": int(lengths.max()),
        },
    }
    try:
        extra = json.loads(json.dumps(dict(metadata), default=_json_default))
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{path}: metadata is not JSON-serialisable: {err}") from err
    manifest.update(extra)
    return manifest


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


# ----------------------------------------------------------------------------- checks


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    manifest = read_versioned_json(
        file,
        FORMAT_NAME,
        FORMAT_VERSION,
        "dataset manifest",
        version_key="format_version",
        error_cls=DatasetError,
    )
    for key in ("task", "n_episodes", "n_transitions", "obs_dim", "act_dim"):
        if key not in manifest:
            raise DatasetError(f"{file}: manifest has no {key!r}")
    return manifest


def _load_array(path: Path, name: str) -> np.ndarray:
    file = path / f"{name}.npy"
    if not file.is_file():
        raise DatasetError(f"{file}: array file is missing")
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        size = file.stat().st_size
        raise DatasetError(f"{file}: unreadable or truncated ({size} bytes): {err}") from err
    if not isinstance(arr, np.ndarray):
        raise DatasetError(f"{file}: not a single .npy array")
    return arr


def _as_array(value: Any, dtype: type, name: str, path: Path) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object:
        raise DatasetError(f"{path}: {name} has dtype object (ragged or non-numeric input)")
    if dtype is np.bool_ and arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise DatasetError(f"{path}: {name} must hold booleans (0/1)")
    elif dtype is np.int64 and arr.dtype.kind not in "iu":
        raise DatasetError(f"{path}: {name} must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _check_arrays(arrays: Mapping[str, np.ndarray], where: Path) -> None:
    """Dtypes, dimensions, equal lengths and episode offsets."""

    def fname(name: str) -> Path:
        return where / f"{name}.npy"

    for name, (dtype, ndim) in FIELDS.items():
        arr = arrays[name]
        if arr.ndim != ndim:
            raise DatasetError(
                f"{fname(name)}: wrong dimensions: expected {ndim}-d, got shape {arr.shape}"
            )
        if arr.dtype != dtype:
            raise DatasetError(f"{fname(name)}: wrong dtype: expected {dtype}, got {arr.dtype}")
    n = len(arrays["rewards"])
    for name in _PER_STEP_FIELDS:
        if len(arrays[name]) != n:
            raise DatasetError(
                f"{fname(name)}: length {len(arrays[name])} disagrees with rewards.npy length {n}"
            )
    for name in ("observations", "actions"):
        if arrays[name].shape[1] == 0:
            raise DatasetError(f"{fname(name)}: feature dimension is 0")
    offsets = arrays["episode_offsets"]
    off = fname("episode_offsets")
    if len(offsets) < 2:
        raise DatasetError(f"{off}: needs at least 2 entries (one episode), got {len(offsets)}")
    if offsets[0] != 0:
        raise DatasetError(f"{off}: must start at 0, got {offsets[0]}")
    if offsets[-1] != n:
        raise DatasetError(f"{off}: must end at the {n} transitions, got {offsets[-1]}")
    steps = np.diff(offsets)
    if (steps <= 0).any():
        e = int(np.argmax(steps <= 0))
        raise DatasetError(
            f"{off}: not strictly increasing (episode {e}: {offsets[e]} -> {offsets[e + 1]})"
        )


def _check_manifest_counts(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], path):
    got = {
        "n_episodes": len(arrays["episode_offsets"]) - 1,
        "n_transitions": len(arrays["rewards"]),
        "obs_dim": arrays["observations"].shape[1],
        "act_dim": arrays["actions"].shape[1],
    }
    for key, value in got.items():
        if manifest[key] != value:
            raise DatasetError(
                f"{path / MANIFEST}: {key} is {manifest[key]} but the arrays hold {value}"
            )


def _check_manifest_statistics(ds: TrajectoryDataset) -> None:
    """The manifest's success rate and return statistics are the arrays' (one pass over
    the rewards and successes; the results are kept on ``ds`` for later use)."""
    file = ds.path / MANIFEST
    m = ds.manifest
    if not isinstance(m["task"], str) or not m["task"]:
        raise DatasetError(f"{file}: task must be a non-empty string, got {m['task']!r}")
    returns = ds.episode_returns
    got = {"success_rate": float(ds.episode_success.mean())}
    got.update({f"return_stats.{k}": v for k, v in (
        ("mean", float(returns.mean())), ("std", float(returns.std())),
        ("min", float(returns.min())), ("max", float(returns.max())))})
    stats = m.get("return_stats")
    for key, value in got.items():
        if key.startswith("return_stats."):
            saved = stats.get(key.split(".")[1]) if isinstance(stats, Mapping) else None
        else:
            saved = m.get(key)
        if not isinstance(saved, (int, float)) or isinstance(saved, bool) or not np.isclose(
                saved, value, rtol=1e-6, atol=1e-6):
            raise DatasetError(f"{file}: {key} is {saved!r} but the arrays give {value:.6g}")


def _check_finite(arr: np.ndarray, what: str) -> None:
    """Raise if ``arr`` holds NaN/inf; reads in chunks so memory stays flat on big maps."""
    row_bytes = max(1, arr.itemsize * (arr.size // max(1, len(arr))))
    chunk = max(1, _FINITE_CHUNK_BYTES // row_bytes)
    for lo in range(0, len(arr), chunk):
        part = arr[lo : lo + chunk]
        # min/max propagate NaN and expose inf without allocating a boolean array
        if np.isfinite(part.min()) and np.isfinite(part.max()):
            continue
        bad = ~np.isfinite(part)
        if bad.ndim > 1:
            bad = bad.any(axis=tuple(range(1, bad.ndim)))
        row = lo + int(np.argmax(bad))
        raise DatasetError(f"{what}: non-finite value (NaN or inf) at row {row}")


def _counts(arrays: Mapping[str, np.ndarray]) -> tuple[int, int]:
    return len(arrays["episode_offsets"]) - 1, len(arrays["rewards"])


def _episode_returns(rewards: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.add.reduceat(np.asarray(rewards, dtype=np.float64), offsets[:-1])
