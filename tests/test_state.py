"""`preserve_model_state`: modes, trainable flags and the active adapter come back."""

import pytest
from torch import nn

from eva_rl.adapters import AdapterConfig, active_adapter, add_adapter, set_active_adapter
from eva_rl.state import preserve_model_state


def model_with_adapters() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    for name in ("a", "b"):
        add_adapter(model, name, AdapterConfig(rank=2, target_modules=("0", "2")))
    set_active_adapter(model, "a")
    return model


def snapshot(model: nn.Module):
    return ([m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], active_adapter(model))


def test_restores_modes_flags_and_adapter_also_after_an_error():
    model = model_with_adapters()
    model.train()
    model[1].eval()  # per-module modes survive, not only the top one's
    before = snapshot(model)
    assert not model[1].training and any(before[1]) and not all(before[1])
    with pytest.raises(RuntimeError, match="inside"):
        with preserve_model_state(model):
            model.eval()
            set_active_adapter(model, "b")
            model.requires_grad_(True)
            assert snapshot(model) != before
            raise RuntimeError("inside")
    assert snapshot(model) == before
    with preserve_model_state(model):
        set_active_adapter(model, None)
    assert snapshot(model) == before


def test_plain_model_without_adapters():
    model = nn.Linear(3, 3)
    model.weight.requires_grad_(False)
    with preserve_model_state(model) as same:
        assert same is model
        model.eval().requires_grad_(True)
    assert model.training and not model.weight.requires_grad and model.bias.requires_grad
