"""WindowSampler and compute_state_stats on small datasets written to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eva_rl.data import (
    DatasetError,
    WindowSampler,
    compute_state_stats,
    open_dataset,
    write_dataset,
)

OBS_DIM, ACT_DIM = 5, 2


def _write(path, task, lengths, seed):
    """Observations encode (global row, step in episode, episode) so windows can be checked."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    episode = np.repeat(np.arange(len(lengths)), lengths)
    step = np.arange(n) - offsets[episode]
    obs = rng.normal(size=(n, OBS_DIM))
    obs[:, 0], obs[:, 1], obs[:, 2] = np.arange(n), step, episode
    return write_dataset(
        path / task,
        task=task,
        observations=obs,
        actions=rng.uniform(-1, 1, size=(n, ACT_DIM)),
        rewards=rng.uniform(0, 10, size=n),
        successes=np.zeros(n, bool),
        episode_offsets=offsets,
        metadata={},
    )


@pytest.fixture
def datasets(tmp_path):
    return [
        _write(tmp_path, "a", [30, 3, 12], seed=0),
        _write(tmp_path, "b", [25, 50, 25, 50, 25], seed=1),
    ]


def _row_of(batch):
    """The dataset row behind each real slot (column 0 of the raw observation)."""
    return np.rint(batch["states"][..., 0]).astype(np.int64)


def test_shapes_and_dtypes(datasets):
    s = WindowSampler(datasets, context_len=8)
    b = s.sample(16)
    expected = {
        "states": ((16, 8, OBS_DIM), np.float32),
        "actions": ((16, 8, ACT_DIM), np.float32),
        "rewards": ((16, 8, 1), np.float32),
        "returns_to_go": ((16, 8, 1), np.float32),
        "timesteps": ((16, 8), np.int64),
        "mask": ((16, 8), np.bool_),
        "task_index": ((16,), np.int64),
    }
    assert set(b) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert b[key].shape == shape and b[key].dtype == dtype, key
    assert s.tasks == ["a", "b"] and (s.obs_dim, s.act_dim) == (OBS_DIM, ACT_DIM)
    assert isinstance(s.datasets[0].observations, np.memmap)
    # observations are read through the memory map, not copied at construction
    assert all(np.shares_memory(o, d.observations) for o, d in zip(s._obs, datasets, strict=True))


def test_windows_match_the_data(datasets):
    K, scale = 10, 50.0
    s = WindowSampler(datasets, context_len=K, reward_scale=scale, seed=3)
    b = s.sample(400)
    rows = _row_of(b)
    for i in range(len(rows)):
        ds = datasets[b["task_index"][i]]
        mask = b["mask"][i]
        n_real = int(mask.sum())
        # left padding: padded slots first, then the real steps, contiguous
        assert mask[K - n_real :].all() and not mask[: K - n_real].any()
        real = rows[i, mask]
        np.testing.assert_array_equal(real, np.arange(real[0], real[0] + n_real))
        e = int(np.searchsorted(ds.episode_offsets, real[-1], side="right") - 1)
        lo, hi = int(ds.episode_offsets[e]), int(ds.episode_offsets[e + 1])
        assert lo <= real[0] and real[-1] < hi
        # windows shorter than K only where the episode start cuts them
        assert n_real == min(K, real[-1] - lo + 1)
        np.testing.assert_array_equal(b["timesteps"][i, mask], real - lo)
        np.testing.assert_allclose(b["actions"][i, mask], ds.actions[real])
        np.testing.assert_allclose(b["rewards"][i, mask, 0], ds.rewards[real])
        rtg = [ds.rewards[r:hi].astype(np.float64).sum() / scale for r in real]
        np.testing.assert_allclose(b["returns_to_go"][i, mask, 0], rtg, rtol=1e-5, atol=1e-6)
        for key in ("states", "actions", "rewards", "returns_to_go", "timesteps"):
            assert not b[key][i, ~mask].any(), key
    assert (~b["mask"]).any() and b["mask"].all(axis=1).any()  # both kinds were drawn


def test_every_step_can_end_a_window(datasets):
    s = WindowSampler(datasets[:1], context_len=4, seed=0)
    b = s.sample(3000)
    last = _row_of(b)[:, -1]
    assert set(last.tolist()) == set(range(datasets[0].n_transitions))


def test_state_normalisation(datasets):
    mean, std = compute_state_stats(datasets)
    all_obs = np.concatenate([np.asarray(d.observations, np.float64) for d in datasets])
    np.testing.assert_allclose(mean, all_obs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, all_obs.std(0), rtol=1e-5)
    assert mean.dtype == std.dtype == np.float32

    s = WindowSampler(datasets, context_len=6, state_mean=mean, state_std=std, seed=1)
    b = s.sample(64)
    raw = WindowSampler(datasets, context_len=6, seed=1).sample(64)
    m = raw["mask"]
    np.testing.assert_allclose(b["states"][m], (raw["states"][m] - mean) / std, rtol=1e-5)
    assert not b["states"][~m].any()
    with pytest.raises(ValueError, match="state_std has shape"):
        WindowSampler(datasets, context_len=6, state_mean=mean, state_std=std[:3])


def test_state_std_floor(tmp_path):
    ds = write_dataset(
        tmp_path / "c",
        task="c",
        observations=np.ones((10, 3)),
        actions=np.zeros((10, 1)),
        rewards=np.zeros(10),
        successes=np.zeros(10, bool),
        episode_offsets=[0, 10],
        metadata={},
    )
    mean, std = compute_state_stats([ds])
    np.testing.assert_allclose(mean, 1.0)
    np.testing.assert_array_equal(std, np.float32(1e-6))


@pytest.mark.parametrize(("mixing", "p_b"), [("uniform", 0.5), ("proportional", 175 / 220)])
def test_mixing_proportions(datasets, mixing, p_b):
    n = 20000
    b = WindowSampler(datasets, context_len=2, mixing=mixing, seed=7).sample(n)
    frac = b["task_index"].mean()
    assert abs(frac - p_b) < 4 * np.sqrt(p_b * (1 - p_b) / n)


def test_seeded_reproducible(datasets):
    b1 = WindowSampler(datasets, context_len=5, seed=11).sample(32)
    b2 = WindowSampler(datasets, context_len=5, seed=11).sample(32)
    b3 = WindowSampler(datasets, context_len=5, seed=12).sample(32)
    for key in b1:
        np.testing.assert_array_equal(b1[key], b2[key])
    assert not np.array_equal(b1["states"], b3["states"])


def test_state_dict_round_trip(datasets, tmp_path):
    s = WindowSampler(datasets, context_len=5, mixing="proportional", seed=4)
    s.sample(8)
    state = json.loads(json.dumps(s.state_dict()))  # JSON-able
    expected = [s.sample(8) for _ in range(3)]
    # a fresh sampler over freshly opened datasets (as in a resumed run)
    reopened = [open_dataset(d.path) for d in datasets]
    r = WindowSampler(reopened, context_len=5, mixing="proportional", seed=999)
    r.load_state_dict(state)
    for want in expected:
        got = r.sample(8)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])

    with pytest.raises(ValueError, match="context_len"):
        WindowSampler(datasets, context_len=6, mixing="proportional").load_state_dict(state)
    with pytest.raises(ValueError, match="n_transitions"):
        WindowSampler(datasets[::-1], context_len=5, mixing="proportional").load_state_dict(
            {**state, "tasks": ["b", "a"]}
        )
    with pytest.raises(ValueError, match="rng"):
        s.load_state_dict({"context_len": 5})


def test_bad_arguments(datasets, tmp_path):
    with pytest.raises(ValueError, match="mixing"):
        WindowSampler(datasets, context_len=4, mixing="weighted")
    with pytest.raises(ValueError, match="context_len"):
        WindowSampler(datasets, context_len=0)
    with pytest.raises(ValueError, match="reward_scale"):
        WindowSampler(datasets, context_len=4, reward_scale=0)
    with pytest.raises(ValueError, match="at least one"):
        WindowSampler([], context_len=4)
    with pytest.raises(ValueError, match="batch_size"):
        WindowSampler(datasets, context_len=4).sample(0)
    other = write_dataset(
        tmp_path / "wide",
        task="wide",
        observations=np.zeros((4, OBS_DIM + 1)),
        actions=np.zeros((4, ACT_DIM)),
        rewards=np.zeros(4),
        successes=np.zeros(4, bool),
        episode_offsets=[0, 4],
        metadata={},
    )
    with pytest.raises(DatasetError, match="wide.*differ"):
        WindowSampler([*datasets, other], context_len=4)


def test_accepts_mapping(datasets):
    s = WindowSampler({d.task: d for d in datasets}, context_len=3)
    assert s.tasks == ["a", "b"]
    mean, _ = compute_state_stats({d.task: d for d in datasets})
    assert mean.shape == (OBS_DIM,)
