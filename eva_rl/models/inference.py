"""Rollout context: the last K steps of a batch of running episodes, for action prediction.

A `RolloutContext` keeps, per env, a right-aligned window of the last `context_len` steps
(normalised states, actions, rewards, returns-to-go, timesteps) with a left-padding mask,
exactly as the Decision Transformer saw them in training. One step of a batch of episodes:

    ctx.push_observations(obs)        # s_t (and the current return-to-go) for every env
    actions = ctx.next_actions()      # one forward over the windows of all envs
    ctx.push_rewards(rewards)         # r_t; RTG <- min(RTG - r_t / scale, target / scale)

The window slides by one step per step and the model's position embedding is relative to
the window, so a key/value cache would be invalid after every slide; each step therefore
runs one forward over at most the context window (see scripts/bench/bench_eval.py for the
measured cost of a full-window forward against a one-step forward).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


class RolloutContext:
    """Context windows for `n_envs` running episodes of a Decision Transformer.

    Args:
        model: a `DecisionTransformer` (anything with its `config` and `forward` signature).
        n_envs: number of parallel episodes.
        state_mean, state_std: state normalisation statistics stored with the model.
        target_returns: per-env target return (unscaled), or one float for all envs.
        reward_scale: divisor of returns-to-go; defaults to `model.config.reward_scale`.
        device: where the buffers live; defaults to the model's device.
    """

    def __init__(
        self,
        model: nn.Module,
        n_envs: int,
        state_mean: ArrayLike,
        state_std: ArrayLike,
        target_returns: ArrayLike | float,
        reward_scale: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        cfg = model.config
        layout = tuple(cfg.token_layout)
        pred = layout.index(cfg.predict_from)
        late = [name for name in ("action", "reward") if name in layout]
        if any(layout.index(name) <= pred for name in late):
            raise ValueError(
                f"token_layout {layout} predicts from {cfg.predict_from!r}, which must come "
                "before the action and reward tokens of its step for rollouts"
            )
        if device is None:
            device = next(model.parameters()).device
        self.model = model
        self.device = torch.device(device)
        self.n_envs = n_envs
        self.context_len = int(cfg.context_len)
        self.max_ep_len = int(cfg.max_ep_len)
        self.state_dim = int(cfg.state_dim)
        self.act_dim = int(cfg.act_dim)
        self.reward_scale = float(cfg.reward_scale if reward_scale is None else reward_scale)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.state_mean = self._as_vector(state_mean, "state_mean")
        self.state_std = self._as_vector(state_std, "state_std")
        n, k = n_envs, self.context_len
        self.states = torch.zeros(n, k, self.state_dim, **f32)
        self.actions = torch.zeros(n, k, self.act_dim, **f32)
        self.rewards = torch.zeros(n, k, 1, **f32)
        self.returns_to_go = torch.zeros(n, k, 1, **f32)
        self.timesteps = torch.zeros(n, k, dtype=torch.long, device=self.device)
        self.mask = torch.zeros(n, k, dtype=torch.bool, device=self.device)
        self.t = torch.zeros(n, dtype=torch.long, device=self.device)  # steps taken so far
        self.rtg = torch.zeros(n, **f32)  # current return-to-go, scaled
        self.target = torch.zeros(n, **f32)  # target return, scaled
        # per env: an action was taken whose reward has not been pushed yet
        self.reward_pending = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.observed = torch.zeros(n, dtype=torch.bool, device=self.device)
        self._warned_missing_reward = False
        self.reset(target_returns=target_returns)

    def _as_vector(self, values: ArrayLike, name: str) -> torch.Tensor:
        vec = torch.as_tensor(np.asarray(values, dtype=np.float32), device=self.device)
        if vec.shape != (self.state_dim,):
            raise ValueError(
                f"{name} has shape {tuple(vec.shape)}, expected ({self.state_dim},) "
                "(the model's state_dim)"
            )
        return vec

    def _rows(self, rows: ArrayLike | None) -> torch.Tensor:
        if rows is None:
            return torch.arange(self.n_envs, device=self.device)
        rows = torch.as_tensor(np.asarray(rows), device=self.device)
        if rows.dtype == torch.bool:
            if rows.shape != (self.n_envs,):
                raise ValueError(
                    f"row mask has shape {tuple(rows.shape)}, expected ({self.n_envs},)"
                )
            return rows.nonzero().flatten()
        return rows.long().flatten()

    def reset(
        self, rows: ArrayLike | None = None, target_returns: ArrayLike | float | None = None
    ) -> None:
        """Start new episodes in `rows` (all envs if None), optionally with new targets."""
        idx = self._rows(rows)
        if target_returns is not None:
            tr = torch.as_tensor(np.asarray(target_returns, dtype=np.float32), device=self.device)
            if tr.numel() not in (1, len(idx)):
                raise ValueError(f"got {tr.numel()} target returns for {len(idx)} envs")
            self.target[idx] = (tr.flatten() / self.reward_scale).expand(len(idx))
        for buf in (self.states, self.actions, self.rewards, self.returns_to_go):
            buf[idx] = 0.0
        self.timesteps[idx] = 0
        self.mask[idx] = False
        self.t[idx] = 0
        self.rtg[idx] = self.target[idx]
        self.reward_pending[idx] = False
        self.observed[idx] = False

    def push_observations(self, obs: ArrayLike) -> None:
        """Record the current observation `s_t` (n_envs, state_dim) of every env."""
        obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.device)
        if obs_t.ndim != 2 or obs_t.shape != (self.n_envs, self.state_dim):
            raise ValueError(
                f"observations have shape {tuple(obs_t.shape)}, expected "
                f"({self.n_envs}, {self.state_dim}) (n_envs, the model's state_dim)"
            )
        if bool((self.t >= self.max_ep_len).any()):
            raise ValueError(
                f"an episode ran past the model's max_ep_len={self.max_ep_len} steps; "
                "reset it or use a model with a larger max_ep_len"
            )
        missing = self.reward_pending
        if bool(missing.any()) and not self._warned_missing_reward:
            logger.warning(
                "no reward was pushed for %d env(s) since their last action; their "
                "return-to-go stays unchanged (feed rewards to keep it up to date)",
                int(missing.sum()),
            )
            self._warned_missing_reward = True
        for buf in (
            self.states, self.actions, self.rewards, self.returns_to_go, self.timesteps, self.mask
        ):
            buf[:, :-1] = buf[:, 1:].clone()  # drop the oldest step, free the last slot
        self.states[:, -1] = (obs_t - self.state_mean) / self.state_std
        self.actions[:, -1] = 0.0  # placeholders: after the predicting token, so unseen
        self.rewards[:, -1] = 0.0
        self.returns_to_go[:, -1, 0] = self.rtg
        self.timesteps[:, -1] = self.t
        self.mask[:, -1] = True
        self.reward_pending[:] = False
        self.observed[:] = True

    @torch.inference_mode()
    def next_actions(self, rows: ArrayLike | None = None) -> torch.Tensor:
        """Predict `a_t` for `rows` (all envs if None) with one model forward; stores them.

        Only the trailing steps that some selected env has filled are fed to the model
        (at most `context_len`), so early steps of an episode cost less.
        """
        idx = self._rows(rows)
        if not bool(self.observed[idx].all()):
            raise RuntimeError("push_observations() must be called before next_actions()")
        filled = int(self.mask[idx].sum(dim=1).max())
        window = slice(self.context_len - filled, None)
        mask = self.mask[idx, window]
        preds = self.model(
            self.states[idx, window],
            self.actions[idx, window],
            self.rewards[idx, window],
            self.returns_to_go[idx, window],
            self.timesteps[idx, window],
            mask=None if bool(mask.all()) else mask,  # None: the fast causal-only path
        )  # (n, L, act_dim)
        action = preds[:, -1].float().clamp(-1.0, 1.0)
        self.actions[idx, -1] = action
        self.observed[idx] = False
        self.reward_pending[idx] = True
        self.t[idx] += 1
        return action

    def push_rewards(self, rewards: ArrayLike, rows: ArrayLike | None = None) -> None:
        """Record `r_t` of `rows` (all envs if None); updates their return-to-go."""
        idx = self._rows(rows)
        r = torch.as_tensor(np.asarray(rewards, dtype=np.float32), device=self.device).flatten()
        if r.shape != (len(idx),):
            raise ValueError(f"got {r.numel()} rewards for {len(idx)} envs")
        self.rewards[idx, -1, 0] = r
        self.rtg[idx] = torch.minimum(self.rtg[idx] - r / self.reward_scale, self.target[idx])
        self.reward_pending[idx] = False
