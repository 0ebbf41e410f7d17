"""`DTAgent`: a pretrained Decision Transformer with its normalisation and task adapters.

The agent follows Stable-Baselines3's `predict` signature. A Decision Transformer is
conditioned on the return-to-go, which needs each step's reward; SB3 never passes rewards
to `predict`. The design here:

- `predict` returns, as SB3's recurrent `state`, the `RolloutContext` holding every env's
  window (states, actions, rewards, returns-to-go); SB3 hands it back on the next call and
  `episode_start` resets the rows of envs that began a new episode.
- Rewards reach that context through SB3's own per-step hook:
  `evaluate_policy(agent, env, callback=agent.sb3_callback)`. Without the callback the
  return-to-go stays at the task's target (logged once as a warning).
- `act(obs)` / `observe(reward)` are the single-env convenience pair.
- The agent acts in the task it is told. To choose each episode's adapter without being
  told, wrap it: `agents.routed_agent.RoutedAgent(agent, router)` is a policy with the same
  methods, accepted wherever an agent is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs import resolve_task
from eva_rl.adapters import (
    adapter_layers,
    adapter_names,
    load_adapter,
    save_adapter,
    set_active_adapter,
)
from eva_rl.io import atomic_dir
from eva_rl.models import DecisionTransformer, DTConfig
from eva_rl.models.inference import RolloutContext
from eva_rl.routing import model_fingerprint
from eva_rl.threads import DEFAULT_THREADS, set_threads
from eva_rl.training.run import (
    ADAPTERS_DIR,
    RUN_KEYS,
    WEIGHTS_FILE,
    CheckpointError,
    adapter_dirs,
    load_weights,
    read_run_config,
    read_weights,
    save_weights,
    write_run_config,
)

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """cuda when present, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def act_one_env(policy: Any, obs: np.ndarray) -> np.ndarray:
    """A policy's ``act(obs)``: the action ``(act_dim,)`` for one env's observation, the
    episode kept in ``policy._context``; call ``observe`` after the step."""
    arr, _ = policy.check_obs(obs)
    if arr.shape[0] != 1:
        raise ValueError("act() takes one observation; use predict() for a batch")
    action, policy._context = policy.predict(arr[0], state=policy._context)
    return action


def observe_one_env(policy: Any, reward: float) -> None:
    """A policy's ``observe(reward)``: the reward of its last `act` step (updates the
    return-to-go)."""
    if policy._context is None:
        raise RuntimeError("observe() before act(): no step to attach the reward to")
    policy._context.push_rewards([float(reward)])


class DTAgent:
    """A Decision Transformer that acts in Meta-World tasks.

    Args:
        model: the (pretrained) `DecisionTransformer`, possibly with task adapters named
            after their tasks (``"hammer-v3"``).
        state_mean, state_std: state normalisation statistics of the pretraining data.
        target_returns: per task, the return to condition on (paper: the maximum episode
            return in that task's dataset).
        reward_scale: divisor of returns-to-go; defaults to the model config's.
        device: defaults to cuda when present, else cpu.
    """

    def __init__(
        self,
        model: DecisionTransformer,
        state_mean: np.ndarray,
        state_std: np.ndarray,
        target_returns: Mapping[str, float],
        reward_scale: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.device = default_device() if device is None else torch.device(device)
        self.model = model.to(self.device).eval()
        self.config: DTConfig = model.config
        dim = self.config.state_dim
        self.state_mean = np.asarray(state_mean, dtype=np.float32).copy()
        self.state_std = np.asarray(state_std, dtype=np.float32).copy()
        for name, arr in (("state_mean", self.state_mean), ("state_std", self.state_std)):
            if arr.shape != (dim,):
                raise ValueError(f"{name} has shape {arr.shape}, the model's state_dim is {dim}")
        if not np.all(self.state_std > 0):
            raise ValueError("state_std must be > 0 everywhere")
        self.target_returns: dict[str, float] = {
            resolve_task(k): float(v) for k, v in target_returns.items()
        }
        scale = self.config.reward_scale if reward_scale is None else reward_scale
        self.reward_scale = float(scale)
        self.task: str | None = None
        self.run_config: dict[str, Any] | None = None  # config.json of a loaded run
        self._context: RolloutContext | None = None

    # ----------------------------------------------------------------- tasks and adapters
    @property
    def adapter_names(self) -> list[str]:
        """Names of the task adapters on the model, in the order they were added."""
        return adapter_names(self.model)

    def adapter_for(self, task: str) -> str | None:
        """The adapter a task runs with: the one named after it, else None (base model)."""
        task = resolve_task(task)
        return task if task in self.adapter_names else None

    def target_return(self, task: str) -> float:
        """The target return of `task`; a clear error if the agent has none."""
        task = resolve_task(task)
        if task not in self.target_returns:
            known = ", ".join(sorted(self.target_returns)) or "none"
            raise ValueError(
                f"no target return for task {task!r}; known tasks: {known} "
                "(pass target_return= to set_task to add one)"
            )
        return self.target_returns[task]

    def fingerprint(self) -> str:
        """`eva_rl.routing.model_fingerprint` of the base weights (adapters excluded)."""
        return model_fingerprint(self.base_state_dict())

    def set_task(self, name: str, target_return: float | None = None) -> str:
        """Select the task to act in (returns its resolved name) and reset the context.

        Activates the adapter named after the task if the model has one, else the bare
        base model. `target_return` adds or replaces the task's target return. To act
        without being told the task, wrap the agent in `agents.routed_agent.RoutedAgent`.
        """
        if name is None:
            raise ValueError("set_task(None): a DTAgent acts in the task it is told; to "
                             "choose each episode's adapter without being told, wrap it: "
                             "RoutedAgent(agent, RouterConfig(...)) (agents.routed_agent)")
        task = resolve_task(name)
        if target_return is not None:
            self.target_returns[task] = float(target_return)
        self.target_return(task)  # raises for an unknown task
        self.use_adapter(self.adapter_for(task))
        self.task = task
        self.reset()
        return task

    def use_adapter(self, adapter: str | None) -> None:
        """Make `adapter` the active one (None = the bare base model)."""
        if adapter_layers(self.model):
            set_active_adapter(self.model, adapter)

    # ------------------------------------------------------------------------- acting
    def new_context(self, n_envs: int, target_returns: np.ndarray | float) -> RolloutContext:
        """A fresh rollout context for `n_envs` episodes with the agent's normalisation."""
        return RolloutContext(
            self.model, n_envs, self.state_mean, self.state_std, target_returns,
            reward_scale=self.reward_scale, device=self.device,
        )

    def check_obs(self, obs: Any) -> tuple[np.ndarray, bool]:
        """`obs` as a float32 ``(n_envs, state_dim)`` array and whether it was one env's
        ``(state_dim,)``; a clear error for any other shape."""
        arr = np.asarray(obs, dtype=np.float32)
        single = arr.ndim == 1
        if single:
            arr = arr[None]
        dim = self.config.state_dim
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise ValueError(
                f"observation of shape {np.shape(obs)} does not fit the model: expected "
                f"({dim},) or (n_envs, {dim}) (the model's state_dim is {dim})"
            )
        return arr, single

    def _require_task(self) -> str:
        if self.task is None:
            raise RuntimeError("no task selected: call agent.set_task(name) first (or wrap "
                               "the agent in agents.routed_agent.RoutedAgent to route)")
        return self.task

    def reset(self) -> None:
        """Forget the single-env episode that `act` was running."""
        self._context = None

    def predict(
        self,
        observation: np.ndarray,
        state: RolloutContext | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, RolloutContext]:
        """Actions for observations ``(39,)`` or ``(n_envs, 39)``, Stable-Baselines3 style.

        `state` is the context this method returned last time (None = new episodes);
        `episode_start` marks envs whose episode just began. The Decision Transformer
        is deterministic, so `deterministic` has no effect. Feed rewards to the returned
        context (`sb3_callback` does it inside SB3's `evaluate_policy`).
        """
        obs, single = self.check_obs(observation)
        task = self._require_task()
        self.model.eval()  # as SB3's predict: inference mode (no dropout)
        n = len(obs)
        target = self.target_return(task)
        if state is None:
            state = self.new_context(n, target)
        elif not isinstance(state, RolloutContext):
            raise TypeError(
                f"state must be None or the RolloutContext returned by predict, got {type(state)}"
            )
        elif state.n_envs != n:
            raise ValueError(f"state holds {state.n_envs} envs but {n} observations were given")
        elif episode_start is not None:
            starts = np.asarray(episode_start, dtype=bool).reshape(-1)
            if starts.shape != (n,):
                raise ValueError(f"episode_start has {starts.size} entries for {n} envs")
            if starts.any():
                state.reset(starts, target_returns=target)
        state.push_observations(obs)
        action = state.next_actions().cpu().numpy()
        return (action[0] if single else action), state

    def sb3_callback(self, locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        """Feed each step's reward to the context; pass as `evaluate_policy(..., callback=)`.

        SB3 calls it once per env after every step, with that env's index `i`.
        """
        state = locals_.get("states")
        if isinstance(state, RolloutContext):
            state.push_rewards([float(locals_["reward"])], rows=[int(locals_["i"])])

    act = act_one_env
    observe = observe_one_env

    # ----------------------------------------------------------------------- on disk
    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None,
             threads: int | None = DEFAULT_THREADS) -> DTAgent:
        """Load a run directory (config.json, model.safetensors, adapters/<task>/; the
        format is `eva_rl.training.run`'s).

        `threads`: the torch CPU threads to use from now on, as every script's
        ``--threads`` (default 1, `eva_rl.threads`; None leaves torch's setting alone).
        """
        set_threads(threads)
        path = Path(path)
        cfg = read_run_config(path)
        model = DecisionTransformer(DTConfig.from_dict(cfg["model"]))
        load_weights(model, path / WEIGHTS_FILE)
        for sub in adapter_dirs(path):
            load_adapter(model, sub, name=sub.name)
        agent = cls(
            model,
            cfg["state_mean"],
            cfg["state_std"],
            cfg["target_returns"],
            reward_scale=model.config.reward_scale,
            device=device,
        )
        agent.run_config = cfg
        agent.use_adapter(None)
        logger.info("loaded %s (adapters: %s)", path, agent.adapter_names or "none")
        return agent

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's weights under plain `DecisionTransformer` keys (no adapters)."""
        layers = adapter_layers(self.model)
        merged = [p for p, layer in layers.items() if layer.merged_adapter is not None]
        if merged:
            raise RuntimeError(
                f"adapters are merged into {merged[:3]}: call unmerge_adapter(model) first"
            )
        out: dict[str, torch.Tensor] = {}
        for key, value in self.model.state_dict().items():
            owner = next((p for p in layers if key.startswith(p + ".")), None)
            if owner is None:
                out[key] = value
            elif key.startswith(owner + ".base_layer."):
                out[owner + key[len(owner) + len(".base_layer"):]] = value
            # other keys of an adapter layer are adapter tensors, saved per adapter
        return out

    def _config_fields(self) -> dict[str, Any]:
        run = self.run_config or {}
        extra = {k: v for k, v in run.items() if k not in ("format", "version", *RUN_KEYS)}
        return dict(
            model=self.config.to_dict(),
            train=run.get("train", {}),
            tasks=run.get("tasks", sorted(self.target_returns)),
            data=run.get("data", ""),
            state_mean=self.state_mean.tolist(),
            state_std=self.state_std.tolist(),
            target_returns=self.target_returns,
            **extra,
        )

    def _same_run(self, path: Path, base: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        """The config of `path` if it holds this agent's run (same model config, statistics
        and base weights), else None."""
        try:
            cfg = read_run_config(path)
            weights = read_weights(path / WEIGHTS_FILE)
        except CheckpointError:
            return None
        mine = json.loads(json.dumps(self._config_fields()))
        if any(cfg.get(k) != mine[k] for k in ("model", "state_mean", "state_std")):
            return None
        same = weights.keys() == base.keys() and all(
            torch.equal(weights[k], base[k].detach().cpu()) for k in base
        )
        return cfg if same else None

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the run layout `load` reads: config.json, model.safetensors, adapters/.

        Saving into the run the agent came from (same model config, statistics and base
        weights) updates its config and adapters in place, keeping everything else there
        (checkpoints, tensorboard, adapters the agent lacks). Any other existing
        non-empty directory is refused unless `overwrite=True`, which replaces it whole.
        Every file and adapter directory is written under a temporary name and renamed.
        """
        path = Path(path)
        base = self.base_state_dict()
        fields = self._config_fields()
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a directory")
        if path.is_dir() and any(path.iterdir()):
            existing = self._same_run(path, base)
            if existing is not None:
                # keep what the run recorded; add the agent's (new) target returns
                kept = {k: v for k, v in existing.items() if k not in ("format", "version")}
                kept["target_returns"] = {**existing["target_returns"], **self.target_returns}
                write_run_config(path, overwrite=True, **kept)
                self._save_adapters(path / ADAPTERS_DIR)
                logger.info("updated run %s", path)
                return path
            if not overwrite:
                raise FileExistsError(
                    f"{path}: holds a different run or other files; choose another "
                    "directory or pass overwrite=True to replace it"
                )
        with atomic_dir(path, overwrite=True) as tmp:
            write_run_config(tmp, **fields)
            save_weights(base, tmp / WEIGHTS_FILE)
            self._save_adapters(tmp / ADAPTERS_DIR)
        logger.info("saved agent to %s", path)
        return path

    def _save_adapters(self, root: Path) -> None:
        for name in self.adapter_names:
            with atomic_dir(root / name, overwrite=True) as tmp:
                save_adapter(self.model, name, tmp)

