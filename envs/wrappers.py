"""Wrappers that turn a raw Meta-World env into a well-behaved gymnasium env.

:class:`MetaWorldWrapper` fixes what Meta-World 3.1 leaves to the user: float32
observations inside a truthful observation space (so gymnasium's checker has nothing to
warn about), ``reset(seed=...)`` that really reseeds, and success flags that
Stable-Baselines3 and the Continual World convention both read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

OBS_DIM = 39
ACT_DIM = 4
# Meta-World clips the hand position (dims 0:3, and 18:21 one step earlier) and the
# gripper opening (3, 21) in `step`; objects and goal are unbounded in practice.
_HAND_LOW = np.array([-0.525, 0.348, -0.0525, -1.0])
_HAND_HIGH = np.array([0.525, 1.025, 0.7, 1.0])


def observation_space() -> gym.spaces.Box:
    """The float32 (39,) space every task shares (equal spaces let vector envs batch)."""
    low = np.full(OBS_DIM, -np.inf, dtype=np.float32)
    high = np.full(OBS_DIM, np.inf, dtype=np.float32)
    for start in (0, 18):
        low[start : start + 4] = _HAND_LOW
        high[start : start + 4] = _HAND_HIGH
    return gym.spaces.Box(low, high, dtype=np.float32)


class MetaWorldWrapper(gym.Wrapper):
    """Float32 observations, real reseeding on ``reset(seed=s)`` and success flags.

    - ``reset(seed=s)`` calls Meta-World's ``env.seed(s)`` (Meta-World itself ignores the
      argument), so it restarts the same stream of goal/object positions as
      ``make_env(task, seed=s)``; ``reset()`` continues the stream.
    - ``info["success"]``: bool, the task is solved at this step.
    - ``info["is_success"]``: bool, solved at any step of the episode so far (what
      Stable-Baselines3 reads on the last step; the Continual World success criterion).
    - ``terminate_on_success=True`` ends the episode at the first success.
    """

    def __init__(self, env: gym.Env, terminate_on_success: bool = False):
        super().__init__(env)
        self.observation_space = observation_space()
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), dtype=np.float32)
        self.terminate_on_success = terminate_on_success
        self._solved = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None:
            self.env.unwrapped.seed(int(seed))
            self.action_space.seed(int(seed))
        obs, info = self.env.reset(options=options)
        self._solved = False
        return obs.astype(np.float32), dict(info)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        success = bool(info.get("success", 0.0))
        self._solved = self._solved or success
        info = dict(info, success=success, is_success=self._solved)
        if self.terminate_on_success and success:
            terminated = True
        return obs.astype(np.float32), float(reward), bool(terminated), bool(truncated), info


def final_step_infos(infos: Mapping[str, Any], ended: np.ndarray) -> dict[int, dict[str, Any]]:
    """Per-env info of the last step, for each env of a vector env whose episode ``ended``.

    Works for both gymnasium autoreset modes: with ``SAME_STEP`` the ending step's infos
    sit in ``infos["final_info"]`` while ``infos`` already holds the reset's (reading
    ``infos["success"]`` there counts no successes); with ``NEXT_STEP`` they are ``infos``
    itself. ``ended`` is ``terminated | truncated`` from that ``step``.
    """
    source = infos.get("final_info", infos)
    return {int(i): _env_slice(source, int(i)) for i in np.flatnonzero(np.asarray(ended))}


def _env_slice(infos: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Env ``i``'s entries of a batched info dict (keys whose ``_key`` mask is set)."""
    out: dict[str, Any] = {}
    for key, value in infos.items():
        mask = infos.get(f"_{key}")
        if key.startswith("_") or (mask is not None and not mask[i]):
            continue
        out[key] = _env_slice(value, i) if isinstance(value, Mapping) else value[i]
    return out
