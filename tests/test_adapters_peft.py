"""Oracle tests: our adapters against Hugging Face PEFT (0.21) on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from eva_rl.adapters import AdapterConfig, adapter_layers, add_adapter, merge_adapter

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


LAYERS = ("fc1", "fc2", "fc3")


class Net(nn.Module):
    """Three linears of different shapes; PEFT targets them by name, we by `blocks.*`."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({
            "fc1": nn.Linear(12, 20), "fc2": nn.Linear(20, 16, bias=False), "fc3": nn.Linear(16, 7),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.blocks["fc1"](x))
        x = torch.tanh(self.blocks["fc2"](x))
        return self.blocks["fc3"](x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build(method: str, rank: int = 4, alpha: float = 6.0, dropout: float = 0.0, rslora=False,
          init=True):
    """(ours, PEFT's) on one random base; `init` is PEFT's `init_lora_weights`."""
    torch.manual_seed(0)
    base = Net()
    ours = copy.deepcopy(base)
    cfg = AdapterConfig(method=method, rank=rank, alpha=alpha, dropout=dropout, use_rslora=rslora)
    add_adapter(ours, "t", cfg)
    peft_cfg = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LAYERS),
        use_dora=method == "dora", use_rslora=rslora, init_lora_weights=init,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    return base, ours, theirs


def peft_layer(theirs, name: str):
    return theirs.base_model.model.blocks[name]


def copy_ours_into_peft(ours, theirs) -> None:
    """Random non-zero A, B (and magnitude) in ours, copied into PEFT's adapter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in LAYERS:
            layer, pl = ours.blocks[name], peft_layer(theirs, name)
            for p in (layer.lora_A["t"], layer.lora_B["t"]):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            pl.lora_A["default"].weight.copy_(layer.lora_A["t"])
            pl.lora_B["default"].weight.copy_(layer.lora_B["t"])
            if "t" in layer.lora_magnitude_vector:
                m = layer.lora_magnitude_vector["t"]
                m.mul_(torch.rand(m.shape, generator=g) + 0.5)
                pl.lora_magnitude_vector["default"].weight.copy_(m)
            assert pl.scaling["default"] == pytest.approx(layer.scaling["t"], rel=1e-12)


def our_params(model, name):
    layer = model.blocks[name]
    m = layer.lora_magnitude_vector["t"] if "t" in layer.lora_magnitude_vector else None
    return {"A": layer.lora_A["t"], "B": layer.lora_B["t"], "m": m}


def peft_params(model, name):
    pl = peft_layer(model, name)
    mags = pl.lora_magnitude_vector
    m = mags["default"].weight if "default" in mags else None
    return {"A": pl.lora_A["default"].weight, "B": pl.lora_B["default"].weight, "m": m}


@pytest.mark.parametrize(
    "method,rslora", [("lora", False), ("lora", True), ("dora", False), ("dora", True)]
)
def test_outputs_and_gradients_match_peft(method: str, rslora: bool) -> None:
    _, ours, theirs = build(method, rslora=rslora)
    if method == "dora":  # same initial magnitude (row norms of W) before any copying
        for name in LAYERS:
            torch.testing.assert_close(
                our_params(ours, name)["m"], peft_params(theirs, name)["m"], rtol=1e-6, atol=0
            )
    copy_ours_into_peft(ours, theirs)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 9, 12, generator=g)
    upstream = torch.randn(5, 9, 7, generator=g)
    results = []
    for model, params in ((ours, our_params), (theirs, peft_params)):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (y * upstream).sum().backward()
        gr = {
            f"{n}.{k}": p.grad for n in LAYERS for k, p in params(model, n).items() if p is not None
        }
        results.append((y.detach(), xi.grad, gr))
    (y_o, gx_o, g_o), (y_p, gx_p, g_p) = results
    assert rel_err(y_o, y_p) < 1e-5
    assert rel_err(gx_o, gx_p) < 1e-5
    assert g_o.keys() == g_p.keys() and len(g_o) == (9 if method == "dora" else 6)
    for key in g_o:
        assert rel_err(g_o[key], g_p[key]) < 1e-5, key


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_matches_peft_under_the_same_seed(method: str) -> None:
    _, ours, theirs = build(method, dropout=0.3)
    copy_ours_into_peft(ours, theirs)
    x = torch.randn(4, 12)
    ours.train()
    theirs.train()
    torch.manual_seed(7)
    y_o = ours(x)
    torch.manual_seed(7)
    y_p = theirs(x)
    assert rel_err(y_o, y_p) < 1e-5
    ours.eval()
    theirs.eval()
    assert rel_err(ours(x), theirs(x)) < 1e-5


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_weights_match_peft(method: str) -> None:
    _, ours, theirs = build(method)
    copy_ours_into_peft(ours, theirs)
    merge_adapter(ours, "t")
    merged = theirs.merge_and_unload()
    for name in LAYERS:
        w_o, w_p = ours.blocks[name].weight, merged.blocks[name].weight
        assert rel_err(w_o, w_p) < 1e-5, name
    x = torch.randn(3, 12)
    assert rel_err(ours.eval()(x), merged(x)) < 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("alpha", [4.0, 10.0])
def test_weight_driven_inits_match_peft(init: str, alpha: float) -> None:
    base, ours, theirs = build(init, rank=4, alpha=alpha, init=init)
    for name in LAYERS:
        layer, pl = ours.blocks[name], peft_layer(theirs, name)
        s = layer.scaling["t"]
        assert pl.scaling["default"] == pytest.approx(s)
        w = base.blocks[name].weight
        ba_o = layer.lora_B["t"] @ layer.lora_A["t"]
        ba_p = pl.lora_B["default"].weight @ pl.lora_A["default"].weight
        assert rel_err(ba_o, ba_p) < 1e-5, name  # signs of SVD/QR factors cancel in B·A
        residual_o = w + layer.variant("t").delta_weight(layer, "t", w) - s * ba_o
        residual_p = pl.base_layer.weight  # PEFT edits the base into the residual
        assert rel_err(residual_o, residual_p) < 1e-5, name
        eff_p = residual_p + s * ba_p
        torch.testing.assert_close(layer.effective_weight("t"), eff_p, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.effective_weight("t"), w, rtol=0, atol=1e-5)
        assert torch.equal(layer.weight, w)  # ours keeps the shared base intact
    x = torch.randn(6, 12)
    assert rel_err(ours(x), theirs(x)) < 1e-5
    assert len(adapter_layers(ours)) == 3
