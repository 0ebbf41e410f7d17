"""The fine-tuning methods of the CW10 experiment, as a registry of small dataclasses.

Every method goes through the shared adapter module (`eva_rl.adapters`); EVA methods
additionally initialise the adapter's ``A`` from the task's activations (`eva_rl.eva`).

    method = get_method("eva_dora")   # adapter="dora", eva=True
    methods = parse_methods("lora,eva")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eva_rl.adapters import AdapterConfig


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: which adapter kind, and whether EVA initialises it."""

    name: str
    """Name on the command line and in reports."""
    adapter: str | None
    """Adapter kind for `add_adapter` (`lora`, `dora`, `pissa`, `olora`, `adalora`);
    None = full FT."""
    eva: bool = False
    """Initialise ``A`` with EVA on the task's data (rank allocation per ``rho``)."""
    reverse: bool = False
    """EVA ablation: keep the *lowest*-variance components instead of the highest."""
    min_rho: float = 1.0
    """Smallest rho the method runs with (reverse needs spare components to choose from)."""
    description: str = ""

    @property
    def is_full(self) -> bool:
        """True for full fine-tuning (no adapter: every weight trains)."""
        return self.adapter is None

    def adapter_config(self, rank: int, alpha: float, **kwargs) -> AdapterConfig:
        """The `AdapterConfig` of one task's adapter (not used for `fft`)."""
        if self.adapter is None:
            raise ValueError(f"method {self.name!r} trains the full model, it has no adapter")
        return AdapterConfig(method=self.adapter, rank=rank, alpha=alpha, **kwargs)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fft", None, description="full fine-tuning of every weight"),
        Method("lora", "lora", description="LoRA, random A (Kaiming), B = 0"),
        Method("dora", "dora", description="DoRA: magnitude vector x normalised LoRA direction"),
        Method("pissa", "pissa", description="PiSSA: A, B from the top SVD of W; residual base"),
        Method("olora", "olora", description="OLoRA: A, B from a QR decomposition of W"),
        Method("adalora", "adalora", description="AdaLoRA: SVD-form P diag(E) Q whose "
               "singular values are masked to a shrinking rank budget by importance"),
        Method("eva", "lora", eva=True, description="EVA: A = top right-singular vectors of "
               "the task's activations, B = 0"),
        Method("eva_dora", "dora", eva=True, description="EVA-initialised DoRA"),
        # with rho = 1 EVA computes exactly r components per layer and "the lowest r" would
        # be the same set as "the top r"; rho >= 2 makes it pick the lower half
        Method("eva_reverse", "lora", eva=True, reverse=True, min_rho=2.0,
               description="ablation: EVA with the lowest-variance computed components"),
    )
}


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
