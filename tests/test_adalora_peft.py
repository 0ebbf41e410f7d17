"""Oracle tests: our AdaLoRA (variant + allocator) against PEFT's (0.21) on the same weights.

The allocator tests feed both implementations bit-identical parameters and gradients at
every step (the gradients come from our model's real loss and are copied into PEFT's), so
their importance scores, budgets and masks must agree exactly.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from eva_rl.adapters import (
    AdaLoraAllocator,
    AdaLoraSchedule,
    AdapterConfig,
    adapter_layers,
    add_adapter,
    count_parameters,
    merge_adapter,
    orthogonal_regularization,
)
from eva_rl.models import DecisionTransformer, DTConfig

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

FACTORS = {"lora_A": "Q", "lora_E": "Lambda", "lora_B": "P"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Net(nn.Module):
    """Three linears of different shapes; `forward_loss` gives PEFT an `outputs.loss`."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({
            "fc1": nn.Linear(12, 20), "fc2": nn.Linear(20, 16, bias=False), "fc3": nn.Linear(16, 7),
        })

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        h = torch.tanh(self.blocks["fc1"](x))
        h = torch.tanh(self.blocks["fc2"](h))
        y = self.blocks["fc3"](h)
        return SimpleNamespace(y=y, loss=y.square().mean())


def dt_batch(cfg: DTConfig, b: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = cfg.context_len
    return dict(states=torch.randn(b, k, cfg.state_dim, generator=g),
                actions=torch.rand(b, k, cfg.act_dim, generator=g) * 2 - 1,
                rewards=torch.rand(b, k, 1, generator=g),
                returns_to_go=torch.rand(b, k, 1, generator=g) * 5,
                timesteps=torch.randint(0, 200, (b, k), generator=g),
                mask=torch.ones(b, k, dtype=torch.bool))


def build(base: nn.Module, schedule: AdaLoraSchedule, init_r: int = 6, alpha: float = 6.0):
    """(ours, PEFT's PeftModel) with AdaLoRA on every block linear of copies of `base`."""
    ours = copy.deepcopy(base)
    add_adapter(ours, "t", AdapterConfig(method="adalora", rank=init_r, alpha=alpha))
    targets = list(adapter_layers(ours))
    cfg = peft.AdaLoraConfig(
        init_r=init_r, target_r=schedule.target_rank, lora_alpha=alpha, target_modules=targets,
        total_step=schedule.total_steps, tinit=schedule.tinit, tfinal=schedule.tfinal,
        deltaT=schedule.delta_t, beta1=schedule.beta1, beta2=schedule.beta2,
        orth_reg_weight=schedule.orth_reg_weight,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    return ours, theirs


def pairs(ours: nn.Module, theirs):
    """(ours, PEFT's) parameter pairs: {f"{path}.{factor}": (p_ours, p_peft)}."""
    out = {}
    peft_net = theirs.base_model.model
    for path, layer in adapter_layers(ours).items():
        pl = peft_net.get_submodule(path)
        for key in FACTORS:
            out[f"{path}.{key}"] = (getattr(layer, key)["t"], getattr(pl, key)["default"])
    return out


def randomise_and_copy(ours: nn.Module, theirs, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mine, peer in pairs(ours, theirs).values():
            mine.copy_(torch.randn(mine.shape, generator=g) * 0.3)
            peer.copy_(mine)


def dt_pair(schedule: AdaLoraSchedule, init_r: int = 6):
    torch.manual_seed(0)
    base = DecisionTransformer(DTConfig.preset("tiny", dropout=0.0))
    return base, *build(base, schedule, init_r=init_r)


def test_init_matches_peft_in_form() -> None:
    base, ours, theirs = dt_pair(AdaLoraSchedule(total_steps=10, target_rank=2))
    batch = dt_batch(base.config)
    torch.testing.assert_close(ours.loss(batch), base.loss(batch), rtol=0, atol=0)
    assert count_parameters(ours, "t") == theirs.get_nb_trainable_parameters()[0]
    for key, (mine, peer) in pairs(ours, theirs).items():
        assert mine.shape == peer.shape, key
        if key.endswith("lora_E"):
            assert torch.count_nonzero(mine) == 0 and torch.count_nonzero(peer) == 0
        else:  # N(0, 0.02²) in both
            for p in (mine, peer):
                p = p.detach()
                assert abs(float(p.std()) - 0.02) < 0.006 and abs(float(p.mean())) < 0.006, key
    layer = next(iter(adapter_layers(ours).values()))
    pl = theirs.base_model.model.get_submodule(next(iter(adapter_layers(ours))))
    ranknum = float(pl.ranknum["default"])
    assert layer.scaling["t"] == pytest.approx(pl.scaling["default"] / ranknum, rel=1e-5)


def test_dt_outputs_and_gradients_match_peft() -> None:
    base, ours, theirs = dt_pair(AdaLoraSchedule(total_steps=10, target_rank=2))
    randomise_and_copy(ours, theirs)
    batch = dt_batch(base.config)
    peft_dt = theirs.base_model.model
    loss_o, loss_p = ours.loss(batch), peft_dt.loss(batch)
    assert rel_err(loss_o, loss_p) < 1e-5
    (loss_o * 1e3).backward()
    (loss_p * 1e3).backward()
    assert len(pairs(ours, theirs)) == 3 * 12
    for key, (mine, peer) in pairs(ours, theirs).items():
        assert rel_err(mine.grad, peer.grad) < 1e-5, key
    preds_o = ours(**{k: v for k, v in batch.items() if k != "mask"})
    preds_p = peft_dt(**{k: v for k, v in batch.items() if k != "mask"})
    assert rel_err(preds_o, preds_p) < 1e-5


def test_merged_weights_match_peft() -> None:
    _, ours, theirs = dt_pair(AdaLoraSchedule(total_steps=10, target_rank=2))
    randomise_and_copy(ours, theirs)
    effective = {p: layer.effective_weight("t") for p, layer in adapter_layers(ours).items()}
    merge_adapter(ours, "t")
    merged = theirs.merge_and_unload()
    for path, layer in adapter_layers(ours).items():
        w_p = merged.get_submodule(path).weight
        assert rel_err(layer.weight, w_p) < 1e-5, path
        assert torch.equal(layer.weight, effective[path])


@pytest.mark.parametrize("seed", [0, 1])
def test_orthogonal_regulariser_matches_peft(seed: int) -> None:
    torch.manual_seed(seed)
    base = Net()
    schedule = AdaLoraSchedule(total_steps=10, target_rank=2, orth_reg_weight=0.3)
    ours, theirs = build(base, schedule)
    randomise_and_copy(ours, theirs, seed=seed + 5)
    x = torch.randn(4, 12)
    task_loss = ours(x).loss
    total_o = task_loss + AdaLoraAllocator(ours, "t", schedule).orthogonal_loss()
    total_p = theirs.base_model(x).loss  # AdaLoraModel.forward adds w · regulariser
    assert rel_err(total_o, total_p) < 1e-6
    reg_o = orthogonal_regularization(ours, "t")
    assert float(reg_o.detach()) > 1.0  # random factors are far from orthonormal
    torch.testing.assert_close(0.3 * reg_o, total_p - theirs.base_model.model(x).loss,
                               rtol=1e-6, atol=0)
    total_o.backward()
    total_p.backward()
    for key, (mine, peer) in pairs(ours, theirs).items():
        assert rel_err(mine.grad, peer.grad) < 1e-5, key


@pytest.mark.parametrize("tinit,tfinal,delta_t,total,init_r,target_r", [
    (0, 0, 1, 50, 12, 8), (10, 20, 1, 100, 12, 8), (3, 7, 4, 41, 6, 2), (0, 5, 3, 30, 8, 0),
    (25, 0, 10, 200, 4, 3),
])
def test_budget_schedule_matches_peft(tinit, tfinal, delta_t, total, init_r, target_r) -> None:
    torch.manual_seed(0)
    schedule = AdaLoraSchedule(total_steps=total, target_rank=target_r, tinit=tinit,
                               tfinal=tfinal, delta_t=delta_t)
    ours, theirs = build(Net(), schedule, init_r=init_r)
    mine = AdaLoraAllocator(ours, "t", schedule)
    rank_allocator = theirs.base_model.rankallocator
    assert (mine.init_budget, mine.target_budget) == (
        rank_allocator.init_bgt, rank_allocator.target_bgt) == (3 * init_r, 3 * target_r)
    budgets = [mine.budget_at(step) for step in range(total + 3)]
    assert budgets == [rank_allocator.budget_schedule(step) for step in range(total + 3)]
    assert budgets[0][0] == 3 * init_r and budgets[-1] == (3 * target_r, True)


SCHEDULES = [
    AdaLoraSchedule(total_steps=40, target_rank=2, tinit=4, tfinal=10, delta_t=3),
    AdaLoraSchedule(total_steps=25, target_rank=3, tinit=0, tfinal=0, delta_t=1,
                    beta1=0.7, beta2=0.9),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["phases", "every-step"])
def test_allocator_masks_match_peft_step_by_step(schedule: AdaLoraSchedule) -> None:
    """Same parameters and gradients at every step -> the same budgets, scores and masks."""
    base, ours, theirs = dt_pair(schedule)
    with torch.no_grad():  # PEFT's own random init is the start of both
        for mine, peer in pairs(ours, theirs).values():
            mine.copy_(peer)
    mine = AdaLoraAllocator(ours, "t", schedule)
    peft_model = theirs.base_model
    params = pairs(ours, theirs)
    lr = 0.05
    final_pattern = None
    for step in range(1, schedule.total_steps + 1):
        batch = dt_batch(base.config, seed=step)
        (ours.loss(batch) + mine.orthogonal_loss()).backward()
        with torch.no_grad():  # the same sign-SGD update in both (Adam-like step sizes)
            for p_o, p_p in params.values():
                p_p.grad = p_o.grad.clone()
                p_o -= lr * p_o.grad.sign()
                p_p -= lr * p_p.grad.sign()
        info = mine.update(step)
        peft_model.update_and_allocate(step)
        for key, (p_o, p_p) in params.items():
            assert torch.equal(p_o, p_p), (step, key)  # masked entries of Λ included
            p_o.grad = p_p.grad = None
        expected_budget, peft_masks = peft_model.rankallocator.budget_schedule(step)
        assert info.budget == expected_budget, step
        assert info.masked == (peft_masks or step >= schedule.final_start), step
        if info.masked:
            assert info.rank_total <= info.budget, step
        if step == schedule.final_start:
            final_pattern = peft_model.peft_config["default"].rank_pattern
    assert info.rank_total == mine.target_budget  # no ties among real-valued scores
    assert len(set(info.ranks.values())) > 1  # the budget is spread unevenly over layers
    assert final_pattern is not None and mine.final_mask is not None
    for path, keep in mine.final_mask.items():
        assert keep.tolist() == final_pattern[f"{path}.lora_E.default"], path
