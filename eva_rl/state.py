"""Save and restore what a borrowed model looks like: train/eval modes, trainable flags and
the active adapter.

Evaluation in the middle of fine-tuning, EVA's pass over the frozen base and similar detours
switch a model to eval mode, freeze it or swap its adapter; they wrap the detour in
`preserve_model_state(model)` so the caller gets the model back exactly as it lent it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from eva_rl.adapters import active_adapter, adapter_layers, set_active_adapter


@contextmanager
def preserve_model_state(model: nn.Module) -> Iterator[nn.Module]:
    """Context: on exit, every module's ``training`` flag, every parameter's
    ``requires_grad`` and the active adapter are what they were on entry (also after an
    exception). Yields ``model``.

    Modules and parameters added inside the block (e.g. a new adapter) keep what they got.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    previous = active_adapter(model)
    try:
        yield model
    finally:
        # the adapter first: switching adapters resets every requires_grad flag
        if adapter_layers(model) and active_adapter(model) != previous:
            set_active_adapter(model, previous)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
