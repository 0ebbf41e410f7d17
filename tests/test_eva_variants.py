"""EVA on interleaved token streams: centring per group (token type), A's rows at LoRA's
norm, and the named variants that pin them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from agents.initializers import LORA_ROW_NORM
from agents.methods import get_method
from eva_rl.adapters import AdapterConfig, adapter_layers, add_adapter
from eva_rl.eva import EvaConfig, compute_eva
from eva_rl.eva.core import group_means

D = 8


def two_group_batches(n_batches: int = 6, rows: int = 64, seed: int = 0):
    """Rows of two groups whose means differ along e0 by 20 while each varies along e1
    (std 1) and e2..: small noise. ``(x (1, rows, D), groups (1, rows))`` pairs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        groups = torch.arange(rows) % 2
        x = 0.01 * torch.randn(rows, D, generator=g)
        x[:, 0] += 20.0 * groups
        x[:, 1] += torch.randn(rows, generator=g)
        out.append({"x": x.unsqueeze(0), "groups": groups.unsqueeze(0)})
    return out


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, D))


def forward(m, batch):
    return m(batch["x"])


def top_direction(result) -> torch.Tensor:
    return result.components["0"][0].abs()


def test_group_means_are_each_groups_mean_input():
    batches = two_group_batches()
    means = group_means(model(), batches, ["0"], forward, None, lambda b: b["groups"], 100,
                        False)["0"]
    rows = torch.cat([b["x"][0] for b in batches])
    groups = torch.cat([b["groups"][0] for b in batches])
    for k in (0, 1):
        torch.testing.assert_close(means[k], rows[groups == k].mean(0))


def test_centring_per_group_finds_the_variation_within_groups():
    config = EvaConfig(rank=1, rho=1.0, tau=0.0, max_batches=6, target_modules=("0",))
    plain = compute_eva(model(), two_group_batches(), config, forward=forward)
    centred = compute_eva(model(), two_group_batches(), config, forward=forward,
                          group_fn=lambda b: b["groups"])
    assert top_direction(plain)[0] > 0.99  # the between-group direction
    assert top_direction(centred)[1] > 0.99  # the within-group one
    assert centred.means is None and plain.means is not None


def test_centring_per_group_refuses_single_use_batches():
    with pytest.raises(ValueError, match="re-iterable"):
        compute_eva(model(), iter(two_group_batches()), EvaConfig(rank=1, rho=1.0,
                    target_modules=("0",)), forward=forward, group_fn=lambda b: b["groups"])


def test_row_norm_rescales_a_but_keeps_its_directions():
    config = EvaConfig(rank=2, rho=1.0, tau=0.0, max_batches=6, target_modules=("0",))
    unit = compute_eva(model(), two_group_batches(), config, forward=forward)
    scaled = compute_eva(model(), two_group_batches(),
                         EvaConfig(**{**config.to_dict(), "row_norm": LORA_ROW_NORM}),
                         forward=forward)
    a, b = unit.lora_A()["0"], scaled.lora_A()["0"]
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(b.norm(dim=1), torch.full((2,), LORA_ROW_NORM))
    torch.testing.assert_close(b, a * LORA_ROW_NORM)
    with pytest.raises(ValueError, match="row_norm"):
        EvaConfig(row_norm=-1.0)


def test_lora_row_norm_is_the_norm_of_a_lora_init():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256))
    add_adapter(m, "t", AdapterConfig(method="lora", rank=64, target_modules=("0",)))
    norms = adapter_layers(m)["0"].lora_A["t"].detach().norm(dim=1)
    assert math.isclose(float(norms.mean()), LORA_ROW_NORM, rel_tol=0.02)


def test_named_variants_pin_their_settings():
    from agents.finetune_config import FinetuneConfig

    base = FinetuneConfig()
    assert base.for_method(get_method("eva")) is base  # the tuned `eva` follows the config
    assert base.for_method(get_method("eva_state")).eva.token_types == ("state",)
    assert base.for_method(get_method("eva_type_centered")).eva.center == "token_type"
    assert base.for_method(get_method("eva_lora_norm")).eva.row_norm == "lora"
    with pytest.raises(ValueError, match="eva_center must be one of mean, token_type"):
        FinetuneConfig().replace(eva_center="type")
    # old runs' configs (flat, recorded before eva_center) still compare equal
    train = base.to_dict()["train"]
    old = {k: v for k, v in base.flat_settings().items()
           if k not in train and k not in ("eva_center", "eva_row_norm")}
    assert FinetuneConfig.from_dict({**old, "train": train}) == base


def test_settings_per_method_are_the_methods_own():
    from agents.finetune_config import FinetuneConfig

    config = FinetuneConfig(method_settings={"eva": {"lr": 3e-3, "eva_center": "token_type"},
                                             "adalora": {"adalora_orth_weight": 0.0}})
    eva = config.for_method(get_method("eva"))
    assert eva.train.lr == 3e-3 and eva.eva.center == "token_type"
    assert config.for_method(get_method("lora")).train.lr == config.train.lr
    adalora = config.for_method(get_method("adalora")).adalora
    assert adalora.schedule(config.train.steps, 4).orth_reg_weight == 0.0
    # the method's own fixed settings win over the run's entry for it
    pinned = FinetuneConfig(method_settings={"eva_state": {"eva_token_types": ("action",)}})
    assert pinned.for_method(get_method("eva_state")).eva.token_types == ("state",)
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    for bad, needle in (({"evaa": {}}, "unknown method 'evaa'"),
                        ({"eva": {"eval_episodes": 3}}, "shared by every method"),
                        ({"eva": {"lrr": 1.0}}, "unknown fine-tuning settings"),
                        ({"eva": {"eva_center": "x"}}, "eva_center must be one of")):
        with pytest.raises(ValueError, match=needle):
            FinetuneConfig(method_settings=bad)
