"""Envs kept between evaluations: an `EnvPool` lends seeded envs and takes them back.

Building a Meta-World env costs ~0.1-0.2 s and ~20-30 MB; an evaluation every few hundred
updates of fine-tuning would build the same envs again each time. A pool keeps the envs
it lent out, per (task, horizon), and lends them again reseeded: an env is seeded exactly
as `make_env(task, seed=s)` seeds a new one (Meta-World's own ``seed``), so its next
``reset()`` starts the same episode a fresh env would (tests/test_evaluation.py checks it).

The pool is bounded: it keeps at most ``max_envs`` envs (the least recently lent
(task, horizon) groups are closed first). Envs lent out at once are not bounded by the
pool; callers bound them (``agents.evaluation.evaluate`` runs its episodes in waves).
A pool is not thread-safe; each process has its own `default_pool()`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import gymnasium as gym

from envs.factory import make_env
from envs.suites import resolve_task

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENVS = 50
"""Envs a default pool keeps (~1.2 GB at ~24 MB each; one 50-episode wave)."""


def reseed(env: gym.Env, seed: int) -> None:
    """Seed a `make_env` env so that its next ``reset()`` starts the episodes of
    ``make_env(task, seed=seed)`` (the same call `make_env` makes)."""
    env.unwrapped.seed(int(seed))


class EnvPool:
    """Seeded envs lent out per evaluation and kept for the next one.

    Args:
        max_envs: most envs kept between loans (0 = keep none: every loan builds fresh
            envs and closes them afterwards, today's behaviour before the pool).
    """

    def __init__(self, max_envs: int = DEFAULT_MAX_ENVS) -> None:
        if int(max_envs) < 0:
            raise ValueError(f"max_envs must be >= 0, got {max_envs}")
        self.max_envs = int(max_envs)
        self._free: OrderedDict[tuple[str, int], list[gym.Env]] = OrderedDict()  # LRU first
        self.created = 0
        """Envs built so far."""
        self.reused = 0
        """Loans served by a kept env."""

    def __len__(self) -> int:
        """Envs kept now (not counting those lent out)."""
        return sum(len(envs) for envs in self._free.values())

    @contextlib.contextmanager
    def vector_env(
        self, tasks: Sequence[str], seeds: Sequence[int], max_episode_steps: int = 200
    ) -> Iterator[gym.vector.SyncVectorEnv]:
        """A synchronous vector env whose env ``i`` runs ``tasks[i]`` from seed ``seeds[i]``.

        Its first ``reset()`` (unseeded) starts the same episodes as
        ``envs.make_vec_env`` would. Do not close it: on exit the envs return to the pool
        (or are closed if it is full); after an exception they are closed.
        """
        if len(tasks) != len(seeds):
            raise ValueError(f"{len(tasks)} tasks but {len(seeds)} seeds")
        if not tasks:
            raise ValueError("a vector env needs at least one task")
        horizon = int(max_episode_steps)
        keys = [(resolve_task(t), horizon) for t in tasks]
        envs: list[gym.Env] = []
        try:
            for key, seed in zip(keys, seeds, strict=True):
                envs.append(self._take(key, seed))
            yield gym.vector.SyncVectorEnv([_constant(env) for env in envs])
        except BaseException:
            for env in envs:
                env.close()
            raise
        for key, env in zip(keys, envs, strict=True):
            self._give_back(key, env)

    def _take(self, key: tuple[str, int], seed: int) -> gym.Env:
        kept = self._free.get(key)
        if kept:
            env = kept.pop()
            reseed(env, seed)
            self.reused += 1
            return env
        self.created += 1
        task, horizon = key
        return make_env(task, seed=seed, max_episode_steps=horizon)

    def _give_back(self, key: tuple[str, int], env: gym.Env) -> None:
        if self.max_envs == 0:
            env.close()
            return
        self._free.setdefault(key, []).append(env)
        self._free.move_to_end(key)  # most recently used last
        while len(self) > self.max_envs:
            oldest = next(iter(self._free))
            victims = self._free[oldest]
            victims.pop().close()
            if not victims:
                del self._free[oldest]

    def close(self) -> None:
        """Close every kept env (the pool stays usable and refills on the next loan)."""
        n = len(self)
        for envs in self._free.values():
            for env in envs:
                env.close()
        self._free.clear()
        if n:
            logger.debug("closed %d pooled envs", n)


def _constant(env: gym.Env):
    """An env "factory" that returns an existing env (what SyncVectorEnv asks for)."""
    return lambda: env


_DEFAULT: EnvPool | None = None


def default_pool() -> EnvPool:
    """This process's shared pool (`DEFAULT_MAX_ENVS` envs), closed at exit."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = EnvPool()
        atexit.register(_DEFAULT.close)
    return _DEFAULT
