"""Environment factory: one seeded Meta-World task, or several stepping together.

``make_env`` builds the task class directly instead of ``gymnasium.make("Meta-World/MT1")``:
MT1 pre-generates 50 goals with 50 resets (~1 s per env) and then picks one of those 50 per
reset, while Continual World and the EVA paper draw a fresh random goal and object
position on every reset. Here every reset draws them from the env's own seeded generator
(``seeded_rand_vec``), so a seed fixes the whole stream of episodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from envs.suites import resolve_task, resolve_tasks
from envs.wrappers import MetaWorldWrapper

# keyword arguments of the Meta-World task classes that make_env passes through
_ENV_KWARGS = frozenset(
    {"reward_function_version", "render_mode", "camera_name", "camera_id", "width", "height"}
)


def make_env(
    task: str,
    seed: int | None = None,
    max_episode_steps: int = 200,
    terminate_on_success: bool = False,
    **kwargs: Any,
) -> gym.Env:
    """A Meta-World task as a gymnasium env with the Continual World conventions.

    Observations float32 (39,) with the goal visible, actions float32 (4,) in [-1, 1],
    episodes truncated after ``max_episode_steps`` (200, as in Continual World),
    ``info["success"]`` / ``info["is_success"]`` on every step (see
    :class:`envs.wrappers.MetaWorldWrapper`). The same ``seed`` gives the same goal and
    object positions and, for the same actions, the same trajectories; ``seed=None`` draws
    a fresh one. ``kwargs`` go to the Meta-World task class: ``reward_function_version``
    (``"v2"`` default), ``render_mode``, ``camera_name``, ``camera_id``, ``width``,
    ``height``.
    """
    name = resolve_task(task)
    unknown = sorted(set(kwargs) - _ENV_KWARGS)
    if unknown:
        raise TypeError(
            f"make_env got unknown keyword arguments {unknown}; accepted: {sorted(_ENV_KWARGS)}"
        )
    if int(max_episode_steps) < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
    base = ALL_V3_ENVIRONMENTS[name](**kwargs)
    # What Meta-World's goal-observable constructors do, minus their reset on the global
    # np.random: goal in the observation, a fresh seeded goal/object draw on every reset.
    base._partially_observable = False
    base.__dict__.pop("sawyer_observation_space", None)  # cached_property: recompute
    base._set_task_called = True
    base._freeze_rand_vec = False
    base.seeded_rand_vec = True
    base.max_path_length = int(max_episode_steps)  # Meta-World raises past its own horizon
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    base.seed(int(seed))

    env: gym.Env = MetaWorldWrapper(base, terminate_on_success=terminate_on_success)
    env = gym.wrappers.OrderEnforcing(env)
    env = gym.wrappers.TimeLimit(env, max_episode_steps=int(max_episode_steps))
    return env


def make_vec_env(
    tasks: str | Sequence[str],
    n_envs: int = 1,
    seed: int = 0,
    asynchronous: bool = False,
    max_episode_steps: int = 200,
    autoreset_mode: str | gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
    **kwargs: Any,
) -> gym.vector.VectorEnv:
    """``n_envs`` envs per task stepping together; env ``i`` runs ``tasks[i // n_envs]``
    with seed ``seed + i``.

    ``tasks`` is anything :func:`envs.suites.resolve_tasks` takes (a suite, a comma list,
    names). ``asynchronous=True`` steps them in subprocesses (per-step messaging is slow
    on small machines: parallelise whole episodes instead where you can).
    ``autoreset_mode`` is gymnasium's (default ``NEXT_STEP``); read per-episode results
    with :func:`envs.wrappers.final_step_infos`, which handles both modes. ``kwargs`` go to
    :func:`make_env`.
    """
    names = resolve_tasks(tasks)
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    fns = [
        partial(make_env, task, seed=seed + i, max_episode_steps=max_episode_steps, **kwargs)
        for i, task in enumerate(t for t in names for _ in range(n_envs))
    ]
    vector_cls = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    return vector_cls(fns, autoreset_mode=autoreset_mode)
