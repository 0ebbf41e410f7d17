"""Arrow's prototypes and token weights (eva_rl.arrow) on our adapters, without PEFT."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_dt

from eva_rl.adapters import AdapterConfig, adapter_layers, add_adapter
from eva_rl.arrow import (
    arrow_prototypes,
    arrow_votes,
    arrow_weights,
    top_right_singular_vector,
    update_factors,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prototype_is_the_top_right_singular_vector_of_the_update():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 20, generator=g), torch.randn(9, 4, generator=g)
    v = top_right_singular_vector(a, b)
    dense = torch.linalg.svd((b @ a).double()).Vh[0].float()
    assert v.shape == (20,) and abs(float(v.norm()) - 1.0) < 1e-6
    assert min(float((v - dense).abs().max()), float((v + dense).abs().max())) < 1e-6
    assert float(v[v.abs().argmax()]) > 0  # the sign convention
    assert top_right_singular_vector(a, torch.zeros(9, 4)) is None  # B = 0: no update


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "olora", "adalora"])
@torch.no_grad()
def test_update_factors_give_the_adapters_low_rank_update(method):
    model = tiny_dt(0)
    add_adapter(model, "t", AdapterConfig(method=method, rank=3, alpha=6.0))
    g = torch.Generator().manual_seed(1)
    for layer in adapter_layers(model).values():
        layer.lora_B["t"].add_(torch.randn(layer.lora_B["t"].shape, generator=g))
        if "t" in layer.lora_E:  # AdaLoRA's singular values start at 0
            layer.lora_E["t"].normal_(generator=g)
        a, b = update_factors(layer, "t")
        if method == "dora":  # the low-rank update of the direction (PEFT's Arrow reads A, B)
            expected = layer.scaling["t"] * layer.lora_B["t"] @ layer.lora_A["t"]
        else:  # the whole update, offsets (PiSSA, OLoRA) and singular values (AdaLoRA) in
            expected = layer.variant("t").delta_weight(layer, "t", layer.weight)
        assert float(expected.abs().max()) > 0
        assert float((layer.scaling["t"] * b @ a - expected).abs().max()) < 1e-5


def test_rank_zero_and_zero_updates_have_no_prototype():
    model = tiny_dt(0)
    paths = list(dict(model.named_modules()))
    q0, fc0 = "blocks.0.attn.q_proj", "blocks.0.mlp.fc_in"
    assert q0 in paths and fc0 in paths
    g = torch.Generator().manual_seed(2)
    d = model.config.n_embd
    add_adapter(model, "a", AdapterConfig(rank=2), lora_A={q0: torch.randn(2, d, generator=g),
                                                            fc0: torch.randn(2, d, generator=g)})
    add_adapter(model, "b", AdapterConfig(rank=2), lora_A={q0: torch.randn(2, d, generator=g),
                                                            fc0: torch.zeros(0, d)})  # rank 0
    with pytest.raises(ValueError, match="no non-zero update on any layer"):
        arrow_prototypes(model, ["a", "b"])  # B = 0 everywhere: nothing to route by
    layers = adapter_layers(model)
    with torch.no_grad():
        for name in ("a", "b"):
            layers[q0].lora_B[name].normal_(generator=g)
        layers[fc0].lora_B["a"].normal_(generator=g)
    protos = arrow_prototypes(model, ["a", "b"])
    assert list(protos) == [q0, fc0]
    assert protos[q0].valid.tolist() == [True, True]
    assert protos[fc0].valid.tolist() == [True, False]  # "b" has rank 0 on fc_in
    assert float(protos[fc0].prototypes[1].abs().max()) == 0.0
    x = torch.randn(7, d, generator=g)
    w = arrow_weights(x, protos[fc0], top_k=3)  # top_k above the adapters that have one
    assert torch.equal(w[:, 1], torch.zeros(7)) and torch.allclose(w[:, 0], torch.ones(7))


def test_weights_are_a_top_k_softmax_of_absolute_projections():
    g = torch.Generator().manual_seed(3)
    protos = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    from eva_rl.arrow import ArrowLayer

    layer = ArrowLayer(protos, torch.ones(5, dtype=torch.bool))
    x = torch.randn(11, 8, generator=g)
    w = arrow_weights(x, layer, top_k=2, temperature=0.5)
    assert torch.allclose(w.sum(1), torch.ones(11))
    assert ((w > 0).sum(1) == 2).all()
    sim = (x @ protos.T).abs()
    top = sim.topk(2, dim=1)
    expected = torch.softmax(top.values / 0.5, dim=1)
    assert torch.allclose(w.gather(1, top.indices), expected, atol=1e-6)
    assert torch.allclose(arrow_weights(-x, layer, 2, 0.5), w)  # sign-free
    window = torch.tensor([0] * 4 + [1] * 7)
    votes = arrow_votes({"l": x, "m": x}, window, 2, {"l": layer, "m": layer}, 2, 0.5)
    assert votes.shape == (2, 5) and votes.sum(1).tolist() == pytest.approx([8.0, 14.0])
    assert torch.allclose(votes[0], 2 * w[:4].sum(0).double())
    with pytest.raises(ValueError, match="top_k"):
        arrow_weights(x, layer, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        arrow_weights(x, layer, temperature=0.0)
