"""`RoutedAgent`: a policy that chooses each episode's task adapter itself.

    routed = RoutedAgent(agent, RouterConfig(router="eva", decide_after=5), signatures)
    action, state = routed.predict(obs)               # Stable-Baselines3's signature
    evaluate(routed, ["hammer", "push-wall"])         # a DTAgent's place, tasks not told

A `DTAgent` acts in the task it is told (`set_task`); wrapped in a `RoutedAgent` it is not
told: a `agents.routing.Router` picks the adapter of every episode from its first
observations (`RouterConfig`), among the tasks of `signatures` (``eva``, ``obs``,
``embedding``) or, for ``arrow``, every adapter of the agent. The oracle router is the
`DTAgent` itself, told the task. The wrapper borrows the agent's model: its active adapter
is restored after every `predict`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from agents.dt_agent import act_one_env, observe_one_env
from agents.routing import RoutedContext, Router, RouterConfig, routed_actions
from eva_rl.adapters import active_adapter, adapter_layers
from eva_rl.routing import SignatureError, SignaturePool, TaskSignature

if TYPE_CHECKING:
    from agents.dt_agent import DTAgent


class RoutedAgent:
    """`agent` with each episode's adapter chosen by `router` (default `RouterConfig()`)
    among the tasks of `signatures` (default none yet: `add_signature`).

    Args:
        agent: the `DTAgent` whose model, normalisation and target returns act.
        router: how to choose; the ``oracle`` is refused (use `agent` told the task).
        signatures: the pool the signature routers choose among, owned from now on; each
            must come from the agent's base model (fingerprint).
    """

    def __init__(self, agent: DTAgent, router: RouterConfig | None = None,
                 signatures: SignaturePool | None = None) -> None:
        self.agent = agent
        self.router = RouterConfig() if router is None else router
        if self.router.router == "oracle":
            raise ValueError("the oracle router is the DTAgent told the task: call "
                             "agent.set_task(name) (or evaluate(agent, tasks)) instead")
        self.signatures = SignaturePool() if signatures is None else signatures
        if self.signatures.names:
            fingerprint = agent.fingerprint()
            for signature in self.signatures.signatures.values():
                _check_fingerprint(signature, fingerprint)
        self._router: Router | None = None  # built on first use, again after a change
        self._context: RoutedContext | None = None

    @property
    def adapter_names(self) -> list[str]:
        """The agent's task adapters (what the routers choose among)."""
        return self.agent.adapter_names

    def add_signature(self, signature: TaskSignature, name: str | None = None) -> None:
        """Let the signature routers choose adapter `name` (default: the signature's task)
        for windows its signature explains; a signature of another base model is refused."""
        _check_fingerprint(signature, self.agent.fingerprint())
        self.signatures.add(signature, name)
        self._router = None

    def make_router(self) -> Router:
        """A fresh `Router` over the agent's adapters and signatures as they are now (a
        `SignatureError` when a signature router lacks a signature or an adapter)."""
        return Router(self.agent, self.router, self.signatures)

    def _current_router(self) -> Router:
        if self._router is None:
            self._router = self.make_router()
        return self._router

    def reset(self) -> None:
        """Forget the single-env episode that `act` was running (and the router, rebuilt
        on the next step: adapters added since then are routed to)."""
        self._context = None
        self._router = None

    def predict(
        self,
        observation: np.ndarray,
        state: RoutedContext | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, RoutedContext]:
        """Actions for observations ``(39,)`` or ``(n_envs, 39)``, as `DTAgent.predict`,
        each env acting with the adapter its episode was routed to.

        `state` is the routed context this method returned last time (None = new episodes,
        conditioned on the largest target return of the routed tasks until they decide).
        """
        agent = self.agent
        obs, single = agent.check_obs(observation)
        router = self._current_router()
        n = len(obs)
        if state is None:
            state = RoutedContext(agent.model, n, agent.state_mean, agent.state_std,
                                  router.default_target(), reward_scale=agent.reward_scale,
                                  device=agent.device)
        elif not isinstance(state, RoutedContext) or state.n_envs != n:
            raise ValueError("state must be None or the routed context predict returned "
                             f"for {n} envs")
        elif episode_start is not None:
            starts = np.asarray(episode_start, dtype=bool).reshape(-1)
            if starts.any():
                state.reset(starts, target_returns=state.default_target)
        model = agent.model
        model.eval()  # as SB3's predict: inference mode (no dropout)
        adapted = bool(adapter_layers(model))
        previous = active_adapter(model) if adapted else None
        try:
            state.push_observations(obs)
            action = routed_actions(agent, state, router)
        finally:  # the agent, told a task elsewhere, keeps its adapter
            if adapted and active_adapter(model) != previous:
                agent.use_adapter(previous)
        return (action[0] if single else action), state

    def sb3_callback(self, locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        """Feed each step's reward to the context; pass as `evaluate_policy(..., callback=)`."""
        self.agent.sb3_callback(locals_, globals_)

    def check_obs(self, obs: Any) -> tuple[np.ndarray, bool]:
        """The wrapped agent's `DTAgent.check_obs`."""
        return self.agent.check_obs(obs)

    act = act_one_env
    observe = observe_one_env


def _check_fingerprint(signature: TaskSignature, fingerprint: str) -> None:
    if signature.fingerprint != fingerprint:
        raise SignatureError(f"task {signature.task}: its signature was computed on "
                             "another base model (fingerprint mismatch)")
