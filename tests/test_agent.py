"""DTAgent: a tiny pretrained run, save/load, set_task, SB3's evaluate_policy, shape errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.dt_agent import DTAgent
from agents.evaluation import evaluate
from agents.experts import ScriptedCollector
from agents.routed_agent import RoutedAgent
from agents.routing import RouterConfig
from envs import make_env
from eva_rl.adapters import AdapterConfig, active_adapter, add_adapter
from eva_rl.data import WindowSampler, compute_state_stats, write_dataset
from eva_rl.models import DecisionTransformer, DTConfig
from eva_rl.training import CheckpointError, TrainConfig, Trainer

TASKS = ("reach-v3", "push-v3")
HORIZON = 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(one_thread, tmp_path_factory) -> tuple[DTAgent, object]:
    """A tiny DT trained for a few steps on scripted-expert data from real env steps."""
    root = tmp_path_factory.mktemp("data")
    collector = ScriptedCollector(noise=(0.0, 0.3), max_episode_steps=HORIZON)
    datasets = []
    for i, task in enumerate(TASKS):
        traj = collector.collect(task, n_episodes=3, seed=i)
        datasets.append(write_dataset(root / task, task=task, **traj.arrays(),
                                      metadata={"collector": "scripted"}))
    mean, std = compute_state_stats(datasets)
    config = DTConfig.preset("tiny", max_ep_len=64)
    torch.manual_seed(0)
    model = DecisionTransformer(config)
    sampler = WindowSampler(datasets, config.context_len, state_mean=mean, state_std=std)
    train = TrainConfig(steps=8, batch_size=8, warmup_steps=2, checkpoint_every=0,
                        progress=False, device="cpu", precision="fp32")
    history = Trainer(model, sampler, train).train()
    assert len(history) == 8
    targets = {d.task: float(d.episode_returns.max()) for d in datasets}
    agent = DTAgent(model, mean, std, targets, device="cpu")
    run = tmp_path_factory.mktemp("run") / "pretrain"
    agent.save(run)
    return agent, run


def rollout(agent: DTAgent, task: str, seed: int, steps: int = HORIZON) -> tuple[np.ndarray, float]:
    """Actions and return of one act/observe episode."""
    env = make_env(task, seed=seed, max_episode_steps=steps)
    agent.set_task(task)
    obs, _ = env.reset()
    actions, total, done = [], 0.0, False
    while not done:
        action = agent.act(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        agent.observe(reward)
        actions.append(action)
        total += reward
        done = terminated or truncated
    return np.stack(actions), total


def test_load_round_trip_gives_identical_actions(pretrained):
    agent, run = pretrained
    loaded = DTAgent.load(run, device="cpu")
    assert loaded.target_returns == agent.target_returns
    assert loaded.run_config["tasks"] == sorted(TASKS)
    for task in TASKS:
        a1, r1 = rollout(agent, task, seed=3)
        a2, r2 = rollout(loaded, task, seed=3)
        np.testing.assert_array_equal(a1, a2)
        assert r1 == r2


def test_adapters_saved_loaded_and_selected_by_task(pretrained, tmp_path):
    base, run = pretrained
    agent = DTAgent.load(run, device="cpu")
    add_adapter(agent.model, "push-v3", AdapterConfig(rank=2))
    with torch.no_grad():  # B = 0 at init: give the adapter an effect
        for p in agent.model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    with pytest.raises(FileExistsError, match="different run"):
        agent.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "not a run"
    agent.save(run)  # the same run: adds adapters/push-v3 in place
    assert (run / "adapters" / "push-v3" / "adapter_config.json").is_file()
    loaded = DTAgent.load(run, device="cpu")
    assert loaded.adapter_names == ["push-v3"]
    a_adapted, _ = rollout(loaded, "push", seed=1)
    np.testing.assert_array_equal(a_adapted, rollout(agent, "push", seed=1)[0])
    a_base, _ = rollout(base, "push", seed=1)
    assert not np.allclose(a_adapted, a_base)  # set_task activated the adapter
    np.testing.assert_array_equal(rollout(loaded, "reach", seed=1)[0],
                                  rollout(base, "reach", seed=1)[0])  # no adapter: base
    copy = tmp_path / "copy"
    loaded.save(copy)
    other = DTAgent.load(copy, device="cpu")
    np.testing.assert_array_equal(rollout(other, "push", seed=2)[0],
                                  rollout(loaded, "push", seed=2)[0])
    base.save(copy)  # the same run: its adapter is kept
    assert DTAgent.load(copy, device="cpu").adapter_names == ["push-v3"]
    stranger = DTAgent(DecisionTransformer(base.config), base.state_mean, base.state_std,
                       base.target_returns, device="cpu")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        stranger.save(copy)  # another model's run is refused...
    stranger.save(copy, overwrite=True)  # ...unless asked
    assert DTAgent.load(copy, device="cpu").adapter_names == []


def test_set_task_errors_and_target_return(pretrained):
    agent, _ = pretrained
    with pytest.raises(ValueError, match="closest valid names: reach"):
        agent.set_task("reech")
    with pytest.raises(ValueError, match="known tasks: push-v3, reach-v3"):
        agent.set_task("hammer")
    assert agent.set_task("hammer-v2", target_return=1234.0) == "hammer-v3"
    assert agent.target_returns.pop("hammer-v3") == 1234.0
    fresh = DTAgent(agent.model, agent.state_mean, agent.state_std, agent.target_returns)
    with pytest.raises(RuntimeError, match="set_task"):
        fresh.predict(np.zeros(39, dtype=np.float32))
    with pytest.raises(ValueError, match=r"set_task\(None\).*RoutedAgent"):
        agent.set_task(None)  # routing is a policy of its own


def test_routed_agent_is_accepted_where_an_agent_is(pretrained, caplog):
    """A `RoutedAgent` (arrow: the adapters' weights, no signatures) in SB3's
    evaluate_policy and in `evaluate`; the agent it wraps, told a task, keeps its adapter."""
    _, run = pretrained
    agent = DTAgent.load(run, device="cpu")
    gen = torch.Generator().manual_seed(0)
    for task in TASKS:  # an earlier test may have saved push-v3's into the run
        if task not in agent.adapter_names:
            add_adapter(agent.model, task, AdapterConfig(rank=2))
    with torch.no_grad():  # B = 0 at init: give every adapter an update to route by
        for name, p in agent.model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    agent.set_task("push")
    obs = np.random.default_rng(0).normal(size=(2, 39)).astype(np.float32)
    told, _ = agent.predict(obs)
    routed = RoutedAgent(agent, RouterConfig(router="arrow", decide_after=2))
    env = DummyVecEnv([lambda s=s: make_env("reach", seed=s, max_episode_steps=HORIZON)
                       for s in (5, 6)])
    with caplog.at_level(logging.WARNING):
        _, lengths = evaluate_policy(routed, env, n_eval_episodes=2, warn=False,
                                     callback=routed.sb3_callback, return_episode_rewards=True)
    assert lengths == [HORIZON, HORIZON]
    assert "no reward was pushed" not in caplog.text  # the callback fed the routed context
    assert active_adapter(agent.model) == "push-v3"  # the routed steps gave it back
    np.testing.assert_array_equal(agent.predict(obs)[0], told)
    res = evaluate(routed, TASKS, n_episodes=1, max_episode_steps=HORIZON, progress=False)
    for task in TASKS:
        assert res[task]["router"] == "arrow" and res[task]["routing"]["decided"] == [True]
        assert res[task]["routing"]["chosen"][0] in TASKS


def test_predict_batches_like_sb3(pretrained):
    agent, _ = pretrained
    agent.set_task("reach")
    obs = np.random.default_rng(0).normal(size=(3, 39)).astype(np.float32)
    actions, state = agent.predict(obs)
    assert actions.shape == (3, 4) and actions.dtype == np.float32
    single, _ = agent.predict(obs[0])
    assert single.shape == (4,)
    np.testing.assert_allclose(single, actions[0], atol=1e-6)
    # env 1 starts a new episode: its action equals a fresh first step on that obs
    _, state = agent.predict(obs, state=state, episode_start=np.zeros(3, bool))
    again, _ = agent.predict(obs, state=state, episode_start=np.array([False, True, False]))
    np.testing.assert_allclose(again[1], actions[1], atol=1e-6)
    assert not np.allclose(again[0], actions[0])
    with pytest.raises(ValueError, match="state holds 3 envs"):
        agent.predict(obs[:2], state=state)


def test_sb3_evaluate_policy_runs_and_feeds_rewards(pretrained, caplog):
    agent, _ = pretrained
    agent.set_task("push")
    env = DummyVecEnv([lambda s=s: make_env("push", seed=s, max_episode_steps=HORIZON)
                       for s in (5, 6)])
    returns, lengths = evaluate_policy(agent, env, n_eval_episodes=2, warn=False,
                                       callback=agent.sb3_callback, return_episode_rewards=True)
    assert lengths == [HORIZON, HORIZON]
    direct = [rollout(agent, "push", seed=s)[1] for s in (5, 6)]
    np.testing.assert_allclose(sorted(returns), sorted(direct), rtol=1e-5)
    agent.set_task("push")
    single = make_env("push", seed=5, max_episode_steps=HORIZON)
    with caplog.at_level(logging.WARNING):
        mean, _ = evaluate_policy(agent, single, n_eval_episodes=1, warn=False)
    assert np.isfinite(mean)
    assert "no reward was pushed" in caplog.text  # no callback: the RTG cannot follow


def test_state_dim_mismatch_is_a_clear_error(pretrained):
    _, run = pretrained
    model = DecisionTransformer(DTConfig.preset("tiny", state_dim=10))
    agent = DTAgent(model, np.zeros(10), np.ones(10), {"reach": 1.0}, device="cpu")
    agent.set_task("reach")
    with pytest.raises(ValueError, match="state_dim is 10"):
        agent.act(np.zeros(39, dtype=np.float32))
    with pytest.raises(ValueError, match="state_dim is 10"):
        evaluate(agent, ["reach"], n_episodes=1, max_episode_steps=2, progress=False)
    with pytest.raises(ValueError, match="state_mean has shape"):
        DTAgent(model, np.zeros(39), np.ones(39), {"reach": 1.0})


def test_corrupt_run_is_a_clear_error(pretrained, tmp_path):
    agent, _ = pretrained
    run = tmp_path / "run"
    agent.save(run)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        DTAgent.load(run)
    with pytest.raises(CheckpointError, match="no run config"):
        DTAgent.load(tmp_path / "missing")
