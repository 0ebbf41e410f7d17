"""PEFT's adapter format: our export read by PEFT itself, PEFT's own files read by our import,
on the Decision Transformer; outputs must agree to 1e-6."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from helpers import dt_batch, hidden, max_diff, out, tiny_dt
from safetensors.torch import load_file, save_file

from eva_rl.adapters import (
    AdapterConfig,
    adapter_layers,
    add_adapter,
    delete_adapter,
    export_peft,
    import_peft,
    save_adapter,
    set_active_adapter,
)
from eva_rl.adapters.peft_format import PROVENANCE_FILE, peft_pattern_key
from eva_rl.eva import EvaConfig, apply_eva, compute_eva

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-6


@torch.no_grad()
def randomize(model, name: str, seed: int = 1) -> None:
    """Non-zero trainable tensors, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(model).values():
        if name not in layer.lora_A:
            continue
        for p in (layer.lora_A[name], layer.lora_B[name]):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        if name in layer.lora_magnitude_vector:
            m = layer.lora_magnitude_vector[name]
            m.mul_(torch.rand(m.shape, generator=g) + 0.5)


def add_kind(model, kind: str, name: str = "t", rslora: bool = False) -> None:
    """An adapter of `kind` (lora, dora, pissa, olora, eva, eva_dora) on `model`."""
    if kind.startswith("eva"):
        dtype = model.embed_ln.weight.dtype
        result = compute_eva(model, (dt_batch(100 + i, dtype=dtype) for i in range(4)),
                             EvaConfig(rank=4, rho=2.0, tau=0.9, max_batches=4))
        method = "dora" if kind == "eva_dora" else "lora"
        apply_eva(model, name, result, AdapterConfig(method=method, rank=4, alpha=8.0,
                                                     use_rslora=rslora))
        return
    add_adapter(model, name, AdapterConfig(method=kind, rank=4, alpha=6.0, use_rslora=rslora))


KINDS = ("lora", "dora", "pissa", "olora", "eva", "eva_dora")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_peft_with_our_outputs(kind, rslora, dtype, tmp_path):
    """float32: the predicted actions agree to 1e-6; float64: the last hidden states to
    1e-12, so the conversion is exact and the float32 gap is rounding of other op orders."""
    base = tiny_dt().to(dtype)
    ours = copy.deepcopy(base)
    add_kind(ours, kind, rslora=rslora)
    randomize(ours, "t")
    eva = EvaConfig(rank=4, rho=2.0, tau=0.9) if kind.startswith("eva") else None
    export_peft(ours, "t", tmp_path / "peft", eva=eva)

    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == kind.endswith("dora")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    batch = dt_batch(7, dtype=dtype)
    assert max_diff(out(ours, batch), out(base, batch)) > 1e-3  # the adapter matters
    if dtype == torch.float32:
        assert max_diff(out(loaded, batch), out(ours, batch)) < TOL
    else:
        assert max_diff(hidden(loaded, batch), hidden(ours, batch)) < 1e-12
    # PEFT's own view of the config agrees with ours, layer by layer
    peft_cfg = loaded.peft_config["default"]
    for path, layer in adapter_layers(ours).items():
        rank = layer.ranks["t"]
        if rank == 0:
            assert not isinstance(loaded.base_model.model.get_submodule(path),
                                  peft.tuners.lora.LoraLayer)
            continue
        pl = loaded.base_model.model.get_submodule(path)
        assert pl.scaling["default"] == pytest.approx(layer.scaling["t"], rel=1e-12)
        factor = 2 if kind in ("pissa", "olora") else 1
        assert pl.r["default"] == factor * rank
    provenance = json.loads((tmp_path / "peft" / PROVENANCE_FILE).read_text())
    if kind.startswith("eva"):
        assert cfg["init_lora_weights"] == "eva" and peft_cfg.init_lora_weights == "eva"
        assert cfg["eva_config"]["rho"] == 2.0 and provenance["eva_config"]["rank"] == 4
        assert provenance["kind"] == "eva"
        ranks = {layer.ranks["t"] for layer in adapter_layers(ours).values()}
        assert len(ranks) > 1 and cfg["rank_pattern"] and cfg["alpha_pattern"]
    else:
        assert cfg["init_lora_weights"] is True and provenance["kind"] == kind
    if kind in ("pissa", "olora"):
        assert "rank-2r" in provenance["exported_as"]


def test_peft_trained_adapter_imports_with_its_outputs(tmp_path):
    """PEFT writes (after a few real training steps), we read: same outputs."""
    for use_dora in (False, True):
        base = tiny_dt()
        cfg = peft.LoraConfig(
            r=4, lora_alpha=7, target_modules=["q_proj", "v_proj", "fc_in"], use_dora=use_dora,
            rank_pattern={"blocks.0.attn.q_proj": 2}, alpha_pattern={"fc_in": 3.0},
            lora_dropout=0.1)
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
        opt = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
        theirs.train()
        for step in range(3):
            opt.zero_grad()
            theirs(**dt_batch(20 + step)).square().mean().backward()
            opt.step()
        theirs.eval()
        saved = tmp_path / f"dora{use_dora}"
        theirs.save_pretrained(saved)

        ours = copy.deepcopy(base)
        assert import_peft(ours, saved, "imported") == "imported"
        layers = adapter_layers(ours)
        assert layers["blocks.0.attn.q_proj"].ranks["imported"] == 2
        assert layers["blocks.1.attn.q_proj"].ranks["imported"] == 4
        assert layers["blocks.0.mlp.fc_in"].alphas["imported"] == 3.0
        assert layers["blocks.1.attn.v_proj"].alphas["imported"] == 7.0
        assert layers["blocks.0.mlp.fc_in"].methods["imported"] == ("dora" if use_dora else "lora")
        assert set(layers) == {f"blocks.{i}.{m}" for i in (0, 1)
                               for m in ("attn.q_proj", "attn.v_proj", "mlp.fc_in")}
        batch = dt_batch(8)
        assert max_diff(out(ours, batch), out(theirs, batch)) < TOL
        assert max_diff(out(ours, batch), out(base, batch)) > 1e-3

        # round trip: our export of the imported adapter loads back in PEFT unchanged
        export_peft(ours, "imported", tmp_path / f"back{use_dora}")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / f"back{use_dora}")
        assert max_diff(out(again.eval(), batch), out(theirs, batch)) < TOL


def test_import_of_our_export_is_the_same_adapter(tmp_path):
    model = tiny_dt()
    add_kind(model, "eva_dora")
    randomize(model, "t")
    export_peft(model, "t", tmp_path / "e")
    import_peft(model, tmp_path / "e", "again")
    batch = dt_batch(3)
    set_active_adapter(model, "t")
    y_t = out(model, batch)
    set_active_adapter(model, "again")
    assert max_diff(out(model, batch), y_t) < TOL
    for layer in adapter_layers(model).values():
        assert layer.ranks["again"] == layer.ranks["t"] or layer.ranks["t"] == 0


def test_import_refuses_what_it_cannot_represent(tmp_path):
    base = tiny_dt()
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), lora)
    theirs.save_pretrained(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())

    def variant(name, tensors=None, **changes):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        save_file(tensors or load_file(tmp_path / "ok" / "adapter_model.safetensors"),
                  d / "adapter_model.safetensors")
        return d

    cases = {
        "peft_type 'IA3' is not supported (only LORA": variant("ia3", peft_type="IA3"),
        "init_lora_weights='pissa'": variant("pissa", init_lora_weights="pissa"),
        "bias='all'": variant("bias", bias="all"),
        "fan_in_fan_out=True": variant("fan", fan_in_fan_out=True),
        "modules_to_save": variant("mts", modules_to_save=["action_head"]),
        "lora_bias": variant("lb", lora_bias=True),
        "has rank 2 but the config says 5": variant("rank", r=5),
        "not an nn.Linear of this model": variant("missing", tensors={
            "base_model.model.transformer.h.0.c_attn.lora_A.weight": torch.zeros(2, 32),
            "base_model.model.transformer.h.0.c_attn.lora_B.weight": torch.zeros(96, 2)}),
        "expected {'lora_A': (2, 32)": variant("shape", tensors={
            "base_model.model.blocks.0.attn.q_proj.lora_A.weight": torch.zeros(2, 31),
            "base_model.model.blocks.0.attn.q_proj.lora_B.weight": torch.zeros(32, 2)}),
        "is not a LoRA/DoRA tensor": variant("emb", tensors={
            "base_model.model.embed_timestep.lora_embedding_A": torch.zeros(2, 100)}),
    }
    for message, directory in cases.items():
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=re.escape(message)):
            import_peft(model, directory, "x")
        assert not adapter_layers(model)  # nothing half-added
    ours = copy.deepcopy(base)
    add_adapter(ours, "mine", AdapterConfig(rank=2))
    save_adapter(ours, "mine", tmp_path / "ours")
    with pytest.raises(ValueError, match="eva-rl adapter: use load_adapter"):
        import_peft(copy.deepcopy(base), tmp_path / "ours", "x")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        import_peft(copy.deepcopy(base), tmp_path / "nothing", "x")
    imported = copy.deepcopy(base)
    import_peft(imported, tmp_path / "ok", "x")
    with pytest.raises(ValueError, match="already has an adapter named 'x'"):
        import_peft(imported, tmp_path / "ok", "x")


def test_export_errors_and_overwrite(tmp_path):
    model = tiny_dt()
    add_adapter(model, "p", AdapterConfig(method="pissa", rank=2))
    with pytest.raises(KeyError, match="no adapter named 'q'"):
        export_peft(model, "q", tmp_path / "x")
    with pytest.raises(ValueError, match="EVA initialises lora/dora"):
        export_peft(model, "p", tmp_path / "x", eva={"rank": 2})
    export_peft(model, "p", tmp_path / "x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_peft(model, "p", tmp_path / "x")
    export_peft(model, "p", tmp_path / "x", overwrite=True)
    layer = next(iter(adapter_layers(model).values()))
    layer.methods["p"] = "vera"  # a kind without a PEFT equivalent here
    with pytest.raises(ValueError, match="kind 'vera'.*exportable kinds"):
        export_peft(model, "p", tmp_path / "y")
    layer.methods["p"] = "adalora"
    with pytest.raises(ValueError, match=r"mixes kinds \['adalora', 'pissa'\]"):
        export_peft(model, "p", tmp_path / "y")
    layer.methods["p"] = "pissa"
    with pytest.raises(ValueError, match="adalora= .* is for adalora adapters"):
        export_peft(model, "p", tmp_path / "y", adalora={"total_steps": 5})
    assert not (tmp_path / "y").exists()
    delete_adapter(model, "p")
    add_adapter(model, "z", AdapterConfig(rank=2),
                lora_A={"blocks.0.attn.q_proj": torch.zeros(0, 32)})
    with pytest.raises(ValueError, match="rank 0 on every layer"):
        export_peft(model, "z", tmp_path / "z")


def test_peft_pattern_rule():
    patterns = {"blocks.1.attn.q_proj": 3, "fc_in": 5}
    assert peft_pattern_key(patterns, "blocks.1.attn.q_proj") == "blocks.1.attn.q_proj"
    assert peft_pattern_key(patterns, "blocks.11.attn.q_proj") is None
    assert peft_pattern_key(patterns, "blocks.0.mlp.fc_in") == "fc_in"
    assert peft_pattern_key(patterns, "blocks.0.mlp.xfc_in") is None
