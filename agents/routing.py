"""Routing a `DTAgent`'s episodes to task adapters without being told the task (the policy
that does it is `agents.routed_agent.RoutedAgent`; this module holds its parts).

Routers (`ROUTERS`): ``oracle`` (the task is given: the adapter named after it), ``eva``
(the task whose activation subspaces of the frozen base explain the window best, see
`eva_rl.routing`; None = unknown task), ``obs`` (nearest centroid of the window's mean
normalised observation), ``embedding`` (nearest centroid of the base model's mean
final-layer output over the window: the kind of key L2M learns) and ``arrow`` (Arrow,
`eva_rl.arrow`, from the adapters' weights alone, no signatures: per adapted layer each
adapter's prototype is the top right-singular vector of its update B A; the base model's
input row of every token of the window at every adapted layer gives its `arrow_top_k`
adapters by |row · prototype| a softmax weight, and the episode goes to the adapter with
the largest weight summed over rows and layers. PEFT mixes the top-k adapters per token
and layer; one adapter per episode, as the other routers choose, is the adapter that
mixture leans on most, each token of each layer counting once).

An episode is decided once `decide_after` observations have been seen (or re-decided at
every step from then on with `redecide`). Until then the best guess so far acts (``before=
"guess"``: a decision on the steps seen, not yet counted) or the bare base model
(``"base"``); whenever the decision is None (unknown task) the base model acts. At the
`bench` tier even one step of the base model's actions cost push-wall's own adapter a third
of its successes, so guessing is the default. Episodes start conditioned on the largest
target return of the routed tasks (the task is not known yet); a decision switches the
episode's target return to the chosen task's. One decision = one extra base forward over
the envs deciding.

Signatures live next to the adapter in a fine-tuning run: ``<task_dir>/signature/``,
written when the run routes (`FinetuneConfig.routing.router` other than ``oracle``) or later by
scripts/signatures.py (`agents.finetuned.write_signatures`). ``arrow`` needs none.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from eva_rl.adapters import adapter_layers, set_active_adapter
from eva_rl.arrow import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, arrow_prototypes, arrow_votes
from eva_rl.data import TrajectoryDataset, WindowSampler
from eva_rl.eva import ActivationCollector, EvaConfig, EvaResult, compute_eva, dt_forward_and_mask
from eva_rl.eva.hooks import find_target_layers
from eva_rl.models.inference import RolloutContext
from eva_rl.routing import DEFAULT_QUANTILE, SCORES, SignatureError, SignaturePool, TaskSignature
from eva_rl.state import preserve_model_state

if TYPE_CHECKING:
    from agents.dt_agent import DTAgent

logger = logging.getLogger(__name__)

ROUTERS = ("oracle", "eva", "obs", "embedding", "arrow")
BEFORE_DECISION = ("guess", "base")
SIGNATURE_DIR = "signature"
DEFAULT_LAYERS = ("blocks.*.attn.q_proj", "blocks.*.mlp.fc_in")
"""The two LayerNorm outputs of every block (q/k/v share the first): inputs of one scale."""


def needs_signatures(router: str) -> bool:
    """Whether `router` chooses by task signatures (``eva``, ``obs``, ``embedding``): the
    ``oracle`` is told the task and ``arrow`` reads only the adapters' weights."""
    return router not in ("oracle", "arrow")


@dataclass
class RouterConfig:
    """How a routed agent chooses its adapter."""

    router: str = "eva"
    """One of `ROUTERS`."""
    decide_after: int = 5
    """Observations of an episode seen before its decision (1 = on the first one)."""
    redecide: bool = False
    """Decide again at every later step (one more base forward per step)."""
    before: str = "guess"
    """Who acts before the decision: ``guess`` (the best guess on the steps so far; one
    base forward per step until the decision) or ``base`` (the bare base model)."""
    score: str = "residual"
    """Score of the ``eva`` router (`eva_rl.routing.SCORES`); ``residual`` routed episode
    starts better than ``ppca`` at every rank on the MT40 tasks held out of the `bench`
    tier's pretraining (docs/benchmarks.md)."""
    unknown: bool = True
    """``eva``: say None (base model acts) when no task explains the window."""
    arrow_top_k: int = DEFAULT_TOP_K
    """``arrow``: adapters sharing each token's weight (PEFT's `ArrowConfig.top_k`)."""
    arrow_temperature: float = DEFAULT_TEMPERATURE
    """``arrow``: softmax temperature of the token weights (`router_temperature`)."""

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; valid: {', '.join(ROUTERS)}")
        if int(self.decide_after) < 1:
            raise ValueError(f"decide_after must be >= 1, got {self.decide_after}")
        if self.before not in BEFORE_DECISION:
            raise ValueError(f"unknown before={self.before!r}; valid: "
                             f"{', '.join(BEFORE_DECISION)}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; valid: {', '.join(SCORES)}")
        if int(self.arrow_top_k) < 1:
            raise ValueError(f"arrow_top_k must be >= 1, got {self.arrow_top_k}")
        if not float(self.arrow_temperature) > 0:
            raise ValueError(f"arrow_temperature must be > 0, got {self.arrow_temperature}")


# ------------------------------------------------------------------- base activations


def routing_row_mask(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Token rows a window is judged by, ``(B, K * n_tokens)``: every real token except
    the newest step's action and reward (placeholders during a rollout)."""
    tok = model.token_mask(mask)
    K, n = mask.shape[1], model.n_tokens
    layout = model.config.token_layout
    late = torch.zeros(K * n, dtype=torch.bool, device=tok.device)
    for j, name in enumerate(layout):
        if name in ("action", "reward"):
            late[(K - 1) * n + j] = True
    return tok & ~late


@torch.no_grad()
def base_features(model: torch.nn.Module, layers: Sequence[str], batch: Mapping[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """One forward of the bare base model over DT windows: the selected rows of each layer's
    input, the window of every row, and the per-window router keys (``obs``: mean
    normalised state of the real steps, ``embedding``: mean final-layer output of the rows).
    """
    mask = batch["mask"].bool()
    rows_mask = routing_row_mask(model, mask)
    collector = ActivationCollector(model, layers, gather=False)
    try:
        with preserve_model_state(model):
            model.eval()
            if adapter_layers(model):
                set_active_adapter(model, None)
            for p in layers:
                collector.attach(p)
            collector.set_mask(rows_mask)
            hidden = model.hidden_states(batch["states"], batch["actions"], batch["rewards"],
                                         batch["returns_to_go"], batch["timesteps"],
                                         None if bool(mask.all()) else mask)
            rows = collector.pop()
    finally:
        collector.close()
    window = rows_mask.nonzero()[:, 0].cpu()
    w = rows_mask.float().unsqueeze(-1)
    embedding = (hidden.float() * w).sum(1) / w.sum(1).clamp_min(1.0)
    m = mask.float().unsqueeze(-1)
    obs = (batch["states"].float() * m).sum(1) / m.sum(1).clamp_min(1.0)
    return rows, window, {"obs": obs.cpu(), "embedding": embedding.cpu()}


def _sampler_batches(agent: DTAgent, dataset: TrajectoryDataset, batch_size: int, n: int,
                     seed: int) -> Iterator[dict[str, torch.Tensor]]:
    cfg = agent.config
    sampler = WindowSampler([dataset], context_len=cfg.context_len,
                            reward_scale=cfg.reward_scale, state_mean=agent.state_mean,
                            state_std=agent.state_std, seed=seed)
    for _ in range(n):
        batch = sampler.sample(batch_size)
        yield {k: torch.as_tensor(v, device=agent.device) for k, v in batch.items()}


def episode_prefix_batch(agent: DTAgent, dataset: TrajectoryDataset, episodes: Sequence[int],
                         steps: int, target_return: float | None = None
                         ) -> dict[str, torch.Tensor]:
    """The window a router sees after `steps` observations of each of `episodes` (their
    last ``min(steps, context_len)`` steps, the newest action and reward still to come),
    conditioned on `target_return` as a rollout is (default: the episode's own return)."""
    L = min(int(steps), agent.config.context_len)
    lo = int(steps) - L
    scale = agent.config.reward_scale
    cols: dict[str, list[np.ndarray]] = {"states": [], "actions": [], "rewards": [],
                                         "returns_to_go": []}
    for e in episodes:
        ep = dataset.episode(int(e))
        if len(ep["rewards"]) < steps:
            raise ValueError(f"episode {e} has {len(ep['rewards'])} steps, fewer than {steps}")
        rewards = np.asarray(ep["rewards"], np.float32)
        start = float(rewards.sum()) if target_return is None else float(target_return)
        rtg = (start - np.concatenate(([0.0], np.cumsum(rewards[:steps - 1])))) / scale
        cols["states"].append((ep["observations"][lo:steps] - agent.state_mean) / agent.state_std)
        cols["actions"].append(ep["actions"][lo:steps])
        cols["rewards"].append(rewards[lo:steps, None])
        cols["returns_to_go"].append(rtg[lo:, None])
    batch = {k: torch.as_tensor(np.stack(v), dtype=torch.float32, device=agent.device)
             for k, v in cols.items()}
    n = len(cols["states"])
    batch["timesteps"] = torch.arange(lo, steps, device=agent.device).expand(n, L)
    batch["mask"] = torch.ones(n, L, dtype=torch.bool, device=agent.device)
    return batch


def _episode_start_batches(agent: DTAgent, dataset: TrajectoryDataset, batch_size: int,
                           seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The windows a router decides on: the first L steps of random episodes, one batch
    per L = 1 .. context_len."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(dataset.episode_lengths)
    for L in range(1, agent.config.context_len + 1):
        long_enough = np.flatnonzero(lengths >= L)
        if not len(long_enough):
            return
        yield episode_prefix_batch(agent, dataset, rng.choice(long_enough, size=batch_size), L)


def task_signature(agent: DTAgent, task: str, dataset: TrajectoryDataset, *,
                   eva_config: EvaConfig, eva_result: EvaResult | None = None,
                   batch_size: int = 32, max_batches: int = 50, seed: int = 0,
                   layers: Sequence[str] = DEFAULT_LAYERS,
                   calibration_batches: int = 8, quantile: float = DEFAULT_QUANTILE
                   ) -> TaskSignature:
    """The signature of `task` on the agent's frozen base model.

    The subspaces are EVA's (`eva_result`, when it covers `layers` at `eva_config.rank`) or
    `compute_eva` run the same way on the task's data restricted to `layers` (any other
    method, or another rank). Centroids and thresholds come from `calibration_batches`
    fresh windows of the data plus the episode starts a router decides on (the first 1 ..
    context_len steps): calibrated on full windows alone, short start windows look unknown.
    """
    model = agent.model
    paths = find_target_layers(model, layers)
    if eva_result is None or eva_result.means is None or eva_result.config.rank != \
            eva_config.rank or any(p not in eva_result.components for p in paths):
        config = dataclasses.replace(eva_config, target_modules=tuple(paths), progress=False)
        forward, mask_fn = dt_forward_and_mask(model)
        eva_result = compute_eva(model, _sampler_batches(agent, dataset, batch_size,
                                                         max_batches, seed + 7919),
                                 config, forward=forward, mask_fn=mask_fn)
        source = "computed"
    else:
        source = "eva"
    sig = TaskSignature.from_eva(task, eva_result, paths, agent.fingerprint(),
                                 extra={"source": source, "batches": eva_result.batches_used})
    rows, windows, keys = _gather(model, paths, itertools.chain(
        _sampler_batches(agent, dataset, batch_size, calibration_batches, seed + 104_729),
        _episode_start_batches(agent, dataset, batch_size, seed + 15_485_863)))
    sig.centroids = {k: v.mean(0) for k, v in keys.items()}
    sig.calibrate(rows, windows, len(keys["obs"]), quantile)
    return sig


def _gather(model, paths, batches):
    rows: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    windows, keys, offset = [], {"obs": [], "embedding": []}, 0
    for batch in batches:
        r, w, k = base_features(model, paths, batch)
        for p in paths:
            rows[p].append(r[p])
        windows.append(w + offset)
        offset += len(k["obs"])
        for name in keys:
            keys[name].append(k[name])
    return ({p: torch.cat(v) for p, v in rows.items()}, torch.cat(windows),
            {n: torch.cat(v) for n, v in keys.items()})


def save_signature(signature: TaskSignature, task_dir: str | Path) -> Path:
    """Write the signature into ``task_dir/signature/``."""
    return signature.save(Path(task_dir) / SIGNATURE_DIR)


def load_signature(task_dir: str | Path, task: str, fingerprint: str | None = None
                   ) -> TaskSignature:
    """Read ``task_dir/signature/`` (`SignatureError` naming the task and file)."""
    return TaskSignature.load(Path(task_dir) / SIGNATURE_DIR, task=task, fingerprint=fingerprint)


# ------------------------------------------------------------------------- deciding


class RoutedContext(RolloutContext):
    """A rollout context that also remembers each env's routing decisions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        n = int(args[1] if len(args) > 1 else kwargs["n_envs"])
        self.choice: list[str | None] = [None] * n
        self.decisions: list[list[str | None]] = [[] for _ in range(n)]
        self.default_target = 0.0
        super().__init__(*args, **kwargs)
        self.default_target = float(self.target[0]) * self.reward_scale

    def reset(self, rows=None, target_returns=None) -> None:
        super().reset(rows, target_returns)
        for i in self._rows(rows).tolist():
            self.choice[i] = None
            self.decisions[i] = []

    def retarget(self, rows: Sequence[int], targets: Sequence[float]) -> None:
        """Switch the target return of running episodes, as if they had been conditioned on
        it from their start: the return-to-go and every one of it in the context move."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        new = torch.as_tensor(np.asarray(targets, np.float32), device=self.device)
        new = new / self.reward_scale
        shift = new - self.target[idx]
        self.rtg[idx] = torch.minimum(self.rtg[idx] + shift, new)
        held = self.returns_to_go[idx]  # (n, K, 1); empty slots stay 0
        moved = torch.minimum(held + shift[:, None, None], new[:, None, None])
        self.returns_to_go[idx] = torch.where(self.mask[idx, :, None], moved, held)
        self.target[idx] = new


class Router:
    """Chooses an adapter for envs of a `RoutedContext` (one base forward per call) among
    `names`: the tasks with a signature in `signatures`, or for ``arrow`` every adapter of
    the agent (no signatures read)."""

    def __init__(self, agent: DTAgent, config: RouterConfig,
                 signatures: SignaturePool | None = None) -> None:
        if config.router == "oracle":
            raise ValueError("the oracle router needs the task: use agent.set_task(name)")
        self.agent = agent
        self.config = config
        self.signatures = SignaturePool() if signatures is None else signatures
        if config.router == "arrow":  # the adapters' weights alone: no signatures read
            self.names = agent.adapter_names
            if not self.names:
                raise ValueError("no task adapters: the arrow router has nothing to route to")
            self.arrow = arrow_prototypes(agent.model, self.names)
            self.layers = list(self.arrow)
            return
        pool = self.signatures
        if not pool.names:
            raise SignatureError("no task signatures: the agent cannot route (write them with "
                                 "scripts/signatures.py or add them with "
                                 "RoutedAgent.add_signature)")
        adapters = set(agent.adapter_names)
        no_adapter = [n for n in pool.names if n not in adapters]
        if no_adapter:
            raise SignatureError(f"tasks {no_adapter} have a signature but no adapter")
        no_sig = [a for a in agent.adapter_names if a not in pool.names]
        if no_sig:
            raise SignatureError(f"tasks {no_sig} have an adapter but no signature")
        self.layers = list(next(iter(pool.signatures.values())).layers)
        self.names = pool.names

    def targets(self, choices: Sequence[str | None], default: float) -> list[float]:
        return [default if c is None else self.agent.target_returns.get(c, default)
                for c in choices]

    def default_target(self) -> float:
        """The target return before a decision: the largest of the routed tasks'."""
        known = [self.agent.target_returns[n] for n in self.names
                 if n in self.agent.target_returns]
        if not known:
            raise ValueError("no target return for any routed task")
        return max(known)

    @torch.no_grad()
    def choose(self, ctx: RolloutContext, rows: np.ndarray) -> list[str | None]:
        """Adapters for `rows` of `ctx` (after `push_observations`)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=ctx.device)
        filled = int(ctx.mask[idx].sum(dim=1).max())
        w = slice(ctx.context_len - filled, None)
        batch = {"states": ctx.states[idx, w], "actions": ctx.actions[idx, w],
                 "rewards": ctx.rewards[idx, w], "returns_to_go": ctx.returns_to_go[idx, w],
                 "timesteps": ctx.timesteps[idx, w], "mask": ctx.mask[idx, w]}
        model = self.agent.model
        feats, window, keys = base_features(model, self.layers, batch)
        if self.config.router == "arrow":
            votes = arrow_votes(feats, window, len(rows), self.arrow, self.config.arrow_top_k,
                                self.config.arrow_temperature)
            return [self.names[i] for i in votes.argmax(dim=1).tolist()]
        pool = self.signatures
        if self.config.router == "eva":
            return pool.route_subspace(feats, window, len(rows), self.config.score,
                                       self.config.unknown)
        return list(pool.route_centroid(self.config.router, keys[self.config.router]))

    def step(self, ctx: RoutedContext, running: np.ndarray) -> list[str | None]:
        """Decide for the running envs that are due; returns every env's current adapter."""
        seen = ctx.t.cpu().numpy() + 1  # observations of the episode, the current one included
        k = self.config.decide_after
        final = running & ((seen == k) | (self.config.redecide & (seen > k)))
        guess = running & (seen < k) & (self.config.before == "guess")
        rows = np.flatnonzero(final | guess)
        if len(rows):
            chosen = self.choose(ctx, rows)
            for i, c in zip(rows.tolist(), chosen, strict=True):
                ctx.choice[i] = c
                if final[i]:
                    ctx.decisions[i].append(c)
            ctx.retarget(rows, self.targets(chosen, ctx.default_target))
        return list(ctx.choice)


def routed_actions(agent: DTAgent, ctx: RoutedContext, router: Router,
                   running: np.ndarray | None = None) -> np.ndarray:
    """Route the due envs, then one forward per adapter group: the actions of all envs."""
    n = ctx.n_envs
    running = np.ones(n, dtype=bool) if running is None else running
    choice = router.step(ctx, running)
    actions = np.zeros((n, agent.config.act_dim), dtype=np.float32)
    groups: dict[str | None, list[int]] = {}
    for i, c in enumerate(choice):
        groups.setdefault(c, []).append(i)
    for name, rows in groups.items():
        agent.use_adapter(name)
        actions[rows] = ctx.next_actions(rows if len(groups) > 1 else None).cpu().numpy()
    return actions


def episode_routing(ctx: RoutedContext, expected: Sequence[str | None]) -> dict[str, list]:
    """Per env: the adapter it mostly ran with after deciding (``chosen``; None also when
    the episode ended before its decision), whether it decided, the share of correct
    decisions (``correct``; vs `expected`; None for an episode that never decided)."""
    chosen, decided, correct = [], [], []
    for dec, exp in zip(ctx.decisions, expected, strict=True):
        decided.append(bool(dec))
        chosen.append(Counter(dec).most_common(1)[0][0] if dec else None)
        correct.append(float(np.mean([d == exp for d in dec])) if dec else None)
    return {"chosen": chosen, "decided": decided, "correct": correct}


def _mean_decided(correct: Sequence[float | None], decided: Sequence[bool]) -> float | None:
    """Mean routing accuracy of the episodes that decided; None if none did."""
    values = [c for c, d in zip(correct, decided, strict=True) if d and c is not None]
    return float(np.mean(values)) if values else None


def routing_summary(per_task: Mapping[str, Mapping[str, Any]], adapters: Sequence[str]
                    ) -> dict[str, Any]:
    """Overall and per-task accuracy, unknown rate and the confusion matrix (true task x
    chosen adapter, columns `adapters` then ``none``) from `evaluate`'s ``routing`` entries.

    Accuracy is over the episodes that decided (the others ended before the decision):
    None, not 0, where no episode decided; ``undecided_rate`` / ``undecided_per_task``
    give the share of episodes that never decided."""
    cols = [*adapters, "none"]
    tasks = list(per_task)
    confusion = [[0] * len(cols) for _ in tasks]
    acc, unknown, undecided = {}, {}, {}
    all_correct, all_decided, all_unknown = [], [], []
    for i, task in enumerate(tasks):
        r = per_task[task]["routing"]
        for c in r["chosen"]:
            confusion[i][cols.index(c) if c in cols else len(cols) - 1] += 1
        acc[task] = _mean_decided(r["correct"], r["decided"])
        unk = [d and c is None for d, c in zip(r["decided"], r["chosen"], strict=True)]
        unknown[task] = float(np.mean(unk))
        undecided[task] = float(np.mean([not d for d in r["decided"]]))
        all_correct += r["correct"]
        all_decided += r["decided"]
        all_unknown += unk
    return {"accuracy": _mean_decided(all_correct, all_decided), "per_task": acc,
            "unknown_rate": float(np.mean(all_unknown)) if all_unknown else 0.0,
            "unknown_per_task": unknown,
            "undecided_rate": float(np.mean([not d for d in all_decided])) if all_decided
            else 0.0, "undecided_per_task": undecided,
            "confusion": {"rows": tasks, "cols": cols, "counts": confusion}}
