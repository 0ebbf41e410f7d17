"""The fine-tuning methods of the CW10 experiment: one registry, the only place method names
are listed.

A method is an adapter variant (`eva_rl.adapters`; None = full fine-tuning) plus an
`agents.initializers.Initializer` that adds and initialises each task's adapter (the
variant's own init, or a data-driven one such as EVA). A new method is one `register_method`
call; nothing else needs to know its name.

    method = get_method("eva_dora")   # adapter="dora", initializer=EvaInit()
    methods = parse_methods("lora,eva")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.initializers import AdapterInit, CordaInit, EvaInit, Initializer, LoraGaInit
from eva_rl.adapters import VARIANTS, AdapterConfig


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: which adapter kind, and how a task's adapter is initialised."""

    name: str
    """Name on the command line and in reports."""
    adapter: str | None
    """Adapter kind for `add_adapter` (`lora`, `dora`, `pissa`, `olora`, `adalora`);
    None = full FT."""
    initializer: Initializer = field(default_factory=AdapterInit)
    """How a task's new adapter is added and initialised (`agents.initializers`)."""
    description: str = ""
    settings: tuple[tuple[str, Any], ...] = ()
    """Fine-tuning settings the method fixes, whatever the run's config says:
    ``(("eva_token_types", ("state",)),)`` (flat names: `agents.finetune_config.FLAT_FIELDS`)."""

    @property
    def is_full(self) -> bool:
        """True for full fine-tuning (no adapter: every weight trains)."""
        return self.adapter is None

    @property
    def has_budget(self) -> bool:
        """True where the adapter's rank shrinks to a budget while it trains (AdaLoRA's
        variant says so): it starts at `AdaLoraSettings.initial_rank` and the budget
        allocator runs in the training loop (`agents.finetune.AdaLoraBudget`)."""
        return self.adapter is not None and VARIANTS[self.adapter].has_budget

    @property
    def eva(self) -> bool:
        """True where EVA initialises the adapter (its result is saved in the task's ``eva/``)."""
        return isinstance(self.initializer, EvaInit)

    @property
    def min_rho(self) -> float:
        """Smallest EVA rho the method runs with (its initializer's)."""
        return self.initializer.min_rho

    def adapter_config(self, rank: int, alpha: float, **kwargs) -> AdapterConfig:
        """The `AdapterConfig` of one task's adapter (not used for `fft`)."""
        if self.adapter is None:
            raise ValueError(f"method {self.name!r} trains the full model, it has no adapter")
        return AdapterConfig(method=self.adapter, rank=rank, alpha=alpha, **kwargs)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to `METHODS` (a name already there is an error)."""
    key = method.name.strip().lower()
    if key != method.name or not key or "," in key:
        raise ValueError(f"method name {method.name!r} must be lower case, without commas "
                         "or surrounding spaces")
    if key in METHODS:
        raise ValueError(f"method {key!r} is already registered")
    METHODS[key] = method
    return method


for _method in (
    Method("fft", None, description="full fine-tuning of every weight"),
    Method("lora", "lora", description="LoRA, random A (Kaiming), B = 0"),
    Method("dora", "dora", description="DoRA: magnitude vector x normalised LoRA direction"),
    Method("pissa", "pissa", description="PiSSA: A, B from the top SVD of W; residual base"),
    Method("olora", "olora", description="OLoRA: A, B from a QR decomposition of W"),
    Method("adalora", "adalora", description="AdaLoRA: SVD-form P diag(E) Q whose singular "
           "values are masked to a shrinking rank budget by importance"),
    Method("eva", "lora", EvaInit(), description="EVA: A = top right-singular vectors of the "
           "task's activations, B = 0"),
    Method("eva_dora", "dora", EvaInit(), description="EVA-initialised DoRA"),
    # with rho = 1 EVA computes exactly r components per layer and "the lowest r" would be
    # the same set as "the top r"; rho >= 2 makes it pick the lower half
    Method("eva_reverse", "lora", EvaInit(name="eva_reverse", reverse=True, min_rho=2.0),
           description="ablation: EVA with the lowest-variance computed components"),
    # EVA on the Decision Transformer's interleaved token stream: which rows enter, what is
    # centred, and how large A's rows are (the tuned `eva` takes these from the config)
    Method("eva_state", "lora", EvaInit(), description="EVA on state tokens only",
           settings=(("eva_token_types", ("state",)),)),
    Method("eva_type_centered", "lora", EvaInit(), description="EVA with each token type's "
           "mean removed before the SVD", settings=(("eva_center", "token_type"),)),
    Method("eva_lora_norm", "lora", EvaInit(), description="ablation: EVA's directions with "
           "LoRA's row norm", settings=(("eva_row_norm", "lora"),)),
    Method("corda_ipm", "lora", CordaInit("ipm"), description="CorDA IPM: A, B from the top "
           "r components of W times the task's input covariance; residual W in an offset"),
    Method("corda_kpm", "lora", CordaInit("kpm"), description="CorDA KPM: the smallest r "
           "components (knowledge-preserved); residual W in an offset"),
    Method("lora_ga", "lora", LoraGaInit(), description="LoRA-GA: A, B from the SVD of the "
           "task's loss gradient w.r.t. W; W - s B A in an offset"),
):
    register_method(_method)


def get_method(name: str) -> Method:
    """The registered method ``name``; unknown -> ``ValueError`` listing the valid names."""
    try:
        return METHODS[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; valid methods: {', '.join(METHODS)}"
        ) from None


def parse_methods(spec: str | Sequence[str]) -> tuple[Method, ...]:
    """``"lora,eva"`` or ``["lora", "eva"]`` -> methods (order kept, duplicates dropped)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no method given; valid methods: {', '.join(METHODS)}")
    out: dict[str, Method] = {}
    for n in names:
        m = get_method(n)
        out.setdefault(m.name, m)
    return tuple(out.values())
