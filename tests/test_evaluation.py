"""Batched evaluation on real envs and the rollout context behind it."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.dt_agent import DTAgent
from agents.evaluation import evaluate, run_episodes
from agents.routed_agent import RoutedAgent
from agents.routing import RouterConfig
from envs import EnvPool, make_env, make_vec_env, resolve_task
from eva_rl.adapters import AdapterConfig, active_adapter, add_adapter
from eva_rl.models import DecisionTransformer, DTConfig
from eva_rl.models.inference import RolloutContext

TASKS = ("hammer-v3", "push-wall-v3")
STEPS = 15
# Pushing forward and down closes the drawer within ~20 steps from any start (measured).
SOLVED_TASK, SOLVING_ACTION, SOLVE_STEPS = "drawer-close-v3", [0.0, 0.5, -0.9, 0.0], 40


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_agent(seed: int = 0, **overrides) -> DTAgent:
    torch.manual_seed(seed)
    model = DecisionTransformer(DTConfig.preset("tiny", max_ep_len=64, **overrides))
    # statistics of the right shape that make the normalised states O(1)
    mean, std = np.zeros(39), np.full(39, 0.5)
    return DTAgent(model, mean, std, {"hammer": 600.0, "push-wall": 300.0}, device="cpu")


def direct_loop(agent: DTAgent, tasks, n_episodes: int, seed: int, steps: int) -> dict:
    """The one-episode-at-a-time loop of the reference ports, for env seeds seed + i."""
    out = {}
    for k, task in enumerate(tasks):
        agent.set_task(task)
        rows = []
        for e in range(n_episodes):
            env = make_env(task, seed=seed + k * n_episodes + e, max_episode_steps=steps)
            agent.reset()
            obs, _ = env.reset()
            total, length, success, done = 0.0, 0, False, False
            while not done:
                obs, reward, terminated, truncated, info = env.step(agent.act(obs))
                agent.observe(reward)
                total, length = total + reward, length + 1
                success |= info["success"]
                done = terminated or truncated
            rows.append((success, total, length))
        out[task] = rows
    return out


def test_evaluate_structure_and_matches_direct_loop():
    agent = tiny_agent()
    results = evaluate(agent, ["hammer", "push-wall-v2", "hammer"], n_episodes=2, seed=7,
                       max_episode_steps=STEPS, progress=False)
    assert list(results) == list(TASKS)  # resolved, order kept, the repeat evaluated once
    assert results["hammer-v3"]["seeds"] == [7, 8]
    assert results["push-wall-v3"]["seeds"] == [9, 10]
    reference = direct_loop(agent, TASKS, n_episodes=2, seed=7, steps=STEPS)
    for task, r in results.items():
        assert r["n_episodes"] == 2 and r["adapter"] is None
        assert r["target_return"] == agent.target_returns[task]
        assert r["lengths"] == [STEPS, STEPS] and r["mean_length"] == STEPS
        succ, ret, _ = zip(*reference[task], strict=True)
        assert r["successes"] == list(succ)
        assert r["success_rate"] == np.mean(succ)
        np.testing.assert_allclose(r["returns"], ret, rtol=1e-5)
        assert r["mean_return"] == pytest.approx(np.mean(ret), rel=1e-5)
    # seed 8 alone replays the second hammer episode; the same call twice is identical
    one = evaluate(agent, ["hammer"], n_episodes=1, seed=8, max_episode_steps=STEPS,
                   progress=False)
    assert one == evaluate(agent, ["hammer"], n_episodes=1, seed=8, max_episode_steps=STEPS,
                           progress=False)
    assert one["hammer-v3"]["seeds"] == [8]
    assert one["hammer-v3"]["returns"][0] == pytest.approx(results["hammer-v3"]["returns"][1],
                                                           rel=1e-5)
    assert results["hammer-v3"]["returns"][0] != results["hammer-v3"]["returns"][1]


def test_task_adapters_are_grouped_per_task():
    agent = tiny_agent()
    add_adapter(agent.model, "push-wall-v3", AdapterConfig(rank=2))
    with torch.no_grad():
        for p in agent.model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    agent.set_task("push-wall")  # as during fine-tuning: adapter active and trainable
    agent.model.train()
    trainable = [n for n, p in agent.model.named_parameters() if p.requires_grad]
    results = evaluate(agent, TASKS, n_episodes=1, seed=3, max_episode_steps=STEPS,
                       progress=False)
    assert results["push-wall-v3"]["adapter"] == "push-wall-v3"
    assert results["hammer-v3"]["adapter"] is None
    # the model is left as it was found
    assert active_adapter(agent.model) == "push-wall-v3" and agent.model.training
    assert trainable == [n for n, p in agent.model.named_parameters() if p.requires_grad]
    reference = direct_loop(agent, TASKS, n_episodes=1, seed=3, steps=STEPS)
    for task in TASKS:
        np.testing.assert_allclose(results[task]["returns"], [reference[task][0][1]], rtol=1e-5)
    base = evaluate(tiny_agent(), ["push-wall"], n_episodes=1, seed=4, max_episode_steps=STEPS,
                    progress=False)
    assert base["push-wall-v3"]["returns"] != results["push-wall-v3"]["returns"]


def test_success_any_step_in_both_autoreset_modes():
    """A constant action that solves the task: the success flags reach the results."""
    agent = tiny_agent()
    head = agent.model.action_head
    with torch.no_grad():  # tanh(bias) = SOLVING_ACTION whatever the input
        head.weight.zero_()
        head.bias.copy_(torch.atanh(torch.tensor(SOLVING_ACTION)))
    agent.target_returns[SOLVED_TASK] = 100.0
    results = evaluate(agent, [SOLVED_TASK], n_episodes=2, seed=0, max_episode_steps=SOLVE_STEPS,
                       progress=False)  # gymnasium's default NEXT_STEP autoreset
    assert results[SOLVED_TASK]["success_rate"] == 1.0
    venv = make_vec_env([SOLVED_TASK], n_envs=2, seed=0, max_episode_steps=SOLVE_STEPS,
                        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    out = run_episodes(agent, venv, [SOLVED_TASK] * 2, progress=False)
    assert out["successes"].tolist() == [True, True]
    assert out["lengths"].tolist() == [SOLVE_STEPS] * 2
    np.testing.assert_allclose(out["returns"], results[SOLVED_TASK]["returns"], rtol=1e-6)


def test_stop_on_success_keeps_success_and_skips_the_rest():
    """Episodes that end at their first success: the same successes as full episodes, the
    length and return up to that step; a failing episode runs to the horizon."""
    agent = tiny_agent()
    head = agent.model.action_head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.atanh(torch.tensor(SOLVING_ACTION)))
    agent.target_returns[SOLVED_TASK] = 100.0
    tasks = [SOLVED_TASK, "hammer"]  # the drawer closes, the hammer is never picked up
    kw = dict(n_episodes=3, seed=5, max_episode_steps=SOLVE_STEPS, progress=False)
    full = evaluate(agent, tasks, **kw)
    short = evaluate(agent, tasks, stop_on_success=True, **kw)
    for task in full:
        assert short[task]["successes"] == full[task]["successes"]
    drawer, hammer = short[SOLVED_TASK], short["hammer-v3"]
    assert all(0 < n < SOLVE_STEPS for n in drawer["lengths"])
    assert hammer["lengths"] == full["hammer-v3"]["lengths"] == [SOLVE_STEPS] * 3
    assert hammer["returns"] == full["hammer-v3"]["returns"]
    rewards = _episode_rewards(agent, SOLVED_TASK, 5, 3, SOLVE_STEPS)
    for n, ret, episode in zip(drawer["lengths"], drawer["returns"], rewards, strict=True):
        assert ret == pytest.approx(sum(episode[:n]))
    with pytest.raises(ValueError, match="needs a SyncVectorEnv"):
        venv = make_vec_env([SOLVED_TASK], n_envs=1, asynchronous=True, max_episode_steps=5)
        try:
            run_episodes(agent, venv, [SOLVED_TASK], progress=False, stop_on_success=True)
        finally:
            venv.close()


def _episode_rewards(agent, task, seed, n, steps):
    """Per-step rewards of the full episodes of ``evaluate(..., seed=seed)`` on ``task``."""
    agent.set_task(task)
    out = []
    for e in range(n):
        env = make_env(task, seed=seed + e, max_episode_steps=steps)
        agent.reset()
        obs, _ = env.reset()
        rewards = []
        for _ in range(steps):
            obs, reward, *_ = env.step(agent.act(obs))
            agent.observe(reward)
            rewards.append(reward)
        out.append(rewards)
    return out


def test_evaluate_needs_some_target_return():
    agent = tiny_agent()
    agent.target_returns.clear()
    with pytest.raises(ValueError, match="knows no target return: pass target_return="):
        evaluate(agent, ["reach"], n_episodes=1, progress=False)
    with pytest.raises(ValueError, match="finite"):
        evaluate(tiny_agent(), ["reach"], n_episodes=1, progress=False,
                 target_return=float("nan"))
    with pytest.raises(ValueError, match="needs routing='oracle'"):
        evaluate(RoutedAgent(tiny_agent(), RouterConfig(router="obs")), ["hammer"],
                 n_episodes=1, progress=False, target_return=100.0)


def test_unknown_task_gets_the_largest_known_target_return():
    """A task the agent was not pretrained on (zero-shot) is conditioned on the largest
    target return it knows; the episodes are those of an agent told that target."""
    results = evaluate(tiny_agent(), ["hammer", "reach-v2"], n_episodes=1, seed=3,
                       max_episode_steps=STEPS, progress=False)
    assert results["reach-v3"]["target_return"] == 600.0  # max(hammer 600, push-wall 300)
    assert results["hammer-v3"]["target_return"] == 600.0
    told = tiny_agent()
    told.target_returns["reach-v3"] = 600.0
    assert results == evaluate(told, ["hammer", "reach"], n_episodes=1, seed=3,
                               max_episode_steps=STEPS, progress=False)


def test_target_return_one_value_or_per_task_changes_the_episodes():
    kw = dict(n_episodes=1, seed=3, max_episode_steps=STEPS, progress=False)
    one = evaluate(tiny_agent(), list(TASKS), target_return=50.0, **kw)
    assert [r["target_return"] for r in one.values()] == [50.0, 50.0]
    told = tiny_agent()
    told.target_returns.update({t: 50.0 for t in TASKS})
    assert one == evaluate(told, list(TASKS), **kw)
    default = evaluate(tiny_agent(), list(TASKS), **kw)
    assert one["hammer-v3"]["returns"] != default["hammer-v3"]["returns"]
    # per task: the named one changes, the one left out keeps the agent's own target
    per_task = evaluate(tiny_agent(), list(TASKS), target_return={"hammer": 50.0}, **kw)
    assert per_task["hammer-v3"] == one["hammer-v3"]
    assert per_task["push-wall-v3"] == default["push-wall-v3"]


@torch.inference_mode()
def test_context_equals_forward_over_history():
    """Batched, sliding, reset rows: each env's action is the model's on its own history."""
    model = DecisionTransformer(DTConfig.preset("tiny", max_ep_len=64)).eval()
    k, scale = model.config.context_len, 200.0
    rng = np.random.default_rng(0)
    ctx = RolloutContext(model, 3, np.zeros(39), np.ones(39), [100.0, 200.0, 300.0], scale)
    hist = [dict(s=[], a=[], r=[], g=[], t=[]) for _ in range(3)]
    rtg = np.array([100.0, 200.0, 300.0]) / scale
    for step in range(2 * k + 3):
        if step == k + 1:  # env 2 starts a new episode mid-batch
            ctx.reset([2], target_returns=50.0)
            hist[2] = dict(s=[], a=[], r=[], g=[], t=[])
            rtg[2] = 50.0 / scale
        obs = rng.normal(size=(3, 39)).astype(np.float32)
        ctx.push_observations(obs)
        actions = ctx.next_actions().numpy()
        rewards = rng.normal(size=3).astype(np.float32)  # negative ones hit the min
        for i in range(3):
            h = hist[i]
            h["s"].append(obs[i])
            h["g"].append(rtg[i])
            h["t"].append(len(h["t"]))
            h["a"].append(np.zeros(4, np.float32))
            h["r"].append(0.0)
            win = {key: np.asarray(v[-k:], dtype=np.float32) for key, v in h.items()}
            pred = model(
                torch.from_numpy(win["s"])[None], torch.from_numpy(win["a"])[None],
                torch.from_numpy(win["r"])[None, :, None],
                torch.from_numpy(win["g"])[None, :, None],
                torch.from_numpy(win["t"]).long()[None],
            )[0, -1].numpy()
            np.testing.assert_allclose(actions[i], pred, atol=1e-5)
            h["a"][-1] = actions[i]
            h["r"][-1] = rewards[i]
        ctx.push_rewards(rewards)
        target = np.array([100.0, 200.0, 50.0 if step > k else 300.0]) / scale
        rtg = np.minimum(rtg - rewards / scale, target)
        np.testing.assert_allclose(ctx.rtg.numpy(), rtg, rtol=1e-6)


def test_context_errors():
    model = DecisionTransformer(DTConfig.preset("tiny", max_ep_len=4)).eval()
    ctx = RolloutContext(model, 2, np.zeros(39), np.ones(39), 1.0)
    with pytest.raises(ValueError, match=r"expected \(2, 39\)"):
        ctx.push_observations(np.zeros((2, 30)))
    with pytest.raises(RuntimeError, match="push_observations"):
        ctx.next_actions()
    for _ in range(4):
        ctx.push_observations(np.zeros((2, 39)))
        ctx.next_actions()
        ctx.push_rewards(np.zeros(2))
    with pytest.raises(ValueError, match="max_ep_len=4"):
        ctx.push_observations(np.zeros((2, 39)))
    with pytest.raises(ValueError, match="state_mean has shape"):
        RolloutContext(model, 2, np.zeros(10), np.ones(39), 1.0)


def agent_for(tasks, seed: int = 0) -> DTAgent:
    agent = tiny_agent(seed)
    agent.target_returns.update({resolve_task(t): 400.0 for t in tasks})
    return agent


EPISODE_KEYS = ("successes", "returns", "lengths", "seeds")


def episodes(results: dict) -> dict:
    return {task: {k: r[k] for k in EPISODE_KEYS} for task, r in results.items()}


def test_pooled_envs_replay_fresh_envs_over_many_calls():
    """A pool reused across calls with other seeds and task sets gives today's episodes."""
    agent = agent_for(["drawer-close", "reach"])
    calls = [  # (tasks, n_episodes, seed): overlapping task sets, shifting seeds
        (["hammer", "push-wall"], 2, 7),
        (["push-wall"], 3, 100),
        (["hammer", "drawer-close"], 2, 7),
        (["reach", "hammer", "push-wall"], 1, 3),
        (["hammer", "push-wall"], 2, 7),  # the first call again, on reused envs only
    ]
    pool = EnvPool(max_envs=20)
    for tasks, n, seed in calls:
        kwargs = dict(n_episodes=n, seed=seed, max_episode_steps=STEPS, progress=False)
        pooled = evaluate(agent, tasks, pool=pool, **kwargs)
        fresh = evaluate(agent, tasks, pool=EnvPool(max_envs=0), **kwargs)
        assert episodes(pooled) == episodes(fresh)  # exactly: same arithmetic, same envs
    assert pool.created == 2 + 3 + 2 + 1  # hammer, push-wall, drawer-close, reach at most
    assert pool.reused == sum(len(t) * n for t, n, _ in calls) - pool.created
    assert len(pool) == pool.created
    # and the fresh envs are today's: the vector env of make_vec_env
    first = evaluate(agent, ["hammer", "push-wall"], n_episodes=2, seed=7,
                     max_episode_steps=STEPS, progress=False, pool=pool)
    venv = make_vec_env(["hammer", "push-wall"], n_envs=2, seed=7, max_episode_steps=STEPS)
    ref = run_episodes(agent, venv, ["hammer-v3"] * 2 + ["push-wall-v3"] * 2, progress=False)
    venv.close()
    assert first["hammer-v3"]["returns"] + first["push-wall-v3"]["returns"] == \
        ref["returns"].tolist()


def test_waves_give_the_all_at_once_episodes():
    agent = tiny_agent()
    kwargs = dict(n_episodes=3, seed=11, max_episode_steps=STEPS, progress=False,
                  pool=EnvPool(max_envs=6))
    at_once = evaluate(agent, TASKS, wave_size=6, **kwargs)
    for size in (1, 2):  # waves of 1, and of 2 (the second mixes the two tasks)
        waves = evaluate(agent, TASKS, wave_size=size, **kwargs)
        for task in TASKS:
            assert waves[task]["successes"] == at_once[task]["successes"]
            assert waves[task]["lengths"] == at_once[task]["lengths"]
            # bitwise equal on the CPUs measured; a BLAS may round a batch differently
            np.testing.assert_allclose(waves[task]["returns"], at_once[task]["returns"],
                                       rtol=1e-6)
    assert kwargs["pool"].created == 6


def test_waves_are_even_and_cover_every_env():
    from agents.evaluation import _waves

    assert [list(w) for w in _waves(5, 2)] == [[0], [1, 2], [3, 4]]
    assert [len(w) for w in _waves(100, 50)] == [50, 50]
    assert [len(w) for w in _waves(101, 50)] == [33, 34, 34]
    assert [list(w) for w in _waves(3, 10)] == [[0, 1, 2]]
    with pytest.raises(ValueError, match="wave_size must be >= 1"):
        evaluate(tiny_agent(), ["hammer"], n_episodes=1, wave_size=0, progress=False)


def test_a_task_at_its_slot_replays_its_episodes_of_the_joint_evaluation():
    agent = tiny_agent()
    kwargs = dict(n_episodes=2, seed=5, max_episode_steps=STEPS, progress=False)
    joint = evaluate(agent, TASKS, **kwargs)
    alone = evaluate(agent, [TASKS[1]], slots=[1], **kwargs)[TASKS[1]]
    assert alone["seeds"] == joint[TASKS[1]]["seeds"] == [7, 8]
    assert alone["successes"] == joint[TASKS[1]]["successes"]
    assert alone["returns"] == joint[TASKS[1]]["returns"]
    with pytest.raises(ValueError, match="1 slots for 2 tasks"):
        evaluate(agent, TASKS, slots=[0], **kwargs)
