"""envs/: suites, name resolution, seeding, success flags, vector envs (real Meta-World)."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.policies import ENV_POLICY_MAP

import envs
from envs import (
    CW10,
    CW20,
    MT40,
    MT50,
    SUITES,
    final_step_infos,
    make_env,
    make_vec_env,
    resolve_task,
    resolve_tasks,
)


def test_suites_are_the_benchmark_sets():
    assert len(CW10) == 10 and CW10[0] == "hammer-v3" and CW10[-1] == "peg-unplug-side-v3"
    assert CW20 == CW10 + CW10
    assert set(MT50) == set(ALL_V3_ENVIRONMENTS) and len(MT50) == 50
    assert set(MT40) == set(MT50) - set(CW10) and len(MT40) == 40
    assert SUITES == {"CW10": CW10, "CW20": CW20, "MT40": MT40, "MT50": MT50}
    assert envs.make_env is make_env


@pytest.mark.parametrize(
    "name", ["hammer", "hammer-v1", "hammer-v2", "hammer-v3", " Hammer-V2 ", "HAMMER"]
)
def test_resolve_task_versions(name):
    assert resolve_task(name) == "hammer-v3"


def test_resolve_task_underscores_and_long_names():
    assert resolve_task("peg_unplug_side-v2") == "peg-unplug-side-v3"
    assert resolve_task("button-press-topdown-wall") == "button-press-topdown-wall-v3"


@pytest.mark.parametrize(
    ("bad", "hint"), [("hamer", "hammer"), ("push-wal-v2", "push-wall"), ("hammer-v9", "hammer")]
)
def test_resolve_task_unknown_names_the_closest(bad, hint):
    with pytest.raises(ValueError, match="closest valid names") as err:
        resolve_task(bad)
    assert hint in str(err.value) and repr(bad) in str(err.value)


def test_resolve_tasks_suites_lists_and_order():
    assert resolve_tasks("CW10") == CW10
    assert resolve_tasks("cw20") == CW20  # a suite keeps its repeats
    assert resolve_tasks("reach, push-v2") == ("reach-v3", "push-v3")
    assert resolve_tasks(["push", "CW10"]) == ("push-v3",) + CW10
    assert resolve_tasks(["reach", "reach-v2,hammer"]) == ("reach-v3", "hammer-v3")
    with pytest.raises(ValueError, match="CW10"):
        resolve_tasks("CW11")
    with pytest.raises(ValueError, match="no tasks"):
        resolve_tasks(" , ")


@pytest.fixture(scope="module")
def reach_env():
    env = make_env("reach", seed=0)
    yield env
    env.close()


def _run(env, actions, seed=None):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    rewards = []
    for a in actions:
        obs, r, *_ = env.step(a)
        out.append(obs)
        rewards.append(r)
    return np.array(out), np.array(rewards)


ACTIONS = np.random.default_rng(0).uniform(-1, 1, (15, 4)).astype(np.float32)


def test_spaces_and_dtypes(reach_env):
    obs, info = reach_env.reset(seed=1)
    assert obs.dtype == np.float32 and obs.shape == (39,)
    assert reach_env.observation_space.dtype == np.float32
    assert reach_env.observation_space.contains(obs)
    space = reach_env.action_space
    assert space.dtype == np.float32 and space.shape == (4,)
    assert (space.low == -1).all() and (space.high == 1).all()
    obs, reward, terminated, truncated, info = reach_env.step(ACTIONS[0])
    assert obs.dtype == np.float32 and reach_env.observation_space.contains(obs)
    assert isinstance(reward, float) and terminated is False and truncated is False


def test_same_seed_same_goal_and_trajectory():
    a, b = make_env("push", seed=7), make_env("push-v2", seed=7)
    obs_a, rew_a = _run(a, ACTIONS)
    obs_b, rew_b = _run(b, ACTIONS)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    # the stream continues identically: the second episodes match too, with a new goal
    obs_a2, _ = _run(a, ACTIONS)
    obs_b2, _ = _run(b, ACTIONS)
    np.testing.assert_array_equal(obs_a2, obs_b2)
    assert not np.array_equal(obs_a[0, 36:], obs_a2[0, 36:])


def test_different_seeds_differ():
    first = [make_env("push", seed=s).reset()[0] for s in (0, 1)]
    assert not np.allclose(first[0][36:], first[1][36:])  # goal
    assert not np.allclose(first[0][4:7], first[1][4:7])  # object position


def test_reset_seed_reseeds(reach_env):
    fresh_obs, fresh_rew = _run(make_env("reach", seed=11), ACTIONS)
    for _ in range(2):  # whatever ran before, reset(seed=11) restarts seed 11's stream
        obs, rew = _run(reach_env, ACTIONS, seed=11)
        np.testing.assert_array_equal(obs, fresh_obs)
        np.testing.assert_array_equal(rew, fresh_rew)
    after, _ = reach_env.reset()
    assert not np.array_equal(after[36:], fresh_obs[0, 36:])


def test_gymnasium_checkers_pass_without_step_warnings(reach_env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the full checker's one advisory about unbounded object coordinates is expected
        warnings.filterwarnings("ignore", message=".*infinity.*")
        warnings.filterwarnings("ignore", message=".*different from the unwrapped.*")
        check_env(reach_env, skip_render_check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checked = gym.wrappers.PassiveEnvChecker(make_env("hammer", seed=0))
        checked.reset(seed=0)
        for a in ACTIONS:
            checked.step(a)


def test_horizon_truncates():
    env = make_env("reach", seed=0, max_episode_steps=7)
    env.reset()
    flags = [env.step(ACTIONS[i])[3] for i in range(7)]
    assert flags == [False] * 6 + [True]
    env = make_env("reach", seed=0)
    env.reset()
    steps = 0
    while True:
        steps += 1
        _, _, terminated, truncated, _ = env.step(np.zeros(4, np.float32))
        if terminated or truncated:
            break
    assert steps == 200 and truncated


def _expert_episode(env, steps, task="reach-v3"):
    policy = ENV_POLICY_MAP[task]()
    obs, _ = env.reset()
    infos = []
    for _ in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            action = np.clip(policy.get_action(obs), -1, 1)
        obs, _, terminated, truncated, info = env.step(action)
        infos.append((info, terminated))
        if terminated or truncated:
            break
    return infos


def test_success_flags(reach_env):
    reach_env.reset(seed=3)
    infos = _expert_episode(reach_env, 120)
    success = [i["success"] for i, _ in infos]
    is_success = [i["is_success"] for i, _ in infos]
    assert all(type(s) is bool for s in success + is_success)
    assert any(success), "the scripted reach expert should succeed within 120 steps"
    assert is_success == list(np.logical_or.accumulate(success))
    assert not success[0]


def test_terminate_on_success():
    env = make_env("reach", seed=3, terminate_on_success=True)
    infos = _expert_episode(env, 200)
    info, terminated = infos[-1]
    assert terminated and info["success"] and len(infos) < 200
    assert not any(i["success"] for i, _ in infos[:-1])


def test_bad_arguments():
    with pytest.raises(TypeError, match="unknown keyword"):
        make_env("reach", colour="red")
    with pytest.raises(ValueError, match="max_episode_steps"):
        make_env("reach", max_episode_steps=0)
    with pytest.raises(ValueError, match="closest"):
        make_env("rech-v3")


def test_vec_env_layout_and_seeds():
    vec = make_vec_env(["reach", "push-v2"], n_envs=2, seed=5)
    assert vec.num_envs == 4
    obs, _ = vec.reset()
    assert obs.shape == (4, 39) and obs.dtype == np.float32
    for i, task in enumerate(["reach", "reach", "push", "push"]):
        np.testing.assert_array_equal(obs[i], make_env(task, seed=5 + i).reset()[0])
    vec.close()


@pytest.mark.parametrize(
    "mode", [gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP]
)
def test_vec_env_success_counting_in_both_autoreset_modes(mode):
    horizon = 100
    vec = make_vec_env("reach", n_envs=2, seed=0, max_episode_steps=horizon, autoreset_mode=mode)
    policy = ENV_POLICY_MAP["reach-v3"]()
    obs, _ = vec.reset()
    results = []
    for _ in range(horizon):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            action = np.stack([np.clip(policy.get_action(o), -1, 1) for o in obs])
        obs, _, terminated, truncated, infos = vec.step(action.astype(np.float32))
        ended = terminated | truncated
        results += [info["is_success"] for info in final_step_infos(infos, ended).values()]
    vec.close()
    assert results == [True, True]  # both episodes ended, both counted as successes


def test_async_vec_env_matches_sync():
    sync = make_vec_env("reach", n_envs=2, seed=2)
    asyn = make_vec_env("reach", n_envs=2, seed=2, asynchronous=True)
    try:
        np.testing.assert_array_equal(sync.reset()[0], asyn.reset()[0])
        action = np.tile(ACTIONS[:1], (2, 1))
        np.testing.assert_array_equal(sync.step(action)[0], asyn.step(action)[0])
    finally:
        sync.close()
        asyn.close()
