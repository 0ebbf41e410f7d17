"""agents.experts and agents.collection on real Meta-World, tiny episode counts."""

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, run_main

from agents.collection import collect_datasets, collection_metadata, collection_seed
from agents.experts import (
    SACCollector,
    ScriptedCollector,
    ScriptedExpert,
    replay_buffer_trajectories,
)
from envs import make_env
from eva_rl.data import DatasetError, open_dataset

H = 40  # short episodes keep the tests fast


def _replay(task, seed, traj, horizon):
    """Step a fresh env with the stored actions; return its observations and rewards."""
    env = make_env(task, seed=seed, max_episode_steps=horizon)
    obs, rewards = [], []
    for e in range(traj.n_episodes):
        o, _ = env.reset()
        lo, hi = traj.episode_offsets[e], traj.episode_offsets[e + 1]
        for a in traj.actions[lo:hi]:
            obs.append(o)
            o, r, *_ = env.step(a)
            rewards.append(r)
    return np.array(obs), np.array(rewards, dtype=np.float32)


@pytest.mark.filterwarnings("ignore:Constant:UserWarning")  # the policy overshoots [-1, 1]
def test_scripted_expert_clips_and_adds_noise():
    env = make_env("faucet-close", seed=0)  # its scripted actions leave [-1, 1] every step
    obs, _ = env.reset()
    raw = ScriptedExpert("faucet-close").policy.get_action(obs)
    assert np.abs(raw).max() > 1
    clean = ScriptedExpert("faucet-close").act(obs)
    assert clean.dtype == np.float32 and np.abs(clean).max() <= 1
    np.testing.assert_allclose(clean, np.clip(raw, -1, 1), rtol=1e-6)
    noisy = np.stack(
        [ScriptedExpert("faucet-close", noise_std=0.3, seed=s).act(obs) for s in range(20)]
    )
    assert np.abs(noisy).max() <= 1 and np.std(noisy[:, 0]) > 0.01
    rand = ScriptedExpert("faucet-close", epsilon=1.0, seed=0)
    acts = np.stack([rand.act(obs) for _ in range(50)])
    assert acts.min() < -0.5 and acts.max() > 0.5  # uniform, not the scripted action
    single, state = ScriptedExpert("reach").predict(obs)
    batch, _ = ScriptedExpert("reach").predict(np.stack([obs, obs]))
    assert single.shape == (4,) and batch.shape == (2, 4) and state is None


def test_scripted_collector_schedule_and_reproducibility():
    scheduled = ScriptedCollector(noise=(0.0, 0.5), max_episode_steps=H)
    traj = scheduled.collect("reach", 3, seed=4)
    assert traj.observations.shape == (3 * H, 39) and traj.observations.dtype == np.float32
    assert traj.actions.shape == (3 * H, 4) and np.abs(traj.actions).max() <= 1
    np.testing.assert_array_equal(traj.episode_offsets, [0, H, 2 * H, 3 * H])
    again = scheduled.collect("reach", 3, seed=4)
    for name, arr in traj.arrays().items():
        np.testing.assert_array_equal(arr, getattr(again, name), err_msg=name)
    assert not np.array_equal(traj.actions, scheduled.collect("reach", 3, seed=5).actions)
    # episode 0 is noiseless in both schedules, episode 1 only in the noiseless one
    clean = ScriptedCollector(noise=(0.0,), max_episode_steps=H).collect("reach", 2, seed=4)
    np.testing.assert_array_equal(clean.actions[:H], traj.actions[:H])
    assert not np.array_equal(clean.actions[H:], traj.actions[H : 2 * H])
    # the stored observation is the one each action was taken in
    obs, rewards = _replay("reach", _env_seed(4), traj, H)
    np.testing.assert_array_equal(obs, traj.observations)
    np.testing.assert_array_equal(rewards, traj.rewards)


def _env_seed(seed):
    # ScriptedCollector's env seed is the first child of the collection seed
    return int(np.random.SeedSequence(seed).spawn(2)[0].generate_state(1)[0])


def test_scripted_collector_succeeds_and_flags_agree():
    traj = ScriptedCollector(max_episode_steps=120).collect("reach", 2, seed=0)
    ep_success = np.logical_or.reduceat(traj.successes, traj.episode_offsets[:-1])
    assert ep_success.all()
    assert traj.successes.dtype == bool and not traj.successes[0]


def test_bad_collector_settings(tmp_path):
    with pytest.raises(ValueError, match="epsilon"):
        ScriptedCollector(epsilon=(1.5,))
    with pytest.raises(ValueError, match="noise"):
        ScriptedCollector(noise=())
    with pytest.raises(ValueError, match="source"):
        SACCollector(source="buffer")
    with pytest.raises(ValueError, match="train_steps >= 1000"):
        SACCollector(train_steps=500).collect("reach", 5, seed=0)
    unsaveable = SACCollector(sac_kwargs={"policy_kwargs": {"activation_fn": object}})
    with pytest.raises(ValueError, match="JSON-serialisable"):  # before any training
        collect_datasets("reach", unsaveable, 1, tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_sac_replay_buffer_trajectories_are_the_real_transitions():
    pytest.importorskip("stable_baselines3")
    sac = SACCollector(
        train_steps=3 * H + 20,
        learning_starts=3 * H,
        max_episode_steps=H,
        sac_kwargs={"batch_size": 16, "policy_kwargs": {"net_arch": [16, 16]}},
    )
    model, successes = sac.train("reach", seed=9)
    traj = replay_buffer_trajectories(model.replay_buffer, successes)
    np.testing.assert_array_equal(traj.episode_offsets, [0, H, 2 * H, 3 * H])  # 20 dropped
    obs, rewards = _replay("reach", 9, traj, H)
    np.testing.assert_array_equal(obs, traj.observations)
    np.testing.assert_allclose(rewards, traj.rewards, rtol=1e-6)
    assert len(successes) == 3 * H + 20 and np.abs(traj.actions).max() <= 1
    last2 = sac.episodes("reach", model, successes, 2, seed=0)
    np.testing.assert_array_equal(last2.episode_offsets, [0, H, 2 * H])
    np.testing.assert_array_equal(last2.observations, traj.observations[H:])
    with pytest.raises(RuntimeError, match="3 complete episodes, 4 requested"):
        sac.episodes("reach", model, successes, 4, seed=0)
    policy = dataclasses.replace(sac, source="policy", deterministic=True)
    run = policy.episodes("reach", model, successes, 1, seed=0)
    expected = model.predict(run.observations[:5], deterministic=True)[0]
    np.testing.assert_allclose(run.actions[:5], np.clip(expected, -1, 1), rtol=1e-6)
    meta = collection_metadata(sac, "reach-v3", 3, seed=1)
    assert meta["collector"] == "sac" and meta["collector_settings"]["train_steps"] == 3 * H + 20
    assert "stable-baselines3" in meta["package_versions"]


def _assert_same(a, b):
    for name in ("observations", "actions", "rewards", "successes", "episode_offsets"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


TASKS = ["reach", "push", "window-close"]
EPISODES = 4


def _collect_args(out):
    return [
        "--tasks",
        ",".join(TASKS),
        "--episodes",
        str(EPISODES),
        "--out",
        str(out),
        "--noise",
        "0,0.2",
        "--epsilon",
        "0,0.1",
        "--max-episode-steps",
        str(H),
        "--seed",
        "3",
        "--quiet",
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted collection with 2 worker processes."""
    out = tmp_path_factory.mktemp("reference")
    collector = ScriptedCollector(noise=(0, 0.2), epsilon=(0, 0.1), max_episode_steps=H)
    summaries = collect_datasets(TASKS, collector, EPISODES, out, seed=3, workers=2, progress=False)
    return out, summaries


@pytest.mark.slow
def test_collect_datasets_writes_manifests(reference):
    out, summaries = reference
    assert [s.task for s in summaries] == [f"{t}-v3" for t in TASKS]
    assert all(s.status == "collected" for s in summaries)
    ds = open_dataset(out / "push-v3")
    assert ds.n_episodes == EPISODES and ds.n_transitions == EPISODES * H
    m = ds.manifest
    assert m["collector"] == "scripted" and m["noise"] == [0.0, 0.2] and m["epsilon"] == [0, 0.1]
    assert m["seed"] == 3 and m["collection_seed"] == collection_seed(3, "push-v3")
    assert set(m["package_versions"]) >= {"metaworld", "mujoco", "gymnasium", "numpy"}
    assert summaries[1].mean_return == pytest.approx(ds.episode_returns.mean())


# A collection that SIGKILLs itself right after the first array file of the second task's
# dataset is on disk: the first task is finished, the second half-written, the third not begun.
_KILLED_COLLECTION = """
import os, signal
from agents.collection import collect_datasets
from agents.experts import ScriptedCollector
from eva_rl.data import format as fmt

real = fmt._write_file
def write_then_die(path, write):
    real(path, write)
    if "{victim}" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # as hard as an interruption gets
fmt._write_file = write_then_die
collector = ScriptedCollector(noise=(0, 0.2), epsilon=(0, 0.1), max_episode_steps={H})
collect_datasets({tasks!r}, collector, {episodes}, {out!r}, seed=3, progress=False)
"""


@pytest.mark.slow
def test_interrupted_collection_resumes_without_loss_or_duplicates(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    victim = f"{TASKS[1]}-v3"
    code = _KILLED_COLLECTION.format(victim=victim, H=H, tasks=TASKS, episodes=EPISODES,
                                     out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    finished = {p.name for p in out.iterdir() if (p / "manifest.json").exists()}
    assert finished == {f"{TASKS[0]}-v3"}
    missing = [f"{t}-v3" for t in TASKS[1:]]
    # the kill left the second task's dataset half-written under a temporary name
    half = [p for p in out.iterdir() if p.name.startswith(f".{victim}.tmp-")]
    assert len(half) == 1 and [f.suffix for f in half[0].iterdir()] == [".npy"]
    before = {t: (out / t / "observations.npy").stat().st_mtime_ns for t in finished}

    collector = ScriptedCollector(noise=(0, 0.2), epsilon=(0, 0.1), max_episode_steps=H)
    summaries = collect_datasets(TASKS, collector, EPISODES, out, seed=3, progress=False)

    status = {s.task: s.status for s in summaries}
    assert {t for t, s in status.items() if s == "existing"} == finished
    assert all(status[t] == "collected" for t in missing)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # leftovers removed
    for t in finished:  # finished tasks untouched
        assert (out / t / "observations.npy").stat().st_mtime_ns == before[t]
    for t in status:  # every episode exactly once, identical to the uninterrupted run
        _assert_same(open_dataset(out / t), open_dataset(ref_out / t))


@pytest.mark.slow
def test_resume_refuses_other_settings_and_foreign_dirs(reference, tmp_path):
    ref_out, _ = reference
    other = ScriptedCollector(noise=(0.5,), max_episode_steps=H)
    with pytest.raises(ValueError, match="other settings.*collector_settings") as err:
        collect_datasets(TASKS, other, EPISODES, ref_out, seed=3, progress=False)
    assert "reach-v3" in str(err.value)
    same = ScriptedCollector(noise=(0, 0.2), epsilon=(0, 0.1), max_episode_steps=H)
    with pytest.raises(ValueError, match="requested_episodes"):
        collect_datasets(["reach"], same, EPISODES + 1, ref_out, seed=3, progress=False)
    (tmp_path / "reach-v3").mkdir()
    (tmp_path / "reach-v3" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a complete dataset"):
        collect_datasets(["reach"], same, 1, tmp_path, progress=False)
    assert (tmp_path / "reach-v3" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_collect_script_prints_summary(reference):
    ref_out, _ = reference
    done = run_main("collect", _collect_args(ref_out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "task",
        "status",
        "episodes",
        "transitions",
        "success",
        "mean",
        "return",
    ]
    row = next(line for line in lines if line.startswith("push-v3"))
    assert row.split()[1:4] == ["existing", str(EPISODES), str(EPISODES * H)]
