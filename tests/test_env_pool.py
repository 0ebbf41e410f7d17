"""envs.pool: reseeded envs replay fresh ones; the pool is bounded and closes what it drops."""

from functools import partial

import gymnasium as gym
import numpy as np
import pytest

from envs import EnvPool, default_pool, make_env

HORIZON = 12


def rollout(venv: gym.vector.VectorEnv, seed: int) -> np.ndarray:
    """Every env's observations and rewards over one episode of seeded random actions."""
    rng = np.random.default_rng(seed)
    obs, _ = venv.reset()
    rows = [obs]
    for _ in range(HORIZON):
        action = rng.uniform(-1, 1, size=(venv.num_envs, 4)).astype(np.float32)
        obs, reward, _, _, _ = venv.step(action)
        rows += [obs, reward[:, None]]
    return np.concatenate(rows, axis=1)


def fresh(tasks, seeds) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv(
        [partial(make_env, t, seed=s, max_episode_steps=HORIZON)
         for t, s in zip(tasks, seeds, strict=True)]
    )


def test_reused_envs_replay_fresh_envs():
    pool = EnvPool(max_envs=4)
    loans = [(["reach", "push"], [5, 6]), (["push", "reach"], [40, 3]),
             (["reach", "reach"], [6, 5]), (["push", "reach-v2"], [5, 6])]
    for tasks, seeds in loans:
        with pool.vector_env(tasks, seeds, HORIZON) as venv:
            pooled = rollout(venv, seeds[0])
        ref = fresh(tasks, seeds)
        np.testing.assert_array_equal(pooled, rollout(ref, seeds[0]))
        ref.close()
    assert (pool.created, pool.reused) == (3, 5)  # reach twice at once in the third loan
    assert len(pool) == 3


def test_pool_is_bounded_least_recently_used_first():
    pool = EnvPool(max_envs=2)
    with pool.vector_env(["reach", "reach"], [0, 1], HORIZON):
        pass
    with pool.vector_env(["push"], [0], HORIZON) as venv:
        kept_push = venv.envs[0]
    assert len(pool) == 2  # one reach env closed to make room for push
    with pool.vector_env(["push", "reach"], [1, 2], HORIZON) as venv:
        assert venv.envs[0] is kept_push
    assert (pool.created, pool.reused) == (3, 2)
    # another horizon is another env (Meta-World's own horizon is fixed at build)
    with pool.vector_env(["push"], [1], HORIZON + 1) as venv:
        assert venv.envs[0] is not kept_push
    assert pool.created == 4 and len(pool) == 2
    pool.close()
    assert len(pool) == 0


def test_pool_of_zero_keeps_nothing_and_errors_close_the_loan():
    none = EnvPool(max_envs=0)
    with none.vector_env(["reach"], [0], HORIZON):
        pass
    with none.vector_env(["reach"], [0], HORIZON):
        pass
    assert (none.created, none.reused, len(none)) == (2, 0, 0)
    pool = EnvPool(max_envs=4)
    with pytest.raises(RuntimeError, match="boom"), pool.vector_env(["reach"], [0], HORIZON):
        raise RuntimeError("boom")
    assert len(pool) == 0  # an env left mid-failure is not lent again


def test_pool_rejects_bad_input():
    with pytest.raises(ValueError, match="max_envs must be >= 0"):
        EnvPool(max_envs=-1)
    pool = EnvPool()
    with pytest.raises(ValueError, match="2 tasks but 1 seeds"), \
            pool.vector_env(["reach", "push"], [0], HORIZON):
        pass
    with pytest.raises(ValueError, match="closest valid names"), \
            pool.vector_env(["rech"], [0], HORIZON):
        pass
    assert default_pool() is default_pool()
