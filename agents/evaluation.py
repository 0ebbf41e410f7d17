"""Batched success-rate evaluation of a `DTAgent` over many tasks at once.

Every episode has its own env: env `i` runs `tasks[i // n_episodes]` with seed `seed + i`,
as in `envs.make_vec_env`. The envs come from an `envs.EnvPool` (by default the process's
`default_pool()`), which keeps them between calls and reseeds them, and the episodes run
in waves of at most `wave_size` envs stepping together as one synchronous vector env (a
bound on the envs alive at once; each env's episode is the same in any wave, see
`evaluate`). Every step the agent's `RolloutContext` does one model forward for the whole
wave; when the model holds
task adapters, envs are grouped by the adapter their task uses and each group gets one
forward per step (adapters are switched per module, not per sample). Per env the
return-to-go follows RTG <- min(RTG - r / scale, target / scale); an episode succeeds if
`info["success"]` was true at any of its steps. With ``stop_on_success`` an episode ends at
its first success (its success is known then; its return and length count up to there)
and its env is not stepped again, which saves most of the physics of a good policy.

A `agents.routed_agent.RoutedAgent` in the agent's place is not told the tasks: each episode
picks its adapter with its router (`agents.routing`), and each task's result gains a
``routing`` entry (per episode: chosen adapter, decided, share of correct decisions). A
`DTAgent` is told each episode's task (the oracle router).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from agents.dt_agent import DTAgent
from agents.routed_agent import RoutedAgent
from agents.routing import RoutedContext, Router, episode_routing, routed_actions
from envs import EnvPool, default_pool, final_step_infos, resolve_task, resolve_tasks
from eva_rl.adapters import active_adapter, adapter_layers
from eva_rl.progress import progress_bar
from eva_rl.state import preserve_model_state

logger = logging.getLogger(__name__)


DEFAULT_WAVE_SIZE = 50
"""Most envs `evaluate` steps at once. The model's cost per env step hardly falls past
batches of ~10 on a CPU (scripts/bench/bench_eval.py), while every env costs 20-30 MB."""


def _unique(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(names))  # CW20 repeats CW10: evaluate each task once


def _waves(n: int, size: int) -> list[range]:
    """Env indices ``0..n-1`` in consecutive waves of at most ``size``, as even as possible."""
    k = -(-n // size)
    bounds = [i * n // k for i in range(k + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def evaluate(
    agent: DTAgent | RoutedAgent,
    tasks: str | Sequence[str],
    n_episodes: int = 10,
    seed: int = 0,
    max_episode_steps: int = 200,
    progress: bool = True,
    pool: EnvPool | None = None,
    wave_size: int = DEFAULT_WAVE_SIZE,
    stop_on_success: bool = False,
    slots: Sequence[int] | None = None,
    target_return: float | Mapping[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Success rate, mean return and mean episode length of `agent` on each task.

    `agent`: a `DTAgent` is told each episode's task (the oracle router); a
    `agents.routed_agent.RoutedAgent` is not: its router picks each episode's adapter.
    `target_return`: the return each episode is conditioned on (see `target_returns_for`):
    one value for every task, or a value per task name; a task it leaves out gets the
    agent's own target return and, where the agent has none (e.g. a CW10 task on a model
    pretrained on MT40), the largest target return the agent knows
    (`fallback_target_return`). Only for a `DTAgent`: a router conditions every episode on
    its own default before it knows the task.

    `stop_on_success`: end each episode at its first success (same success rates; returns
    and lengths up to that step).
    `slots`: the position of each (resolved, unique) task in a larger joint evaluation whose
    episodes it replays (episode ``k`` of slot ``j`` has env seed ``seed + j * n_episodes +
    k``); default ``0, 1, ...``, i.e. this call is the joint evaluation.

    `tasks` is anything `envs.resolve_tasks` accepts (suite name, names, comma list);
    repeated tasks are evaluated once. The envs come from `pool` (default: this process's
    `envs.default_pool()`; ``EnvPool(max_envs=0)`` builds fresh ones and closes them) and
    run in waves of at most `wave_size` envs. Neither changes the episodes: an env
    reseeded by the pool replays a fresh one's, and each episode's actions do not depend
    on which others share its batch (row-wise model; tests/test_evaluation.py checks
    both). Returns, per resolved task name, a JSON-able dict:
    ``success_rate``, ``mean_return``, ``mean_length``, ``n_episodes``, ``seeds`` (the env
    seeds of its episodes), ``target_return``, ``adapter`` (None = base model) and the
    per-episode lists ``successes``, ``returns``, ``lengths``.
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if wave_size < 1:
        raise ValueError(f"wave_size must be >= 1, got {wave_size}")
    names = _unique(resolve_tasks(tasks))
    router = None
    if isinstance(agent, RoutedAgent):
        if target_return is not None:
            raise ValueError("target_return needs routing='oracle' (a DTAgent told the task): "
                             f"the {agent.router.router!r} router conditions every episode "
                             "on its own default target")
        router = agent.make_router()
        agent = agent.agent
    targets = None if router is not None else target_returns_for(agent, names, target_return)
    slots = range(len(names)) if slots is None else list(slots)
    if len(slots) != len(names):
        raise ValueError(f"{len(slots)} slots for {len(names)} tasks ({', '.join(names)})")
    env_tasks = [task for task in names for _ in range(n_episodes)]
    seeds = [seed + slot * n_episodes + k for slot in slots for k in range(n_episodes)]
    pool = default_pool() if pool is None else pool
    parts = []
    for wave in _waves(len(env_tasks), wave_size):
        wave_tasks = [env_tasks[i] for i in wave]
        with pool.vector_env(wave_tasks, [seeds[i] for i in wave], max_episode_steps) as venv:
            parts.append(run_episodes(agent, venv, wave_tasks, progress=progress,
                                      max_steps=max_episode_steps, router=router,
                                      stop_on_success=stop_on_success,
                                      target_returns=targets))
    episodes = _concatenate(parts)
    logger.info("evaluated %d episodes on %d tasks (seeds %d..%d)", len(env_tasks), len(names),
                min(seeds), max(seeds))
    results: dict[str, dict[str, Any]] = {}
    for task in names:
        rows = [i for i, t in enumerate(env_tasks) if t == task]
        succ, ret, length = (episodes[k][rows] for k in ("successes", "returns", "lengths"))
        results[task] = {
            "success_rate": float(succ.mean()),
            "mean_return": float(ret.mean()),
            "mean_length": float(length.mean()),
            "n_episodes": len(rows),
            "seeds": [seeds[i] for i in rows],
            "target_return": (agent.target_returns.get(task) if targets is None
                              else targets[task]),
            "adapter": agent.adapter_for(task),
            "successes": [bool(x) for x in succ],
            "returns": [float(x) for x in ret],
            "lengths": [int(x) for x in length],
        }
        if router is not None:
            results[task]["routing"] = {k: [episodes["routing"][k][i] for i in rows]
                                        for k in episodes["routing"]}
            results[task]["router"] = router.config.router
    return results


def fallback_target_return(agent: DTAgent) -> float:
    """The target return of a task the agent has none for: the largest it knows.

    A Decision Transformer is conditioned on a high return, and the largest target return
    of the pretraining tasks (each its dataset's best episode return) is the highest
    return-to-go the model has seen in training: a higher made-up value would condition it
    on returns-to-go outside its training data. `scripts/evaluate.py --target-return`
    has the same default. Raises ValueError if the agent knows no target return.
    """
    if not agent.target_returns:
        raise ValueError("the agent knows no target return: pass target_return=")
    return max(agent.target_returns.values())


def target_returns_for(agent: DTAgent, tasks: Sequence[str],
                       target_return: float | Mapping[str, float] | None = None
                       ) -> dict[str, float]:
    """Per (resolved) task, the return `evaluate` conditions it on.

    `target_return`: one value for every task; or a mapping of task names (any spelling
    `envs.resolve_task` accepts) to values, the tasks it leaves out falling back as with
    None; or None: the agent's own target return (its pretraining dataset's best episode
    return), else `fallback_target_return` for a task the agent has none for.
    """
    if target_return is not None and not isinstance(target_return, Mapping):
        value = _finite(target_return, "target_return")
        return {resolve_task(t): value for t in tasks}
    given = {resolve_task(t): _finite(v, f"target_return[{t!r}]")
             for t, v in (target_return or {}).items()}
    out = {}
    for task in map(resolve_task, tasks):
        if task in given:
            out[task] = given[task]
        elif task in agent.target_returns:
            out[task] = agent.target_returns[task]
        else:
            out[task] = fallback_target_return(agent)
    return out


def _finite(value: float, name: str) -> float:
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _step_successes(infos: dict[str, Any], ended: np.ndarray) -> np.ndarray:
    """Per env, whether the vector env's step reported a success (the ended envs' from
    their final infos, whichever autoreset mode)."""
    n = len(ended)
    step_success = np.asarray(infos.get("success", np.zeros(n)), dtype=bool)
    step_success &= np.asarray(infos.get("_success", np.ones(n)), dtype=bool)
    for i, info in final_step_infos(infos, ended).items():
        step_success[i] = bool(info.get("success", False) or info.get("is_success", False))
    return step_success


def _step_running(venv: gym.vector.SyncVectorEnv, actions: np.ndarray, running: np.ndarray,
                  obs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Step only the running envs of ``venv`` (no autoreset); the others keep their last
    observation and a zero reward. Returns observations, rewards, ended, successes."""
    n = len(running)
    obs = obs.copy()
    rewards = np.zeros(n, dtype=np.float64)
    ended = np.zeros(n, dtype=bool)
    success = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(running):
        obs[i], rewards[i], terminated, truncated, info = venv.envs[i].step(actions[i])
        ended[i] = terminated or truncated
        success[i] = bool(info.get("success", False) or info.get("is_success", False))
    return obs, rewards, ended, success


def _concatenate(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The waves' per-env results as one (arrays joined; the routing lists too)."""
    joined: dict[str, Any] = {}
    for key, first in parts[0].items():
        if isinstance(first, dict):
            joined[key] = {k: [v for part in parts for v in part[key][k]] for k in first}
        else:
            joined[key] = np.concatenate([part[key] for part in parts])
    return joined


def run_episodes(
    agent: DTAgent,
    venv: gym.vector.VectorEnv,
    env_tasks: Sequence[str],
    progress: bool = True,
    max_steps: int | None = None,
    router: Router | None = None,
    stop_on_success: bool = False,
    target_returns: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Run one episode in every env of `venv` (env `i` in task `env_tasks[i]`).

    `target_returns`: per task, the return to condition on (default: the agent's own,
    `agent.target_return`); unused with a `router` (`RoutedAgent.make_router`), which
    chooses each env's adapter itself, the tasks untold.

    `max_steps` (the envs' horizon) only sizes the progress bar. `stop_on_success` ends an
    episode at its first success; `venv` must then be a ``SyncVectorEnv`` (its envs are
    stepped one by one, the finished ones not at all).
    Returns per env ``successes`` (bool), ``returns`` (float64) and ``lengths`` (int64).
    `venv` must be freshly made (its first reset starts the seeded episodes). The model's
    train/eval mode, active adapter and ``requires_grad`` flags are restored afterwards.
    """
    n = venv.num_envs
    if stop_on_success and not isinstance(venv, gym.vector.SyncVectorEnv):
        raise ValueError(f"stop_on_success steps envs one by one: it needs a SyncVectorEnv, "
                         f"got {type(venv).__name__}")
    if len(env_tasks) != n:
        raise ValueError(f"{len(env_tasks)} tasks given for a vector env of {n} envs")
    obs_shape = venv.single_observation_space.shape
    if obs_shape != (agent.config.state_dim,):
        raise ValueError(
            f"the envs' observations have shape {obs_shape} but the model's state_dim is "
            f"{agent.config.state_dim}: this model was trained for other observations"
        )
    if router is None:
        lookup = agent.target_return if target_returns is None else \
            (lambda t: target_returns[resolve_task(t)])
        targets = np.array([lookup(t) for t in env_tasks], dtype=np.float32)
    groups: dict[str | None, np.ndarray] = {}
    adapters = [agent.adapter_for(t) for t in env_tasks]
    for name in dict.fromkeys(adapters):
        groups[name] = np.array([i for i, a in enumerate(adapters) if a == name])
    model = agent.model
    has_adapters = bool(adapter_layers(model))
    if router is None:
        ctx = agent.new_context(n, targets)
    else:  # the tasks are not told: every episode starts from the router's default target
        ctx = RoutedContext(model, n, agent.state_mean, agent.state_std,
                            router.default_target(), reward_scale=agent.reward_scale,
                            device=agent.device)
    successes = np.zeros(n, dtype=bool)
    returns = np.zeros(n, dtype=np.float64)
    lengths = np.zeros(n, dtype=np.int64)
    running = np.ones(n, dtype=bool)
    actions = np.zeros((n, agent.config.act_dim), dtype=np.float32)
    bar = progress_bar(total=max_steps, desc=f"evaluate {n} episodes", unit="step",
                       disable=not progress, leave=False)
    # evaluation may run in the middle of fine-tuning: leave the model as it was found
    with preserve_model_state(model), bar:
        model.eval()
        current = active_adapter(model) if has_adapters else None
        obs, _ = venv.reset()
        while running.any():
            ctx.push_observations(obs)
            if router is not None:
                actions[:] = routed_actions(agent, ctx, router, running)
            for name, rows in (groups.items() if router is None else ()):
                if has_adapters and name != current:
                    agent.use_adapter(name)
                    current = name
                actions[rows] = ctx.next_actions(rows if len(groups) > 1 else None).cpu().numpy()
            if stop_on_success:
                obs, rewards, ended, step_success = _step_running(venv, actions, running, obs)
            else:
                obs, rewards, terminated, truncated, infos = venv.step(actions)
                ended = (terminated | truncated) & running
                step_success = _step_successes(infos, ended)
            ctx.push_rewards(rewards)
            successes |= step_success & running
            returns[running] += rewards[running]
            lengths[running] += 1
            running &= ~ended
            if stop_on_success:
                running &= ~successes
            bar.update(1)
    out: dict[str, Any] = {"successes": successes, "returns": returns, "lengths": lengths}
    if router is not None:
        out["routing"] = episode_routing(ctx, [agent.adapter_for(t) for t in env_tasks])
    return out
