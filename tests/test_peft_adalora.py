"""AdaLoRA in PEFT's AdaLoRA format: our pruned adapter read by PEFT itself, an adapter that
PEFT pruned (`update_and_allocate`) and saved read by our import, and the round trips; on
the Decision Transformer, outputs agree to 1e-6."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from helpers import TASKS, dt_batch, experiment, hidden, max_diff, out, tiny_dt
from safetensors.torch import load_file, save_file

from agents.dt_agent import DTAgent
from agents.peft_export import export_run_adapters
from agents.protocols import run_experiment
from eva_rl.adapters import (
    AdaLoraAllocator,
    AdaLoraSchedule,
    AdapterConfig,
    adapter_layers,
    add_adapter,
    export_peft,
    import_peft,
    load_adapter,
    set_active_adapter,
)
from eva_rl.adapters.peft_format import PEFT_ADALORA_EPS, PROVENANCE_FILE, peft_adalora_schedule

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-6
INIT_R = 4
SCHEDULE = AdaLoraSchedule(total_steps=12, target_rank=2, tinit=2, tfinal=3, delta_t=1,
                           beta1=0.8, beta2=0.9, orth_reg_weight=0.3)


@torch.no_grad()
def prune_unevenly(model, name: str, seed: int = 1) -> dict[str, list[bool]]:
    """Random non-zero P, Q, Λ; then layer i keeps a different number of triplets (one
    layer none, one all): the kept masks per layer."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for i, (path, layer) in enumerate(adapter_layers(model).items()):
        for key in ("lora_A", "lora_E", "lora_B"):
            p = getattr(layer, key)[name]
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        rank = layer.ranks[name]
        keep = torch.rand(rank, generator=g) < 0.5
        keep[i % rank] = True
        if i == 1:
            keep[:] = False
        if i == 2:
            keep[:] = True
        layer.lora_E[name].masked_fill_(~keep.view(-1, 1), 0.0)
        kept[path] = keep.tolist()
    return kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pruned_export_loads_in_peft_with_our_outputs(dtype, tmp_path):
    """float32: the actions agree to 1e-6; float64: the hidden states to 1e-12 (exact)."""
    base = tiny_dt().to(dtype)
    ours = copy.deepcopy(base)
    add_adapter(ours, "t", AdapterConfig(method="adalora", rank=INIT_R, alpha=6.0))
    kept = prune_unevenly(ours, "t")
    export_peft(ours, "t", tmp_path / "peft", adalora=SCHEDULE)

    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == INIT_R
    assert (cfg["target_r"], cfg["total_step"], cfg["tinit"], cfg["tfinal"], cfg["deltaT"]) == (
        2, 12, 2, 3, 1)
    assert cfg["rank_pattern"] == {f"{p}.lora_E": k for p, k in kept.items()}
    assert cfg["lora_alpha"] == pytest.approx(6.0 / INIT_R * (INIT_R + PEFT_ADALORA_EPS),
                                              rel=1e-15)
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    path0 = next(iter(kept))
    assert saved[f"base_model.model.{path0}.lora_E"].shape == (sum(kept[path0]), 1)
    provenance = json.loads((tmp_path / "peft" / PROVENANCE_FILE).read_text())
    assert provenance["kind"] == "adalora"
    assert provenance["adalora_schedule"] == SCHEDULE.to_dict()
    assert {p: v["kept_rank"] for p, v in provenance["layers"].items()} == {
        p: sum(k) for p, k in kept.items()}

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    batch = dt_batch(7, dtype=dtype)
    assert max_diff(out(ours, batch), out(base, batch)) > 1e-3  # the adapter matters
    if dtype == torch.float32:
        assert max_diff(out(loaded, batch), out(ours, batch)) < TOL
    else:
        assert max_diff(hidden(loaded, batch), hidden(ours, batch)) < 1e-12
    # PEFT resized every layer to its kept triplets and kept ranknum = init_r: our scale
    for path, layer in adapter_layers(ours).items():
        pl = loaded.base_model.model.get_submodule(path)
        assert isinstance(pl, peft.tuners.adalora.SVDLinear)
        assert pl.r["default"] == sum(kept[path])
        assert pl.lora_A["default"].shape == (sum(kept[path]), layer.in_features)
        if pl.r["default"] > 0:
            ranknum = float(pl.ranknum["default"].detach())
            assert ranknum == INIT_R
            assert pl.scaling["default"] / (ranknum + PEFT_ADALORA_EPS) == pytest.approx(
                layer.scaling["t"], rel=1e-15)
    # and PEFT merges to our effective weights
    effective = {p: layer.effective_weight("t") for p, layer in adapter_layers(ours).items()}
    merged = loaded.merge_and_unload()
    for path, w in effective.items():
        torch.testing.assert_close(merged.get_submodule(path).weight, w,
                                   rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14)


def test_uneven_initial_ranks_and_alphas_export_exactly(tmp_path):
    """PEFT has one init_r and one lora_alpha: smaller layers get padded masks, another
    scale is folded into that layer's Λ; the function stays ours."""
    base = tiny_dt()
    ours = copy.deepcopy(base)
    add_adapter(ours, "t", AdapterConfig(
        method="adalora", rank=INIT_R, alpha=6.0,
        rank_pattern={"blocks.0.attn.q_proj": 2, "blocks.1.mlp.fc_in": 6},
        alpha_pattern={"blocks.0.mlp.fc_out": 2.5}))
    kept = prune_unevenly(ours, "t", seed=3)
    export_peft(ours, "t", tmp_path / "p", adalora=SCHEDULE.to_dict())
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["init_r"] == 6
    assert cfg["rank_pattern"]["blocks.0.attn.q_proj.lora_E"] == kept["blocks.0.attn.q_proj"] + [
        False] * 4
    layers = json.loads((tmp_path / "p" / PROVENANCE_FILE).read_text())["layers"]
    factors = {p: v["lambda_factor"] for p, v in layers.items() if v["lambda_factor"] != 1.0}
    assert set(factors) == {"blocks.0.attn.q_proj", "blocks.1.mlp.fc_in", "blocks.0.mlp.fc_out"}
    assert factors["blocks.0.mlp.fc_out"] == pytest.approx(2.5 / 6.0)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    batch = dt_batch(2)
    assert max_diff(out(loaded, batch), out(ours, batch)) < TOL
    back = copy.deepcopy(base)
    import_peft(back, tmp_path / "p", "t")
    assert max_diff(out(back, batch), out(ours, batch)) < TOL
    assert {layer.ranks["t"] for layer in adapter_layers(back).values()} == {6}


def peft_pruned(base, tmp_path):
    """A PEFT AdaLoRA adapter trained for SCHEDULE's steps, pruned by PEFT's own
    `update_and_allocate`, saved by `save_pretrained`: (the PeftModel, its directory)."""
    targets = list(dict.fromkeys(p for p, m in base.named_modules()
                                 if p.startswith("blocks.") and isinstance(m, torch.nn.Linear)))
    cfg = peft.AdaLoraConfig(
        init_r=INIT_R, target_r=SCHEDULE.target_rank, lora_alpha=6, target_modules=targets,
        total_step=SCHEDULE.total_steps, tinit=SCHEDULE.tinit, tfinal=SCHEDULE.tfinal,
        deltaT=SCHEDULE.delta_t, beta1=SCHEDULE.beta1, beta2=SCHEDULE.beta2,
        orth_reg_weight=SCHEDULE.orth_reg_weight, lora_dropout=0.1)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    theirs.train()
    opt = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    for step in range(1, SCHEDULE.total_steps + 1):
        batch = dt_batch(30 + step)
        theirs(**batch).square().mean().backward()
        opt.step()
        theirs.base_model.update_and_allocate(step)
        opt.zero_grad()
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft-saved")
    return theirs, tmp_path / "peft-saved"


def test_peft_pruned_adapter_imports_with_its_outputs_and_round_trips(tmp_path):
    base = tiny_dt()
    theirs, saved = peft_pruned(base, tmp_path)
    cfg = json.loads((saved / "adapter_config.json").read_text())
    pattern = cfg["rank_pattern"]
    kept = {key.removesuffix(".lora_E"): sum(mask) for key, mask in pattern.items()}
    assert len(set(kept.values())) > 1 and sum(kept.values()) == 2 * len(kept)  # uneven

    ours = copy.deepcopy(base)
    assert import_peft(ours, saved, "imported") == "imported"
    batch = dt_batch(8)
    assert max_diff(out(ours, batch), out(base, batch)) > 1e-3
    assert max_diff(out(ours, batch), out(theirs, batch)) < TOL
    reread = peft.PeftModel.from_pretrained(copy.deepcopy(base), saved).eval()
    assert max_diff(out(ours, batch), out(reread, batch)) < TOL
    layers = adapter_layers(ours)
    assert set(layers) == set(kept)
    for path, layer in layers.items():
        assert layer.methods["imported"] == "adalora" and layer.ranks["imported"] == INIT_R
        mask = torch.tensor(pattern[f"{path}.lora_E"])
        e = layer.lora_E["imported"].view(-1)
        assert torch.count_nonzero(e) == kept[path] and bool((e[mask] != 0).all())
        assert not layer.lora_A["imported"][~mask].any()  # dropped triplets come back as zeros
        assert layer.configs["imported"].dropout == 0.1
    # our allocator sees PEFT's allocation
    assert AdaLoraAllocator(ours, "imported", SCHEDULE).ranks() == kept

    # round trip: our export of the imported adapter is PEFT's file again
    schedule = peft_adalora_schedule(saved)
    assert schedule == SCHEDULE
    export_peft(ours, "imported", tmp_path / "back", adalora=schedule)
    back_cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert back_cfg["rank_pattern"] == pattern
    assert back_cfg["lora_alpha"] == pytest.approx(6.0, rel=1e-15)
    theirs_t = load_file(saved / "adapter_model.safetensors")
    back_t = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert set(back_t) == set(theirs_t)
    assert all(torch.equal(back_t[k], theirs_t[k]) for k in theirs_t)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    assert max_diff(out(again, batch), out(theirs, batch)) < TOL

    # and ours -> PEFT -> PEFT's save -> ours
    reread.save_pretrained(tmp_path / "resaved")
    import_peft(ours, tmp_path / "resaved", "twice")
    set_active_adapter(ours, "imported")
    y_once = out(ours, batch)
    set_active_adapter(ours, "twice")
    assert max_diff(out(ours, batch), y_once) < TOL


def test_untrained_adapter_exports_whole(tmp_path):
    """Λ = 0 everywhere (before training): every triplet is kept, as PEFT saves it."""
    base = tiny_dt()
    ours = copy.deepcopy(base)
    add_adapter(ours, "t", AdapterConfig(method="adalora", rank=INIT_R, alpha=4.0))
    export_peft(ours, "t", tmp_path / "u", adalora=SCHEDULE)
    cfg = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert all(mask == [True] * INIT_R for mask in cfg["rank_pattern"].values())
    back = copy.deepcopy(base)
    import_peft(back, tmp_path / "u", "t")
    for path, layer in adapter_layers(ours).items():
        assert torch.equal(adapter_layers(back)[path].lora_B["t"], layer.lora_B["t"])


def test_adalora_errors(tmp_path):
    base = tiny_dt()
    ours = copy.deepcopy(base)
    add_adapter(ours, "t", AdapterConfig(method="adalora", rank=INIT_R, alpha=6.0))
    prune_unevenly(ours, "t")
    with pytest.raises(ValueError, match="AdaLoRA adapter: pass adalora="):
        export_peft(ours, "t", tmp_path / "x")
    with pytest.raises(ValueError, match="EVA initialises lora/dora"):
        export_peft(ours, "t", tmp_path / "x", eva={"rank": 2}, adalora=SCHEDULE)
    assert not (tmp_path / "x").exists()

    export_peft(ours, "t", tmp_path / "ok", adalora=SCHEDULE)
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    first = next(iter(cfg["rank_pattern"]))

    def variant(name, tensors=tensors, **changes):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        save_file(tensors, d / "adapter_model.safetensors")
        return d

    flipped = [not v for v in cfg["rank_pattern"][first]]
    cases = {
        "use_dora with peft_type ADALORA": variant("dora", use_dora=True),
        "lora_alpha=0 is not a number > 0": variant("alpha", lora_alpha=0),
        "init_r=0 is not an integer": variant("r0", init_r=0),
        "is not a list of 4 booleans": variant("len", rank_pattern={first: [True]}),
        "is not <module>.lora_E": variant("key", rank_pattern={"blocks.0.attn.q_proj": [True] * 4}),
        "holds no tensors for": variant("orphan", rank_pattern={
            **cfg["rank_pattern"], "blocks.9.attn.q_proj.lora_E": [True] * 4}),
        "triplets kept": variant("mask", rank_pattern={**cfg["rank_pattern"], first: flipped}),
        "is not an AdaLoRA tensor": variant("lora_keys", tensors={
            k + ".weight": v for k, v in tensors.items()}),
        "settings ['lora_bias']": variant("bias", lora_bias=True),
    }
    for message, directory in cases.items():
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=re.escape(message)):
            import_peft(model, directory, "x")
        assert not adapter_layers(model)  # nothing half-added
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["fc_in"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="has no AdaLoRA schedule"):
        peft_adalora_schedule(tmp_path / "lora")


@pytest.fixture(scope="module")
def adalora_run(setup, tmp_path_factory):
    """A single-protocol adalora run on the two tiny tasks (pruned by its final mask)."""
    out = tmp_path_factory.mktemp("adalora-run") / "run"
    run_experiment(experiment(setup, protocol="single", methods=("adalora",)), out, report=False)
    return out, setup[2]


def test_run_adapters_export_with_the_run_schedule(adalora_run, tmp_path):
    run, pre = adalora_run
    written = export_run_adapters(run, "adalora", 0, tmp_path / "peft")
    assert list(written) == list(TASKS)
    base = DTAgent.load(pre, device="cpu").model
    run_config = json.loads((run / "config.json").read_text())["experiment"]["config"]
    steps = run_config["train"]["steps"]
    for i, task in enumerate(TASKS):
        cfg = json.loads((written[task] / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "ADALORA" and cfg["total_step"] == steps
        assert cfg["target_r"] == run_config["adapter"]["rank"]
        ours = copy.deepcopy(base)
        load_adapter(ours, run / "runs" / "adalora" / "seed_0" / f"{i:02d}_{task}" / "adapter")
        layers = adapter_layers(ours)
        assert sum(sum(m) for m in cfg["rank_pattern"].values()) < sum(
            layer.ranks[task] for layer in layers.values())  # the run did prune
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), written[task]).eval()
        g = torch.Generator().manual_seed(i)
        k = base.config.context_len
        batch = {"states": torch.randn(3, k, base.config.state_dim, generator=g),
                 "actions": torch.rand(3, k, base.config.act_dim, generator=g) * 2 - 1,
                 "rewards": torch.rand(3, k, 1, generator=g),
                 "returns_to_go": torch.rand(3, k, 1, generator=g) * 5,
                 "timesteps": torch.arange(k).repeat(3, 1)}
        assert max_diff(out(ours, batch), out(theirs, batch)) < TOL
        assert not torch.equal(out(ours, batch), out(base, batch))
