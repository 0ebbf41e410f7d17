"""The settings of a fine-tuning run, nested by concern (CleanRL's ``Args``, in groups):

    config = get_config("cpu").replace(steps=300, eva_token_types=("state",))
    config.train.lr, config.adapter.rank, config.eva.rho, config.adalora.tinit,
    config.eval.episodes, config.routing.router

`FinetuneConfig` holds the optimisation (``train``, a `TrainConfig`), full fine-tuning's
learning rate, one small frozen dataclass per concern (`AdapterSettings`, `EvaSettings`,
`AdaLoraSettings`, `EvalSettings`, `RoutingSettings`) and ``method_settings``.

Every setting also has one flat name (`FLAT_FIELDS`: ``rank``, ``eva_token_types``,
``adalora_orth_weight``, ``final_eval_episodes``, ``lr``, ...): the name ``replace``,
``method_settings``, tuning grids and the command line (``--eva-token-types``) use, and
the key of runs recorded before the settings were nested. `FinetuneConfig.from_dict`
reads both forms, and records are compared as settings (`FinetuneConfig.differences`), so
an old flat record equals the same settings written nested. Errors name a setting by its
flat name.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agents.methods import Method, get_method
from agents.routing import RouterConfig
from agents.runs import experiment_differences
from eva_rl.adapters import AdaLoraSchedule
from eva_rl.schema import check_known_fields
from eva_rl.training import TrainConfig

EVA_CENTERS = ("mean", "token_type")
EVA_ROW_NORMS = ("unit", "lora")


def _check_int(name: str, value: Any, low: int, none_ok: bool = False) -> None:
    """``value`` must be an integer >= ``low`` (or None where ``none_ok``)."""
    if value is None and none_ok:
        return
    either = " (or None)" if none_ok else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{either}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}{either}, got {value}")


def _check_finite(name: str, value: Any) -> None:
    try:
        finite = not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class AdapterSettings:
    """The task adapter of every adapter method (``fft`` has none)."""

    rank: int = 4
    """Adapter rank r (EVA: the average rank, budget N * r; AdaLoRA: the average rank it
    prunes to). The paper tried 2-16; 4 was EVA+DoRA's best rank there and is cheap on CPU
    for 128-wide models."""
    alpha: float = 1.0
    """LoRA alpha (paper: 1), so the scale is alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""

    def __post_init__(self) -> None:
        _check_int("rank", self.rank, 1)
        _check_finite("alpha", self.alpha)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        _check_finite("dropout", self.dropout)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class EvaSettings:
    """EVA's initialisation (the ``eva*`` methods) and the task windows that every
    data-driven initializer (CorDA and LoRA-GA too: the batches and token types) and the
    routing signatures read."""

    rho: float = 1.0
    """EVA redistribution factor (paper: no gain from rho = 2 in RL, so uniform rank)."""
    tau: float = 0.99
    """EVA convergence threshold (cosine similarity of consecutive components)."""
    batch_size: int = 32
    """Windows per EVA forward pass."""
    max_batches: int = 50
    """Cap on EVA forward passes."""
    token_types: tuple[str, ...] | None = None
    """Token types whose activations enter EVA (None = every real token)."""
    center: str = "mean"
    """What EVA removes from the activations before the SVD: ``mean`` (their mean: the
    paper's incremental PCA) or ``token_type`` (each token type's own mean, so that the
    components describe variation within state, return, action and reward tokens rather
    than which kind of token a row is)."""
    row_norm: str = "unit"
    """Norm of EVA's A rows: ``unit`` (the principal directions, as the paper) or ``lora``
    (rescaled to LoRA's Kaiming row norm 1/sqrt(3): the ablation that separates EVA's
    directions from the size of its first steps)."""
    whiten: bool = False
    """Divide each of EVA's A rows by the square root of its singular value (PEFT's
    ``whiten``)."""

    def __post_init__(self) -> None:
        if self.token_types is not None:
            object.__setattr__(self, "token_types", tuple(self.token_types))
        _check_finite("rho", self.rho)
        if not self.rho >= 1:
            raise ValueError(f"rho must be >= 1, got {self.rho!r}")
        _check_finite("tau", self.tau)
        if not 0 <= self.tau <= 1:
            raise ValueError(f"tau must be in [0, 1], got {self.tau!r}")
        _check_int("eva_batch_size", self.batch_size, 1)
        _check_int("eva_max_batches", self.max_batches, 1)
        _check_choice("eva_center", self.center, EVA_CENTERS)
        _check_choice("eva_row_norm", self.row_norm, EVA_ROW_NORMS)


@dataclass(frozen=True)
class AdaLoraSettings:
    """AdaLoRA's rank budget: the adapter starts at an initial rank and is pruned to the
    adapter rank on average while it trains (PEFT's ``AdaLoraConfig``)."""

    init_rank: int | None = None
    """AdaLoRA's initial rank per layer, pruned to ``rank`` on average (None = 1.5 x rank,
    the ratio of PEFT's example: 12 -> 8)."""
    tinit: float = 0.1
    """AdaLoRA: share of the updates at the full initial budget before any pruning."""
    tfinal: float = 0.2
    """AdaLoRA: share of the updates at the end with the allocation frozen."""
    delta_t: int = 10
    """AdaLoRA: updates between two re-allocations during the budget phase."""
    orth_weight: float = 0.5
    """AdaLoRA: weight of the orthogonality regulariser of P and Q in the loss (PEFT's
    ``orth_reg_weight``; sized for a language model's loss, it is most of a Decision
    Transformer's smaller action loss)."""

    def __post_init__(self) -> None:
        _check_int("adalora_init_rank", self.init_rank, 1, none_ok=True)
        _check_finite("adalora_tinit", self.tinit)
        _check_finite("adalora_tfinal", self.tfinal)
        if not (0 <= self.tinit and 0 <= self.tfinal and self.tinit + self.tfinal < 1):
            raise ValueError("adalora_tinit and adalora_tfinal must be >= 0 with a sum below 1, "
                             f"got {self.tinit} and {self.tfinal}")
        _check_int("adalora_delta_t", self.delta_t, 1)
        _check_finite("adalora_orth_weight", self.orth_weight)
        if self.orth_weight < 0:
            raise ValueError(f"adalora_orth_weight must be >= 0, got {self.orth_weight}")

    def initial_rank(self, rank: int) -> int:
        """The rank a new adapter starts with when it prunes to ``rank`` on average."""
        return self.init_rank or math.ceil(1.5 * rank)

    def schedule(self, steps: int, target_rank: int) -> AdaLoraSchedule:
        """The budget schedule over one task's ``steps`` updates, pruning to ``target_rank``."""
        return AdaLoraSchedule(total_steps=steps, target_rank=target_rank,
                               tinit=int(self.tinit * steps), tfinal=int(self.tfinal * steps),
                               delta_t=self.delta_t, orth_reg_weight=self.orth_weight)


@dataclass(frozen=True)
class EvalSettings:
    """How each task is evaluated while it trains (its success curve) and after (its final
    success, and the success-matrix rows of ``sequential``); shared by every method."""

    every: int = 100
    """Evaluate the task every this many updates for its success curve (0 = only at the end)."""
    at_start: bool = True
    """Also evaluate before the first update (the curve's step 0: transfer at the start)."""
    episodes: int = 10
    """Episodes per task and evaluation of the success curve."""
    final_episodes: int | None = None
    """Episodes of the evaluation after the last update, the task's final success and the
    success-matrix rows of ``sequential`` (None = ``eval_episodes``)."""
    max_episode_steps: int = 200
    """Episode horizon (Continual World and the paper: 200)."""
    stop_on_success: bool = False
    """End evaluation episodes at their first success (the same success rates, for a good
    policy a fraction of the env steps; returns then count up to the success)."""

    def __post_init__(self) -> None:
        _check_int("eval_every", self.every, 0)
        _check_int("eval_episodes", self.episodes, 1)
        _check_int("final_eval_episodes", self.final_episodes, 1, none_ok=True)
        _check_int("max_episode_steps", self.max_episode_steps, 1)

    @property
    def final_episode_count(self) -> int:
        """Episodes of the final evaluation of a task (``final_episodes`` or ``episodes``)."""
        return self.final_episodes or self.episodes


@dataclass(frozen=True)
class RoutingSettings:
    """How every evaluation after a task of ``sequential`` picks adapters among those
    trained so far; shared by every method."""

    router: str = "oracle"
    """``oracle`` (told the task), ``eva``, ``obs``, ``embedding`` or ``arrow``
    (`agents.routing`). Any but ``oracle`` also writes each task's routing signature
    (scripts/signatures.py writes them later for a run without)."""
    after: int = 5
    """Observations of an episode seen before the router decides (the base model acts
    until then)."""
    redecide: bool = False
    """Let the router decide again at every later step."""
    signature_rank: int | None = None
    """Components per layer of each task's routing signature; None: ``rank`` (EVA methods
    then reuse their own components at no cost)."""

    def __post_init__(self) -> None:
        _check_int("routing_after", self.after, 1)
        _check_int("signature_rank", self.signature_rank, 1, none_ok=True)
        self.router_config()  # an unknown router -> the valid ones

    def router_config(self) -> RouterConfig:
        """The `RouterConfig` of these settings."""
        return RouterConfig(router=self.router, decide_after=self.after,
                            redecide=self.redecide)


def _finetune_train_config() -> TrainConfig:
    """The optimisation defaults of fine-tuning (TrainConfig's own are pretraining's)."""
    return TrainConfig(steps=300, batch_size=32, lr=1e-3, warmup_steps=30, checkpoint_every=100,
                       keep_checkpoints=2)


GROUPS: dict[str, type] = {"train": TrainConfig, "adapter": AdapterSettings,
                           "eva": EvaSettings, "adalora": AdaLoraSettings,
                           "eval": EvalSettings, "routing": RoutingSettings}
"""The nested settings of `FinetuneConfig`: its field name -> the dataclass."""

FLAT_FIELDS: dict[str, tuple[str, str]] = {
    **{f.name: ("train", f.name) for f in dataclasses.fields(TrainConfig)},
    "rank": ("adapter", "rank"), "alpha": ("adapter", "alpha"),
    "dropout": ("adapter", "dropout"),
    "rho": ("eva", "rho"), "tau": ("eva", "tau"), "eva_batch_size": ("eva", "batch_size"),
    "eva_max_batches": ("eva", "max_batches"), "eva_token_types": ("eva", "token_types"),
    "eva_center": ("eva", "center"), "eva_row_norm": ("eva", "row_norm"),
    "eva_whiten": ("eva", "whiten"),
    "adalora_init_rank": ("adalora", "init_rank"), "adalora_tinit": ("adalora", "tinit"),
    "adalora_tfinal": ("adalora", "tfinal"), "adalora_delta_t": ("adalora", "delta_t"),
    "adalora_orth_weight": ("adalora", "orth_weight"),
    "eval_every": ("eval", "every"), "eval_at_start": ("eval", "at_start"),
    "eval_episodes": ("eval", "episodes"), "final_eval_episodes": ("eval", "final_episodes"),
    "max_episode_steps": ("eval", "max_episode_steps"),
    "eval_stop_on_success": ("eval", "stop_on_success"),
    "routing": ("routing", "router"), "routing_after": ("routing", "after"),
    "routing_redecide": ("routing", "redecide"),
    "signature_rank": ("routing", "signature_rank"),
}
"""Flat name of every nested setting -> (group, field): the names of ``replace``,
``method_settings``, tuning grids, the command-line flags (``--eva-token-types``) and the
keys of configs recorded before the settings were nested."""

OWN_FIELDS = ("fft_lr", "method_settings")
"""`FinetuneConfig`'s own settings (in no group; their flat name is their name)."""

SHARED_SETTINGS = frozenset(
    {name for name, (group, _) in FLAT_FIELDS.items() if group in ("eval", "routing")}
    | {"method_settings", "seed", "progress", "device"})
"""Settings every method of a run shares (its evaluation and routing): not per method."""

_LATER_FIELDS = {"routing": "oracle", "routing_after": 5, "routing_redecide": False,
                 "final_eval_episodes": None, "eval_stop_on_success": False,
                 "signature_rank": None, "eva_center": "mean", "eva_row_norm": "unit",
                 "eva_whiten": False, "adalora_orth_weight": 0.5, "method_settings": {}}
"""Settings added after runs were recorded flat, with the value those runs ran with (their
records omit them)."""


@dataclass
class FinetuneConfig:
    """Fine-tuning settings shared by every method and task of an experiment.

    ``train`` holds the optimisation (updates, batch, learning rate of adapter methods,
    schedule, clipping, precision, device, checkpoints); its ``seed`` is replaced per task.
    ``replace`` takes every setting by its flat name (``cfg.replace(steps=50, rank=8)``).
    """

    train: TrainConfig = dataclasses.field(default_factory=_finetune_train_config)
    """Trainer settings of one task (``lr`` is the adapter methods' peak learning rate)."""
    fft_lr: float = 3e-4
    """Peak learning rate of full fine-tuning (all weights move, so smaller)."""
    adapter: AdapterSettings = dataclasses.field(default_factory=AdapterSettings)
    """The task adapter: rank, alpha, dropout."""
    eva: EvaSettings = dataclasses.field(default_factory=EvaSettings)
    """EVA and the task windows of every data-driven initializer."""
    adalora: AdaLoraSettings = dataclasses.field(default_factory=AdaLoraSettings)
    """AdaLoRA's rank budget."""
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    """Evaluation while and after each task trains."""
    routing: RoutingSettings = dataclasses.field(default_factory=RoutingSettings)
    """Routing among the task adapters under ``sequential``."""
    method_settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Settings of single methods over the shared ones, e.g. ``{"eva": {"lr": 3e-3}}``
    (each method's own, chosen on held-out tasks; flat names, except the evaluation and
    routing settings, which every method shares)."""

    def __post_init__(self) -> None:
        for name, cls in GROUPS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                check_known_fields(cls, value, f"{name} settings")
                value = cls(**value)
                setattr(self, name, value)
            if not isinstance(value, cls):
                raise ValueError(f"{name} must be {cls.__name__} settings, got {value!r:.80}")
        _check_finite("fft_lr", self.fft_lr)
        if not self.fft_lr > 0:
            raise ValueError(f"fft_lr must be > 0, got {self.fft_lr}")
        if self.adalora.init_rank is not None and self.adalora.init_rank < self.adapter.rank:
            raise ValueError(f"adalora_init_rank ({self.adalora.init_rank}) must be >= rank "
                             f"({self.adapter.rank}), the target it is pruned to")
        self.method_settings = {m: dict(v) for m, v in dict(self.method_settings).items()}
        for name, settings in self.method_settings.items():
            self._check_method_settings(name, settings)

    def _check_method_settings(self, name: str, settings: Mapping[str, Any]) -> None:
        get_method(name)  # unknown -> the valid names
        shared = sorted(set(settings) & SHARED_SETTINGS)
        if shared:
            raise ValueError(f"method_settings[{name!r}]: {', '.join(shared)} are shared by "
                             "every method of a run and cannot be set per method")
        unknown = sorted(set(settings) - set(FLAT_FIELDS) - {"fft_lr"})
        if unknown:
            raise ValueError(f"method_settings[{name!r}]: unknown fine-tuning settings: "
                             f"{', '.join(unknown)}")
        self.replace(method_settings={}, **settings)  # bad values -> their error

    def for_method(self, method: Method) -> FinetuneConfig:
        """The settings ``method`` trains with: these, its entry of ``method_settings``, then
        the settings the method itself fixes (`Method.settings`)."""
        changes = {**self.method_settings.get(method.name, {}), **dict(method.settings)}
        return self.replace(**changes) if changes else self

    @property
    def routing_signature_rank(self) -> int:
        """Components per layer of the routing signatures: ``signature_rank`` or ``rank``."""
        sig = self.routing.signature_rank
        return self.adapter.rank if sig is None else sig

    def adapter_rank(self, method: Method) -> int:
        """The rank a new adapter of ``method`` starts with (a budgeted adapter, AdaLoRA's:
        its initial rank, pruned to ``rank`` while it trains)."""
        if method.has_budget:
            return self.adalora.initial_rank(self.adapter.rank)
        return self.adapter.rank

    def flat_settings(self) -> dict[str, Any]:
        """Every setting under its flat name (`FLAT_FIELDS` and ``fft_lr``, in the order of
        the fields, then ``method_settings``): the names ``replace`` takes."""
        flat = {name: getattr(getattr(self, group), field)
                for name, (group, field) in FLAT_FIELDS.items() if group == "train"}
        flat["fft_lr"] = self.fft_lr
        flat.update({name: getattr(getattr(self, group), field)
                     for name, (group, field) in FLAT_FIELDS.items() if group != "train"})
        return {**flat, "method_settings": self.method_settings}

    def differences(self, recorded: Any) -> list[str]:
        """``name: old -> new`` (flat names) for every setting of the ``recorded`` config (a
        ``to_dict``, flat or nested) that differs from these and that a resume may not
        change (all but ``progress`` and ``device``); one entry if it does not read."""
        try:
            old = FinetuneConfig.from_dict(recorded)
        except (TypeError, ValueError) as err:
            return [f"unreadable fine-tuning settings ({err})"]
        return experiment_differences(old.flat_settings(), self.flat_settings())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy, nested as the fields are."""
        d: dict[str, Any] = {"train": self.train.to_dict(), "fft_lr": self.fft_lr}
        for name in GROUPS:
            if name != "train":
                d[name] = {k: list(v) if isinstance(v, tuple) else v
                           for k, v in dataclasses.asdict(getattr(self, name)).items()}
        d["method_settings"] = copy.deepcopy(self.method_settings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinetuneConfig:
        """Inverse of ``to_dict``; also reads the flat form runs recorded before the
        settings were nested (a key per setting, `FLAT_FIELDS`, and ``train``; settings
        added since take the value those runs ran with). A flat key next to the groups
        (a hand edit) applies over them. Unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ValueError(f"fine-tuning settings must be an object, got {d!r:.80}")
        if not any(k in GROUPS and k != "train" and isinstance(v, Mapping)
                   for k, v in d.items()):
            d = {**_LATER_FIELDS, **d}  # a flat record
        groups: dict[str, dict[str, Any]] = {}
        own: dict[str, Any] = {}
        unknown = []
        for key, value in d.items():
            if key in GROUPS and isinstance(value, Mapping):
                check_known_fields(GROUPS[key], value, f"{key} settings")
                groups[key] = {**value, **groups.get(key, {})}
            elif key in FLAT_FIELDS and FLAT_FIELDS[key][0] != "train":
                group, field = FLAT_FIELDS[key]
                groups.setdefault(group, {})[field] = value
            elif key in OWN_FIELDS:
                own[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"unknown fine-tuning settings {sorted(unknown)}; valid: the "
                             f"groups {sorted(GROUPS)}, {', '.join(OWN_FIELDS)} or flat names "
                             "of settings")
        return cls(**own, **{name: GROUPS[name](**fields) for name, fields in groups.items()})

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with some settings changed, by their flat names (`FLAT_FIELDS`: ``lr``,
        ``rank``, ``eva_token_types``, ...), ``fft_lr``, ``method_settings``, or a whole
        group (``adapter=AdapterSettings(rank=8)``). None values: "not given"."""
        own: dict[str, Any] = {}
        fields: dict[str, dict[str, Any]] = {}
        unknown = []
        for name, value in changes.items():
            if value is None:
                continue
            if name in GROUPS and isinstance(value, GROUPS[name]):
                own[name] = value
            elif name in FLAT_FIELDS:
                group, field = FLAT_FIELDS[name]
                fields.setdefault(group, {})[field] = value
            elif name in OWN_FIELDS:
                own[name] = value
            else:
                unknown.append(name)
        if unknown:
            raise ValueError(f"unknown fine-tuning settings: {', '.join(sorted(unknown))}")
        for group, values in fields.items():
            own[group] = dataclasses.replace(own.get(group, getattr(self, group)), **values)
        return dataclasses.replace(self, **own)


CONFIGS: dict[str, FinetuneConfig] = {
    # one method over all of CW10 (`single`) in ~5-8 minutes on 2 CPU cores, small DT
    "cpu": FinetuneConfig().replace(eval_every=150, eval_episodes=10),
    # the quickstart and smoke runs: a tiny DT, a few minutes for everything
    "quick": FinetuneConfig().replace(steps=120, warmup_steps=10, checkpoint_every=60,
                                      eval_every=120, eval_episodes=5, eva_max_batches=20),
    # the `bench` tier (agents/tiers.py): every method x CW10 x 3 seeds on 2 CPU cores;
    # lr (adapters: best of 1e-3 / 3e-3 / 1e-2 for lora), fft_lr (1e-3 / 3e-3) and steps
    # chosen on the MT40 tasks held out of its pretraining (docs/results/bench/tuning); 500
    # updates, where the tuning curves bend (lora 0.68 of its 0.79 at 2000): 1000 or 1500
    # updates per cell would not fit the tier's 2.5 h on 2 cores (measured 45-60 s a cell)
    "bench": FinetuneConfig().replace(steps=500, batch_size=64, lr=1e-2, fft_lr=1e-3,
                                      warmup_steps=50, checkpoint_every=250, log_every=50,
                                      eval_every=250, eval_episodes=10, final_eval_episodes=50,
                                      eval_stop_on_success=True, eva_max_batches=20),
    # the EVA paper's fine-tuning (GPU): 100k updates of batch 128, lr 1e-4
    "paper": FinetuneConfig().replace(steps=100_000, batch_size=128, lr=1e-4, fft_lr=1e-4,
                                      warmup_steps=4000, checkpoint_every=5000, log_every=100,
                                      eval_every=10_000, eval_episodes=10, eva_batch_size=128,
                                      eva_max_batches=100),
}


def get_config(name: str) -> FinetuneConfig:
    """A named configuration (a fresh copy); unknown -> one-line error with the names."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; valid configs: {', '.join(CONFIGS)}")
    return copy.deepcopy(CONFIGS[name])
