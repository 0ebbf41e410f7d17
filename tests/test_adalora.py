"""Unit tests of the `adalora` adapter and `AdaLoraAllocator` (PEFT parity: test_adalora_peft)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from eva_rl.adapters import (
    AdaLoraAllocator,
    AdaLoraSchedule,
    AdapterConfig,
    adapter_layers,
    add_adapter,
    count_parameters,
    delete_adapter,
    load_adapter,
    merge_adapter,
    orthogonal_regularization,
    save_adapter,
    set_active_adapter,
    unmerge_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D, H = 8, 12


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(D, H), nn.Linear(H, H), nn.Linear(H, D)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.blocks):
            x = layer(x) if i == len(self.blocks) - 1 else torch.tanh(layer(x))
        return x


SCHEDULE = AdaLoraSchedule(total_steps=30, target_rank=2, tinit=3, tfinal=8, delta_t=2)


def adalora_model(rank: int = 5, name: str = "t", seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    add_adapter(model, name, AdapterConfig(method="adalora", rank=rank, alpha=4.0))
    return model


def train(model: nn.Module, allocator: AdaLoraAllocator, steps: range) -> list:
    """Normalised-gradient steps on a regression task, then `allocator.update(step)`.

    (Not sign-SGD: its constant step sizes send Λ back to exact zeros now and then.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    infos = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, target = torch.randn(16, D, generator=g), torch.randn(16, D, generator=g)
        loss = nn.functional.mse_loss(model(x), target) + allocator.orthogonal_loss()
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.05 * p.grad / p.grad.norm().clamp_min(1e-12)
        infos.append(allocator.update(step))
        for p in params:
            p.grad = None
    return infos


def values(model: nn.Module, name: str = "t") -> dict[str, torch.Tensor]:
    return {p: layer.lora_E[name].detach().clone() for p, layer in adapter_layers(model).items()}


def test_fresh_adapter_is_the_identity_and_trains_all_three_factors() -> None:
    model = adalora_model()
    base = copy.deepcopy(model)
    delete_adapter(base, "t")
    x = torch.randn(4, D)
    assert torch.equal(model(x), base(x))  # Λ = 0
    assert count_parameters(model, "t") == sum(5 * (i + o + 1) for i, o in ((D, H), (H, H), (H, D)))
    layer = model.blocks[0]
    assert layer.scaling["t"] == pytest.approx(4.0 / 5)
    tensors = layer.adapter_tensors("t")
    assert set(tensors) == {"lora_A", "lora_B", "lora_E"}
    assert all(t.requires_grad for t in tensors.values())
    with pytest.raises(ValueError, match="use_rslora is not defined for adalora"):
        AdapterConfig(method="adalora", use_rslora=True)
    with pytest.raises(ValueError, match="a given lora_A works with methods"):
        add_adapter(model, "g", AdapterConfig(method="adalora"),
                    lora_A={"blocks.0": torch.ones(2, D)})


def test_budget_phases_and_final_fixed_mask() -> None:
    model = adalora_model()
    allocator = AdaLoraAllocator(model, "t", SCHEDULE)
    assert (allocator.init_budget, allocator.target_budget) == (15, 6)
    infos = train(model, allocator, range(1, SCHEDULE.total_steps + 1))
    by_step = {i.step: i for i in infos}
    assert [by_step[s].budget for s in (1, 3)] == [15, 15] and not by_step[3].masked
    budgets = [by_step[s].budget for s in range(4, SCHEDULE.final_start)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] < 15 and budgets[-1] >= 6
    for s in range(4, SCHEDULE.final_start):
        assert by_step[s].masked == (s % 2 == 0)
        if by_step[s].masked:
            assert by_step[s].rank_total <= by_step[s].budget
    final = [by_step[s] for s in range(SCHEDULE.final_start, SCHEDULE.total_steps + 1)]
    assert all(i.masked and i.budget == 6 and i.ranks == final[0].ranks for i in final)
    assert final[0].rank_total == 6 and allocator.ema_ipt == {}  # scores dropped when fixed
    kept = {p: m.clone() for p, m in allocator.final_mask.items()}
    for path, e in values(model).items():  # the final mask is reapplied after every update
        assert torch.equal(e.view(-1) != 0, kept[path])
    scalars = final[-1].scalars()
    assert scalars["adalora/rank_total"] == 6.0 and scalars["adalora/budget"] == 6.0
    assert sum(scalars[f"adalora/rank/blocks.{i}"] for i in range(3)) == 6.0


def test_masked_values_can_return_in_the_budget_phase() -> None:
    model = adalora_model()
    schedule = AdaLoraSchedule(total_steps=40, target_rank=1, tinit=1, tfinal=5, delta_t=5)
    allocator = AdaLoraAllocator(model, "t", schedule)
    infos = train(model, allocator, range(1, 16))
    between = [i for i in infos if not i.masked and i.step > 5]
    # Λ of a masked triplet keeps its gradient: between allocations the rank grows back
    assert infos[4].active_ranks == infos[4].ranks and infos[4].rank_total < 15
    assert all(i.ranks == infos[4].ranks for i in between if i.step < 10)
    assert any(sum(i.active_ranks.values()) > infos[4].rank_total for i in between)


def test_resumed_allocator_continues_identically(tmp_path) -> None:
    straight = adalora_model()
    straight_alloc = AdaLoraAllocator(straight, "t", SCHEDULE)
    infos = train(straight, straight_alloc, range(1, SCHEDULE.total_steps + 1))

    for split in (12, SCHEDULE.final_start + 2):  # mid-budget phase, then in the final phase
        first = adalora_model()
        first_alloc = AdaLoraAllocator(first, "t", SCHEDULE)
        train(first, first_alloc, range(1, split + 1))
        state = first_alloc.state_dict()
        save_file(state["tensors"], str(tmp_path / "alloc.safetensors"))
        (tmp_path / "alloc.json").write_text(json.dumps(state["meta"]))
        save_adapter(first, "t", tmp_path / f"adapter{split}")

        resumed = adalora_model(seed=0)
        delete_adapter(resumed, "t")
        load_adapter(resumed, tmp_path / f"adapter{split}")
        alloc = AdaLoraAllocator(resumed, "t", SCHEDULE)
        alloc.load_state_dict({"meta": json.loads((tmp_path / "alloc.json").read_text()),
                               "tensors": load_file(str(tmp_path / "alloc.safetensors"))})
        assert alloc.last_step == split
        later = train(resumed, alloc, range(split + 1, SCHEDULE.total_steps + 1))
        assert later == infos[split:]
        for path, e in values(resumed).items():
            assert torch.equal(e, values(straight)[path]), (split, path)


def test_state_dict_checks_the_layout() -> None:
    model = adalora_model()
    allocator = AdaLoraAllocator(model, "t", SCHEDULE)
    train(model, allocator, range(1, 6))
    state = allocator.state_dict()
    assert set(state["tensors"]) == {f"blocks.{i}.{f}.{k}" for i in range(3)
                                     for f in ("lora_A", "lora_E", "lora_B")
                                     for k in ("ema_ipt", "ema_unc")}
    json.dumps(state["meta"])
    other = AdaLoraAllocator(adalora_model(rank=4), "t", SCHEDULE)
    with pytest.raises(ValueError, match="has layers"):
        other.load_state_dict(state)
    changed = AdaLoraAllocator(model, "t", AdaLoraSchedule(total_steps=31, target_rank=2))
    with pytest.raises(ValueError, match="has schedule"):
        changed.load_state_dict(state)
    state["tensors"]["blocks.0.lora_A.ema_ipt"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected tensor 'blocks.0.lora_A.ema_ipt'"):
        allocator.load_state_dict(state)


def test_allocator_touches_only_its_adapter_and_errors() -> None:
    model = adalora_model(name="task1")
    add_adapter(model, "lora", AdapterConfig(rank=2))
    add_adapter(model, "task2", AdapterConfig(method="adalora", rank=3,
                                              rank_pattern={"blocks.1": 0}))
    set_active_adapter(model, "task1")
    a1 = AdaLoraAllocator(model, "task1", SCHEDULE)
    train(model, a1, range(1, 6))
    task1 = values(model, "task1")
    set_active_adapter(model, "task2")
    a2 = AdaLoraAllocator(model, "task2", AdaLoraSchedule(total_steps=10, target_rank=1))
    assert list(a2.layers) == ["blocks.0", "blocks.2"] and a2.init_budget == 6
    train(model, a2, range(1, 11))
    assert all(torch.equal(values(model, "task1")[p], e) for p, e in task1.items())
    assert a2.ranks() == {"blocks.0": 1, "blocks.2": 1} or sum(a2.ranks().values()) < 2
    with pytest.raises(ValueError, match="no adalora adapter named 'lora'"):
        AdaLoraAllocator(model, "lora", SCHEDULE)
    with pytest.raises(ValueError, match="target budget 4 x 2 layers = 8 exceeds"):
        AdaLoraAllocator(model, "task2", AdaLoraSchedule(total_steps=10, target_rank=4))
    with pytest.raises(RuntimeError, match="has no gradient"):
        AdaLoraAllocator(model, "task2", SCHEDULE).update(1)
    for bad in (dict(tinit=22, tfinal=8), dict(delta_t=0), dict(beta1=1.0),
                dict(orth_reg_weight=-1.0), dict(target_rank=2.5)):
        with pytest.raises(ValueError, match="AdaLoraSchedule"):
            AdaLoraSchedule(**{"total_steps": 30, **bad})
    assert AdaLoraSchedule.from_dict(SCHEDULE.to_dict()) == SCHEDULE


def test_orthogonal_regulariser_is_zero_for_orthonormal_factors() -> None:
    model = adalora_model(rank=4)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            q, _ = torch.linalg.qr(torch.randn(layer.in_features, 4))
            p, _ = torch.linalg.qr(torch.randn(layer.out_features, 4))
            layer.lora_A["t"].copy_(q.T)
            layer.lora_B["t"].copy_(p)
    assert float(orthogonal_regularization(model, "t").detach()) < 1e-5
    with torch.no_grad():
        model.blocks[0].lora_A["t"].mul_(2.0)  # Q Q^T = 4 I: ‖3 I‖_F = 6 on one of 6 terms
    assert float(orthogonal_regularization(model, "t").detach()) == pytest.approx(1.0, abs=1e-4)


def test_save_load_merge_round_trip_keeps_the_masks(tmp_path) -> None:
    model = adalora_model()
    allocator = AdaLoraAllocator(model, "t", SCHEDULE)
    train(model, allocator, range(1, SCHEDULE.final_start + 1))
    zeros = {p: (e == 0) for p, e in values(model).items()}
    assert sum(int(z.sum()) for z in zeros.values()) == 15 - 6
    model.eval()
    x = torch.randn(5, D)
    y = model(x)
    save_adapter(model, "t", tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert meta["method"] == "adalora" and meta["layers"]["blocks.1"]["rank"] == 5
    fresh = adalora_model(name="other", seed=0)
    delete_adapter(fresh, "other")
    load_adapter(fresh, tmp_path / "t")
    fresh.eval()
    assert torch.equal(fresh(x), y)
    assert {p: (e == 0) for p, e in values(fresh).items()}.keys() == zeros.keys()
    for path, e in values(fresh).items():
        assert torch.equal(e == 0, zeros[path])
    assert count_parameters(fresh, "t") == count_parameters(model, "t")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    merge_adapter(fresh, "t")
    torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-6)
    unmerge_adapter(fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    delete_adapter(fresh, "t")
    assert adapter_layers(fresh) == {}
