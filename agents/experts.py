"""Expert data collectors: Meta-World's scripted policies and Stable-Baselines3 SAC.

A collector turns ``(task, n_episodes, seed)`` into :class:`Trajectories`, the arrays that
:func:`eva_rl.data.write_dataset` stores. Collectors are small picklable dataclasses so
:mod:`agents.collection` can send them to worker processes.

- :class:`ScriptedCollector`: ``metaworld.policies.ENV_POLICY_MAP`` with Gaussian action
  noise and epsilon-random actions, each a schedule cycled per episode (episode ``e`` uses
  ``noise[e % len(noise)]`` and ``epsilon[e % len(epsilon)]``) so one dataset holds a
  spread of returns, which a Decision Transformer needs to learn return conditioning.
- :class:`SACCollector`: trains SB3 SAC on the task and keeps its replay buffer as
  trajectories (how the EVA / L2M datasets were made), or rolls out the trained policy.

Actions are clipped to [-1, 1] before they are stepped and stored.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from envs import make_env, resolve_task

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of episodes just finished


def package_versions(*extra: str) -> dict[str, str]:
    """Installed versions of the packages that shape the data (for the manifest)."""
    names = ("eva-rl", "metaworld", "mujoco", "gymnasium", "numpy", *extra)
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class Trajectories:
    """Episodes of one task laid end to end (the arrays of the on-disk format)."""

    observations: np.ndarray  # (N, 39) float32, the observation each action was taken in
    actions: np.ndarray  # (N, 4) float32 in [-1, 1]
    rewards: np.ndarray  # (N,) float32
    successes: np.ndarray  # (N,) bool, info["success"] after each step
    episode_offsets: np.ndarray  # (E + 1,) int64

    @property
    def n_episodes(self) -> int:
        return len(self.episode_offsets) - 1

    def arrays(self) -> dict[str, np.ndarray]:
        """The keyword arrays of :func:`eva_rl.data.write_dataset`."""
        return asdict(self)

    @classmethod
    def concatenate(cls, episodes: Sequence[dict[str, np.ndarray]]) -> Trajectories:
        """Join per-episode dicts with keys ``observations, actions, rewards, successes``."""
        if not episodes:
            raise ValueError("no episodes to concatenate")
        lengths = [len(ep["rewards"]) for ep in episodes]
        return cls(
            observations=np.concatenate([ep["observations"] for ep in episodes]).astype(np.float32),
            actions=np.concatenate([ep["actions"] for ep in episodes]).astype(np.float32),
            rewards=np.concatenate([ep["rewards"] for ep in episodes]).astype(np.float32),
            successes=np.concatenate([ep["successes"] for ep in episodes]).astype(bool),
            episode_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        )


def rollout(
    env: gym.Env,
    act: Callable[[np.ndarray], np.ndarray],
    n_episodes: int,
    before_episode: Callable[[int], None] | None = None,
    progress: Progress | None = None,
) -> Trajectories:
    """Run ``n_episodes`` whole episodes of ``act`` (clipped to [-1, 1]) in ``env``."""
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    episodes = []
    for e in range(n_episodes):
        if before_episode is not None:
            before_episode(e)
        obs, _ = env.reset()
        ep: dict[str, list] = {"observations": [], "actions": [], "rewards": [], "successes": []}
        done = False
        while not done:
            action = np.clip(np.asarray(act(obs), dtype=np.float32), -1.0, 1.0)
            next_obs, reward, terminated, truncated, info = env.step(action)
            ep["observations"].append(obs)
            ep["actions"].append(action)
            ep["rewards"].append(reward)
            ep["successes"].append(info["success"])
            obs, done = next_obs, terminated or truncated
        episodes.append({k: np.asarray(v) for k, v in ep.items()})
        if progress is not None:
            progress(1)
    return Trajectories.concatenate(episodes)


def _child_seeds(seed: int, n: int) -> list[int]:
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def _as_schedule(values: float | Sequence[float], name: str, upper: float | None) -> tuple:
    values = (values,) if np.isscalar(values) else tuple(values)
    if not values:
        raise ValueError(f"{name} schedule is empty")
    for v in values:
        if not np.isfinite(v) or v < 0 or (upper is not None and v > upper):
            bound = f"in [0, {upper}]" if upper is not None else ">= 0"
            raise ValueError(f"{name} values must be {bound}, got {v}")
    return tuple(float(v) for v in values)


class ScriptedExpert:
    """Meta-World's scripted policy for one task, with noise: ``act(obs) -> action``.

    With probability ``epsilon`` the action is uniform in [-1, 1]; otherwise it is the
    scripted action plus N(0, ``noise_std``²) noise. Always clipped to [-1, 1].
    """

    def __init__(self, task: str, noise_std: float = 0.0, epsilon: float = 0.0, seed=None):
        self.task = resolve_task(task)
        self.policy = ENV_POLICY_MAP[self.task]()
        self.noise_std = float(noise_std)
        self.epsilon = float(epsilon)
        self.rng = np.random.default_rng(seed)

    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.epsilon > 0 and self.rng.random() < self.epsilon:
            return self.rng.uniform(-1.0, 1.0, 4).astype(np.float32)
        action = self.policy.get_action(obs)
        if self.noise_std > 0:
            action = action + self.rng.normal(0.0, self.noise_std, 4)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        """Stable-Baselines3's signature (for ``evaluate_policy``); batched or single obs."""
        obs = np.asarray(obs)
        if obs.ndim == 1:
            return self.act(obs), state
        return np.stack([self.act(o) for o in obs]), state


@dataclass
class ScriptedCollector:
    """Scripted Meta-World experts with per-episode noise / epsilon schedules."""

    noise: tuple[float, ...] = (0.0,)
    """Gaussian action-noise std per episode, cycled (e.g. ``(0, 0.1, 0.3, 0.5)``)."""
    epsilon: tuple[float, ...] = (0.0,)
    """Probability of a uniform random action per step, per episode, cycled."""
    max_episode_steps: int = 200
    name: str = field(default="scripted", init=False)

    def __post_init__(self):
        self.noise = _as_schedule(self.noise, "noise", None)
        self.epsilon = _as_schedule(self.epsilon, "epsilon", 1.0)

    def settings(self) -> dict[str, Any]:
        """What the manifest records about this collector (and resume compares)."""
        return {
            "noise": list(self.noise),
            "epsilon": list(self.epsilon),
            "schedule": "episode e: noise[e % len(noise)], epsilon[e % len(epsilon)]",
            "max_episode_steps": self.max_episode_steps,
        }

    def package_versions(self) -> dict[str, str]:
        return package_versions()

    def collect(
        self, task: str, n_episodes: int, seed: int, progress: Progress | None = None
    ) -> Trajectories:
        """``n_episodes`` episodes of ``task``; the same seed gives the same data."""
        env_seed, expert_seed = _child_seeds(seed, 2)
        env = make_env(task, seed=env_seed, max_episode_steps=self.max_episode_steps)
        expert = ScriptedExpert(task, seed=expert_seed)

        def before_episode(e: int) -> None:
            expert.noise_std = self.noise[e % len(self.noise)]
            expert.epsilon = self.epsilon[e % len(self.epsilon)]

        try:
            with warnings.catch_warnings():
                # the policies warn when their gains overshoot [-1, 1]; we clip on purpose
                warnings.filterwarnings("ignore", message="Constant", category=UserWarning)
                return rollout(env, expert.act, n_episodes, before_episode, progress)
        finally:
            env.close()


class _SuccessRecorder(gym.Wrapper):
    """Keeps ``info["success"]`` of every step (SB3's replay buffer stores no infos)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.successes: list[bool] = []

    def step(self, action):
        out = self.env.step(action)
        self.successes.append(bool(out[4]["success"]))
        return out


@dataclass
class SACCollector:
    """Stable-Baselines3 SAC trained on the task for ``train_steps`` env steps.

    ``source="replay"`` keeps the last ``n_episodes`` complete episodes of its replay
    buffer (the whole buffer when ``train_steps == n_episodes * max_episode_steps``),
    ``source="policy"`` rolls out the trained policy for ``n_episodes`` episodes.
    """

    train_steps: int = 100_000
    source: Literal["replay", "policy"] = "replay"
    deterministic: bool = False
    """Policy rollouts: the mean action instead of a sample."""
    learning_starts: int = 1_000
    sac_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``stable_baselines3.SAC``."""
    max_episode_steps: int = 200
    name: str = field(default="sac", init=False)

    def __post_init__(self):
        if self.source not in ("replay", "policy"):
            raise ValueError(f"source must be 'replay' or 'policy', got {self.source!r}")
        if self.train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {self.train_steps}")

    def settings(self) -> dict[str, Any]:
        return {
            "train_steps": self.train_steps,
            "source": self.source,
            "deterministic": self.deterministic,
            "learning_starts": self.learning_starts,
            "sac_kwargs": dict(self.sac_kwargs),
            "max_episode_steps": self.max_episode_steps,
        }

    def package_versions(self) -> dict[str, str]:
        return package_versions("stable-baselines3", "torch")

    def train(self, task: str, seed: int, progress_bar: bool = False):
        """Train SAC on ``task``; returns ``(model, successes per step)``."""
        from stable_baselines3 import SAC  # heavy (torch): only when SAC is used

        env = _SuccessRecorder(make_env(task, seed=seed, max_episode_steps=self.max_episode_steps))
        kwargs = {"buffer_size": self.train_steps, "learning_starts": self.learning_starts}
        kwargs.update(self.sac_kwargs)
        model = SAC("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **kwargs)
        model.learn(total_timesteps=self.train_steps, progress_bar=progress_bar)
        return model, np.asarray(env.successes, dtype=bool)

    def collect(
        self, task: str, n_episodes: int, seed: int, progress: Progress | None = None
    ) -> Trajectories:
        """Train, then return replay-buffer or policy episodes of ``task``."""
        horizon = self.max_episode_steps
        if self.source == "replay" and self.train_steps < n_episodes * horizon:
            raise ValueError(
                f"SAC replay source: {n_episodes} episodes of {horizon} steps need "
                f"train_steps >= {n_episodes * horizon}, got {self.train_steps}"
            )
        train_seed, rollout_seed = _child_seeds(seed, 2)
        model, successes = self.train(task, train_seed)
        return self.episodes(task, model, successes, n_episodes, rollout_seed, progress)

    def episodes(
        self,
        task: str,
        model,
        successes: np.ndarray,
        n_episodes: int,
        seed: int,
        progress: Progress | None = None,
    ) -> Trajectories:
        """The dataset of a trained ``model`` (from :meth:`train`): the last ``n_episodes``
        of its replay buffer, or ``n_episodes`` policy rollouts seeded with ``seed``."""
        if self.source == "replay":
            traj = replay_buffer_trajectories(model.replay_buffer, successes)
            if traj.n_episodes < n_episodes:
                raise RuntimeError(
                    f"{task}: replay buffer holds {traj.n_episodes} complete episodes, "
                    f"{n_episodes} requested"
                )
            if progress is not None:
                progress(n_episodes)
            return _last_episodes(traj, n_episodes)
        env = make_env(task, seed=seed, max_episode_steps=self.max_episode_steps)
        try:
            return rollout(
                env,
                lambda obs: model.predict(obs, deterministic=self.deterministic)[0],
                n_episodes,
                progress=progress,
            )
        finally:
            env.close()


def replay_buffer_trajectories(buffer, successes: np.ndarray) -> Trajectories:
    """Complete episodes of a single-env SB3 ``ReplayBuffer``, oldest first.

    Episodes end where the buffer's ``dones`` are set (SB3 sets them on truncation too).
    An unfinished episode at the end, and one whose start was overwritten when the buffer
    wrapped around, are dropped. ``successes`` holds ``info["success"]`` of every step
    since training began; the buffer holds the last of those steps.
    """
    if buffer.n_envs != 1:
        raise ValueError(f"expected a single-env replay buffer, got n_envs={buffer.n_envs}")
    pos = buffer.pos
    rows = np.r_[pos : buffer.buffer_size, 0:pos] if buffer.full else np.arange(pos)
    if len(successes) < len(rows) or (not buffer.full and len(successes) != pos):
        raise ValueError(f"{len(successes)} success flags for {len(rows)} replay-buffer rows")
    dones = buffer.dones[rows, 0].astype(bool)
    ends = np.flatnonzero(dones) + 1
    start = 0
    if len(successes) > len(rows) and len(ends):
        # overwritten: the oldest rows are the tail of an episode whose start is gone
        start, ends = int(ends[0]), ends[1:]
    if len(ends) == 0:
        raise ValueError("replay buffer holds no complete episode")
    keep = rows[start : int(ends[-1])]
    flags = np.asarray(successes[len(successes) - len(rows) :], dtype=bool)
    return Trajectories(
        observations=np.asarray(buffer.observations[keep, 0], dtype=np.float32),
        actions=np.asarray(buffer.actions[keep, 0], dtype=np.float32),
        rewards=np.asarray(buffer.rewards[keep, 0], dtype=np.float32),
        successes=flags[start : int(ends[-1])],
        episode_offsets=np.concatenate([[0], ends - start]).astype(np.int64),
    )


def _last_episodes(traj: Trajectories, n: int) -> Trajectories:
    off = traj.episode_offsets[-(n + 1) :]
    lo = int(off[0])
    return Trajectories(
        observations=traj.observations[lo:],
        actions=traj.actions[lo:],
        rewards=traj.rewards[lo:],
        successes=traj.successes[lo:],
        episode_offsets=(off - lo).astype(np.int64),
    )
