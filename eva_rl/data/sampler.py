"""Random context windows over memory-mapped task datasets, batched with numpy gathers."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from eva_rl.data.format import DatasetError, TrajectoryDataset

logger = logging.getLogger(__name__)

STD_FLOOR = 1e-6
_STATS_CHUNK_ROWS = 1 << 16


def compute_state_stats(
    datasets: Sequence[TrajectoryDataset] | Mapping[str, TrajectoryDataset],
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (floored at 1e-6) of the observations over all transitions, float32.

    Reads the memory maps in chunks and merges per-chunk moments (Chan et al.), so it
    needs little memory and stays accurate in float64.
    """
    datasets = _as_list(datasets)
    _check_same_dims(datasets)
    count, mean, m2 = 0, np.zeros(datasets[0].obs_dim), np.zeros(datasets[0].obs_dim)
    for ds in datasets:
        for lo in range(0, ds.n_transitions, _STATS_CHUNK_ROWS):
            x = np.asarray(ds.observations[lo : lo + _STATS_CHUNK_ROWS], dtype=np.float64)
            n_b, mean_b = len(x), x.mean(axis=0)
            m2_b = ((x - mean_b) ** 2).sum(axis=0)
            delta, total = mean_b - mean, count + n_b
            mean = mean + delta * (n_b / total)
            m2 = m2 + m2_b + delta**2 * (count * n_b / total)
            count = total
    std = np.maximum(np.sqrt(m2 / count), STD_FLOOR)
    return mean.astype(np.float32), std.astype(np.float32)


class WindowSampler:
    """Draws batches of ``context_len``-step windows for Decision Transformer training.

    A window is chosen by drawing a task (``mixing="uniform"``: each task equally often;
    ``"proportional"``: in proportion to its transitions), then one of its transitions
    uniformly as the window's *last* step; the window reaches back ``context_len`` steps
    but not past the episode start, and shorter windows are left-padded (``mask`` False,
    zeros). So episodes are drawn in proportion to their length and every step appears
    as the newest one of a window, exactly like the context at rollout time.

    Returns-to-go are undiscounted sums of the remaining rewards of the episode divided
    by ``reward_scale``, precomputed once per dataset (one float32 per transition); the
    observations stay memory-mapped and only the gathered rows are read.
    """

    def __init__(
        self,
        datasets: Sequence[TrajectoryDataset] | Mapping[str, TrajectoryDataset],
        context_len: int,
        reward_scale: float = 200.0,
        mixing: Literal["uniform", "proportional"] = "uniform",
        state_mean: np.ndarray | None = None,
        state_std: np.ndarray | None = None,
        seed: int = 0,
    ):
        self.datasets = _as_list(datasets)
        _check_same_dims(self.datasets)
        if int(context_len) != context_len or context_len < 1:
            raise ValueError(f"context_len must be a positive integer, got {context_len!r}")
        if not reward_scale > 0:
            raise ValueError(f"reward_scale must be > 0, got {reward_scale!r}")
        if mixing not in ("uniform", "proportional"):
            raise ValueError(f"mixing must be 'uniform' or 'proportional', got {mixing!r}")
        self.context_len = int(context_len)
        self.reward_scale = float(reward_scale)
        self.mixing = mixing
        self.tasks = [ds.task for ds in self.datasets]
        self.obs_dim = self.datasets[0].obs_dim
        self.act_dim = self.datasets[0].act_dim
        self.state_mean, self.state_std = self._normalisation(state_mean, state_std)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

        sizes = np.array([ds.n_transitions for ds in self.datasets], dtype=np.int64)
        self._sizes = sizes
        if mixing == "uniform":
            self.task_probs = np.full(len(sizes), 1.0 / len(sizes))
        else:
            self.task_probs = sizes / sizes.sum()
        # small in-RAM index over all tasks (one float32 RTG per transition, episode offsets);
        # observations and actions stay memory-mapped (plain ndarray views skip memmap overhead)
        self._base = np.concatenate(([0], np.cumsum(sizes)[:-1]))  # first global row per task
        self._starts = np.concatenate(
            [
                np.asarray(ds.episode_offsets[:-1]) + base
                for ds, base in zip(self.datasets, self._base, strict=True)
            ]
        )  # global row where each episode starts, sorted
        self._rtg = np.concatenate(
            [
                _returns_to_go(ds.rewards, ds.episode_offsets, self.reward_scale)
                for ds in self.datasets
            ]
        )
        self._obs = [np.asarray(ds.observations) for ds in self.datasets]
        self._act = [np.asarray(ds.actions) for ds in self.datasets]
        self._rew = [np.asarray(ds.rewards) for ds in self.datasets]
        logger.debug(
            "WindowSampler: %d tasks, %d transitions, context %d, %s mixing",
            len(sizes),
            int(sizes.sum()),
            self.context_len,
            mixing,
        )

    def _normalisation(self, mean, std) -> tuple[np.ndarray, np.ndarray]:
        mean = np.zeros(self.obs_dim) if mean is None else np.asarray(mean)
        std = np.ones(self.obs_dim) if std is None else np.asarray(std)
        for name, v in (("state_mean", mean), ("state_std", std)):
            if v.shape != (self.obs_dim,):
                raise ValueError(f"{name} has shape {v.shape}, expected ({self.obs_dim},)")
            if not np.isfinite(v).all():
                raise ValueError(f"{name} holds NaN or inf")
        if (std <= 0).any():
            raise ValueError("state_std must be > 0 everywhere")
        return mean.astype(np.float32), std.astype(np.float32)

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of windows: arrays keyed as in docs/CONTRACTS.md (``mask`` True = real)."""
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        B, K = int(batch_size), self.context_len
        task_index = self.rng.choice(len(self.datasets), size=B, p=self.task_probs)
        last = self.rng.integers(0, self._sizes[task_index])  # window's last row in its task
        g_last = self._base[task_index] + last  # (B,) global rows
        start = self._starts[np.searchsorted(self._starts, g_last, side="right") - 1]
        rows = g_last[:, None] - np.arange(K - 1, -1, -1)[None, :]  # (B, K)
        mask = rows >= start[:, None]  # False = left padding before the episode start
        rows = np.maximum(rows, start[:, None])  # padded slots read a valid row, zeroed below
        pad = ~mask

        # group the batch by task: one gather per task present, never one per sample, into
        # task-sorted buffers (slice writes) that one final permutation puts back in order
        order = np.argsort(task_index, kind="stable")
        bounds = np.concatenate(([0], np.cumsum(np.bincount(task_index, minlength=len(self._obs)))))
        local = (rows - self._base[task_index][:, None])[order]
        states = np.empty((B, K, self.obs_dim), np.float32)
        actions = np.empty((B, K, self.act_dim), np.float32)
        rewards = np.empty((B, K), np.float32)
        for t in np.flatnonzero(bounds[1:] > bounds[:-1]):
            lo, hi = bounds[t], bounds[t + 1]
            states[lo:hi] = self._obs[t][local[lo:hi]]
            actions[lo:hi] = self._act[t][local[lo:hi]]
            rewards[lo:hi] = self._rew[t][local[lo:hi]]
        inverse = np.empty(B, np.int64)
        inverse[order] = np.arange(B)
        states, actions, rewards = states[inverse], actions[inverse], rewards[inverse]
        states -= self.state_mean
        states /= self.state_std
        states[pad] = 0.0
        actions[pad] = 0.0
        rewards[pad] = 0.0
        rtg = self._rtg[rows]
        rtg[pad] = 0.0
        timesteps = rows - start[:, None]
        timesteps[pad] = 0
        return {
            "states": states,
            "actions": actions,
            "rewards": rewards[..., None],
            "returns_to_go": rtg[..., None],
            "timesteps": timesteps,
            "mask": mask,
            "task_index": task_index.astype(np.int64),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the RNG plus what identifies the data it was drawing from."""
        return {
            "rng": self.rng.bit_generator.state,
            "context_len": self.context_len,
            "mixing": self.mixing,
            "reward_scale": self.reward_scale,
            "tasks": list(self.tasks),
            "n_transitions": self._sizes.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the RNG so the next batches equal those of the run that saved ``state``."""
        mine = self.state_dict()
        for key in ("context_len", "mixing", "reward_scale", "tasks", "n_transitions"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r}, this sampler has "
                    f"{mine[key]!r}; resuming would draw different batches"
                )
        if "rng" not in state:
            raise ValueError("sampler state has no 'rng' entry")
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = dict(state["rng"])
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"sampler state holds an unusable rng state: {err}") from err
        if type(rng.bit_generator).__name__ != state["rng"].get("bit_generator"):
            raise ValueError(f"sampler rng state is for {state['rng'].get('bit_generator')!r}")
        self.rng = rng


def _returns_to_go(rewards: np.ndarray, offsets: np.ndarray, scale: float) -> np.ndarray:
    """(N,) float32: reward sum from each row to its episode's end, divided by ``scale``."""
    r = np.asarray(rewards, dtype=np.float64)
    csum = np.concatenate(([0.0], np.cumsum(r)))  # csum[i] = sum of r[:i]
    ends = np.repeat(offsets[1:], np.diff(offsets))  # episode end row (exclusive) per row
    return ((csum[ends] - csum[:-1]) / scale).astype(np.float32)


def _as_list(datasets) -> list[TrajectoryDataset]:
    items = list(datasets.values()) if isinstance(datasets, Mapping) else list(datasets)
    if not items:
        raise ValueError("need at least one dataset")
    for ds in items:
        if not isinstance(ds, TrajectoryDataset):
            raise TypeError(f"expected TrajectoryDataset, got {type(ds).__name__}")
    return items


def _check_same_dims(datasets: Sequence[TrajectoryDataset]) -> None:
    first = datasets[0]
    for ds in datasets[1:]:
        if (ds.obs_dim, ds.act_dim) != (first.obs_dim, first.act_dim):
            raise DatasetError(
                f"{ds.path}: obs/act dims ({ds.obs_dim}, {ds.act_dim}) differ from "
                f"{first.path}: ({first.obs_dim}, {first.act_dim})"
            )
