"""Oracle test: our Arrow prototypes and token weights (eva_rl.arrow) against Hugging Face
PEFT's (0.21, `create_arrow_model`) on the same adapters of the same tiny DT."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import dt_batch, tiny_dt

from eva_rl.adapters import AdapterConfig, adapter_layers, add_adapter, export_peft
from eva_rl.arrow import arrow_prototypes, arrow_weights, update_factors

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("t0", "t1", "t2")
TOP_K, TEMPERATURE = 2, 0.5
PEFT_PREFIX = "base_model.model."
ROUTER = ".lora_arrow.arrow_router"


@torch.no_grad()
def three_adapters(method: str):
    """(base, ours): ours holds three `method` adapters with random non-zero updates.

    B's first column is 4x the others, so each update's top singular value stands clear of
    the second and PEFT's 15 power-iteration steps converge (checked below)."""
    base = tiny_dt(0)
    ours = copy.deepcopy(base)
    for name in NAMES:
        add_adapter(ours, name, AdapterConfig(method=method, rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    for layer in adapter_layers(ours).values():
        for name in NAMES:
            b = layer.lora_B[name]
            b.add_(torch.randn(b.shape, generator=g) * torch.tensor([4.0, 1.0, 1.0, 1.0]) * 0.1)
    return base, ours


def peft_arrow(base, ours, tmp_path):
    """PEFT's Arrow model of our adapters (exported, then loaded by `create_arrow_model`),
    and its first forward's per-layer (input, delta) of every Arrow layer."""
    dirs = [str(export_peft(ours, n, tmp_path / n)) for n in NAMES]
    config = peft.ArrowConfig(top_k=TOP_K, router_temperature=TEMPERATURE, rng_seed=0)
    model = peft.create_arrow_model(copy.deepcopy(base), dirs, config).eval()
    caught: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if name.endswith(ROUTER):
            path = name.removeprefix(PEFT_PREFIX).removesuffix(ROUTER)

            def hook(module, args, kwargs, output, path=path):
                caught[path] = (args[0].detach(), output.detach())

            module.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**dt_batch(5))
    return model, caught


def peft_prototypes(model, path: str) -> torch.Tensor:
    """PEFT's prototypes of layer `path`, rows in our adapter order (task_i = NAMES[i])."""
    arrow = model.get_submodule(PEFT_PREFIX + path + ROUTER)
    order = [int(n.removeprefix("task_")) for n in arrow.task_adapter_names]
    protos = torch.zeros_like(arrow.prototypes)
    protos[order] = arrow.prototypes
    return protos


@pytest.mark.parametrize("method", ["lora", "dora", "pissa"])
@torch.no_grad()
def test_prototypes_and_token_weights_equal_peft(method, tmp_path):
    base, ours = three_adapters(method)
    layers = adapter_layers(ours)
    for layer in layers.values():  # a clear spectral gap: PEFT's power iteration converged
        for name in NAMES:
            a, b = update_factors(layer, name)
            s = torch.linalg.svdvals((b @ a).double())
            assert float(s[1] / s[0]) < 0.6
    model, caught = peft_arrow(base, ours, tmp_path)
    ours_protos = arrow_prototypes(ours, NAMES)
    assert set(caught) == set(ours_protos) == set(layers)  # every adapted layer routes
    proto_diff, weight_diff, delta_err = 0.0, 0.0, 0.0
    winners: set[int] = set()
    for path, arrow in ours_protos.items():
        theirs = peft_prototypes(model, path)
        mine = arrow.prototypes
        sign = torch.sign((theirs * mine).sum(1, keepdim=True))  # prototypes are sign-free
        proto_diff = max(proto_diff, float((theirs - sign * mine).abs().max()))
        x, delta = caught[path]
        tok = x.reshape(-1, x.shape[-1])
        w = arrow_weights(tok, arrow, TOP_K, TEMPERATURE)  # (t, E)
        winners |= set(w.argmax(1).tolist())
        # each adapter's own update of every token, then PEFT's weights recovered from its
        # mixed output by least squares: delta = sum_e w_e y_e
        y = torch.stack([layers[path].scaling[n] * (tok.double() @ a.double().T) @ b.double().T
                         for n in NAMES
                         for a, b in [update_factors(layers[path], n)]], dim=2)  # (t, out, E)
        d = delta.reshape(-1, delta.shape[-1]).double()
        recovered = torch.linalg.lstsq(y, d.unsqueeze(-1)).solution.squeeze(-1)  # (t, E)
        weight_diff = max(weight_diff, float((recovered - w.double()).abs().max()))
        mixed = (y * w.double().unsqueeze(1)).sum(2)
        delta_err = max(delta_err, float((mixed - d).abs().max() / d.abs().max()))
    print(f"{method}: max |prototype diff| {proto_diff:.2e}, max |weight diff| "
          f"{weight_diff:.2e}, max relative delta error {delta_err:.2e}")
    assert proto_diff < 1e-5
    assert weight_diff < 1e-4
    assert delta_err < 1e-5
    assert len(winners) >= 2  # the routing is not the same adapter for every token
