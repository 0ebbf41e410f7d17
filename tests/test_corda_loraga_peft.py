"""CorDA (IPM, KPM) and LoRA-GA against PEFT 0.21 on the same tiny DT, data and settings.

PEFT changes the base weight (W_res = W - s·B A); we keep W and put -s·B0 A0 in the
adapter. So we compare the adapter weights (up to the sign of each singular vector), the
residual base W - s·B0 A0 with PEFT's W_res, the outputs after a few optimizer updates,
and the export: PEFT loads our exported adapter onto the untouched base and gets our outputs.

Known, explained differences: PEFT's CorDA hook takes one sample per forward, so its
``run_model`` feeds one window at a time (ours takes every window of a batch as a sample);
PEFT's LoRA-GA SVD is ``svd_lowrank(q=min(4r, min(in, out)))``, which is exact here
(r = 8, min(in, out) = 32), ours is always exact.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import TASKS, dt_batch, experiment, hidden, max_diff, tiny_dt
from torch import nn

from eva_rl.adapters import (
    AdapterConfig,
    adapter_layers,
    export_peft,
    load_adapter,
    save_adapter,
)
from eva_rl.eva import dt_forward_and_mask
from eva_rl.inits import (
    CordaConfig,
    InitResult,
    LoraGaConfig,
    apply_init,
    compute_corda,
    compute_lora_ga,
)

peft = pytest.importorskip("peft")
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig  # noqa: E402
from peft.tuners.lora.config import LoraGAConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402
from peft.tuners.lora.loraga import preprocess_loraga  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 8.0


def targets(model):
    return [p for p, m in model.named_modules()
            if isinstance(m, nn.Linear) and p.startswith("blocks.")]


def batches():
    return [dt_batch(seed, batch=8) for seed in range(4)]


def peft_corda(dt, data, mode, rank):
    model = copy.deepcopy(dt)
    cfg = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=targets(dt),
                          init_lora_weights="corda",
                          corda_config=PeftCordaConfig(corda_method=mode))

    def run_model():  # PEFT's hook takes one sample (window) per forward
        for b in data:
            for i in range(b["states"].shape[0]):
                model(**{k: v[i:i + 1] for k, v in b.items()})

    preprocess_corda(model, cfg, run_model=run_model)
    return peft.get_peft_model(model, cfg)


def peft_lora_ga(dt, data, rank):
    model = copy.deepcopy(dt)
    cfg = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=targets(dt),
                          init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():
        for b in data:
            model.loss(b).backward()

    with warnings.catch_warnings():  # torch: the first block's inputs need no grad
        warnings.filterwarnings("ignore", message="Full backward hook")
        preprocess_loraga(model, cfg, train_step=train_step)
    return peft.get_peft_model(model, cfg)


def ours_with(dt, result, rank):
    model = copy.deepcopy(dt)
    apply_init(model, "t", result, AdapterConfig(method="lora", rank=rank, alpha=ALPHA))
    return model


def rel(a, b) -> float:
    return max_diff(a, b) / float(b.abs().max())


def compare_and_align(ours, theirs, paired: bool) -> dict[str, float]:
    """Worst relative differences of A, B (each singular vector up to sign) and of the
    residual base; flips our A rows / B columns (and their offsets) to PEFT's signs.
    ``paired``: A row i and B column i are one singular pair (CorDA), so share a sign."""
    worst = {"A": 0.0, "B": 0.0, "W_res": 0.0}
    inner = theirs.get_base_model()
    for path, layer in adapter_layers(ours).items():
        pl = inner.get_submodule(path)
        pa, pb = pl.lora_A["default"].weight.detach(), pl.lora_B["default"].weight.detach()
        a, b = layer.lora_A["t"], layer.lora_B["t"]
        sa = torch.sign((a.detach() * pa).sum(1))
        sb = sa if paired else torch.sign((b.detach() * pb).sum(0))
        assert bool((sa != 0).all() and (sb != 0).all())
        with torch.no_grad():
            for t in (a, layer.lora_offset_A["t"]):
                t.mul_(sa[:, None])
            for t in (b, layer.lora_offset_B["t"]):
                t.mul_(sb[None, :])
        s = layer.scaling["t"]
        assert s == pytest.approx(pl.scaling["default"])
        w_res = layer.weight - s * layer.lora_offset_B["t"] @ layer.lora_offset_A["t"]
        for key, x, y in (("A", a, pa), ("B", b, pb)):
            worst[key] = max(worst[key], rel(x.detach(), y.detach()))
        w_max = float(layer.weight.abs().max())  # W_res is the small remainder of W
        worst["W_res"] = max(worst["W_res"], max_diff(w_res.detach(), pl.weight) / w_max)
        # W_eff = W exactly at init (the offset), PEFT's W_res + s·B A = W in float32
        torch.testing.assert_close(layer.effective_weight("t"), layer.weight, rtol=0, atol=0)
    return worst


def train(model, data, steps=3):
    """A few Adam updates of what is trainable, on the DT's loss."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.train()
    params = [p for p in inner.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for b in data[:steps]:
        opt.zero_grad()
        inner.loss(b).backward()
        opt.step()
    inner.eval()


def check_training_and_export(dt, ours, theirs, data, tmp_path, kind):
    probe = dt_batch(99, batch=4)
    assert max_diff(hidden(ours, probe), hidden(dt, probe)) == 0.0  # the offset: exact
    assert max_diff(hidden(theirs, probe), hidden(dt, probe)) < 1e-5
    train(ours, data)
    train(theirs, data)
    h_ours, h_peft = hidden(ours, probe), hidden(theirs, probe)
    assert max_diff(h_ours, hidden(dt, probe)) > 1e-3  # it trained
    assert max_diff(h_ours, h_peft) < 1e-4
    # export: PEFT loads the folded rank-2r LoRA onto the untouched base
    out = export_peft(ours, "t", tmp_path / "peft", init={"kind": kind})
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * ours.blocks[0].attn.q_proj.ranks["t"] and cfg["lora_alpha"] == 2 * ALPHA
    assert json.loads((out / "eva_rl_export.json").read_text())["kind"] == kind
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(dt), str(out))
    assert max_diff(hidden(loaded, probe), h_ours) < 1e-5
    # our own format keeps the offset: save, load onto a fresh base, same function
    save_adapter(ours, "t", tmp_path / "adapter")
    again = copy.deepcopy(dt)
    load_adapter(again, tmp_path / "adapter")
    assert max_diff(hidden(again, probe), h_ours) == 0.0
    return max_diff(h_ours, h_peft)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft(mode, tmp_path):
    dt, data, rank = tiny_dt(), batches(), 4
    theirs = peft_corda(dt, data, mode, rank)
    result = compute_corda(dt, data, CordaConfig(mode=mode, rank=rank))
    assert result.paths == targets(dt) and result.batches_used == len(data)
    assert set(result.extra["samples"].values()) == {32}  # every window a sample
    # the kept components: the largest (ipm) or smallest (kpm) of each layer's spectrum
    s = result.S["blocks.0.mlp.fc_in"]
    assert s.shape == (rank,) and bool((s[:-1] >= s[1:]).all())
    ours = ours_with(dt, result, rank)
    worst = compare_and_align(ours, theirs, paired=True)
    print(f"CorDA {mode} vs PEFT, worst relative differences: {worst}")
    # float32: the covariances agree to ~2e-7, C^-1 (condition ~1e3) amplifies that
    assert worst["A"] < 1e-3 and worst["B"] < 1e-3 and worst["W_res"] < 5e-4, worst
    diff = check_training_and_export(dt, ours, theirs, data, tmp_path, f"corda_{mode}")
    print(f"CorDA {mode}: max |hidden ours - PEFT| after 3 Adam updates {diff:.3g}")


def test_corda_masks_padding_as_peft_sees_unpadded_windows():
    """Left-padded windows with the padding masked = PEFT on the same windows unpadded (the
    DT's real tokens do not see padding; positions are right-aligned)."""
    dt, rank = tiny_dt(), 4
    data = batches()[:2]
    lengths = torch.tensor([5, 1, 3, 4, 2, 5, 3, 1])
    for b in data:
        b["mask"] = torch.arange(5)[None, :] >= (5 - lengths)[:, None]
    model = copy.deepcopy(dt)
    cfg = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=targets(dt),
                          init_lora_weights="corda", corda_config=PeftCordaConfig())

    def run_model():
        for b in data:
            for i, n in enumerate(lengths.tolist()):
                model(**{k: v[i:i + 1, 5 - n:] for k, v in b.items() if k != "mask"})

    preprocess_corda(model, cfg, run_model=run_model)
    theirs = peft.get_peft_model(model, cfg)
    forward, mask_fn = dt_forward_and_mask(dt)
    result = compute_corda(dt, data, CordaConfig(rank=rank), forward=forward, mask_fn=mask_fn)
    worst = compare_and_align(ours_with(dt, result, rank), theirs, paired=True)
    assert worst["A"] < 1e-3 and worst["B"] < 1e-3 and worst["W_res"] < 5e-4, worst


def test_corda_modes_keep_opposite_ends():
    dt, data = tiny_dt(), batches()
    ipm = compute_corda(dt, data, CordaConfig(mode="ipm", rank=2))
    kpm = compute_corda(dt, data, CordaConfig(mode="kpm", rank=2))
    full = compute_corda(dt, data, CordaConfig(mode="ipm", rank=32))
    p = "blocks.1.attn.v_proj"
    torch.testing.assert_close(ipm.S[p], full.S[p][:2])
    torch.testing.assert_close(kpm.S[p], full.S[p][-2:])
    # all components together: U S V^T = W (V carries C^-1)
    w = dt.get_submodule(p).weight.detach()
    approx = full.U[p] @ torch.diag(full.S[p]) @ full.V[p].T
    assert max_diff(approx, w) < 1e-4 * float(w.abs().max())


def test_lora_ga_matches_peft(tmp_path):
    dt, data, rank = tiny_dt(), batches(), 8  # 4r = 32 = min(in, out): PEFT's SVD is exact
    theirs = peft_lora_ga(dt, data, rank)
    flags = [p.requires_grad for p in dt.parameters()]
    result = compute_lora_ga(dt, data, LoraGaConfig(rank=rank), loss_fn=lambda m, b: m.loss(b))
    assert result.paths == targets(dt) and result.S[targets(dt)[0]].shape == (2 * rank,)
    # the model is handed back as it was lent: flags, eval mode, no .grad left behind
    assert [p.requires_grad for p in dt.parameters()] == flags and not dt.training
    assert all(p.grad is None for p in dt.parameters())
    ours = ours_with(dt, result, rank)
    worst = compare_and_align(ours, theirs, paired=False)
    print(f"LoRA-GA vs PEFT, worst relative differences: {worst}")
    assert worst["A"] < 1e-3 and worst["B"] < 1e-3 and worst["W_res"] < 1e-4, worst
    diff = check_training_and_export(dt, ours, theirs, data, tmp_path, "lora_ga")
    print(f"LoRA-GA: max |hidden ours - PEFT| after 3 Adam updates {diff:.3g}")


@pytest.mark.parametrize("direction,scale", [("ArBr", "unit"), ("A2rBr", "weight_svd"),
                                             ("ArB2r", "gd_scale")])
def test_lora_ga_options_match_peft(direction, scale):
    dt, data, rank = tiny_dt(), batches()[:2], 8
    model = copy.deepcopy(dt)
    cfg = peft.LoraConfig(r=rank, lora_alpha=4.0, target_modules=["blocks.0.mlp.fc_in"],
                          init_lora_weights="lora_ga",
                          lora_ga_config=LoraGAConfig(direction=direction, scale=scale))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")
        preprocess_loraga(model, cfg, train_step=lambda: [model.loss(b).backward() for b in data])
    theirs = peft.get_peft_model(model, cfg).get_base_model().blocks[0].mlp.fc_in
    result = compute_lora_ga(dt, data, LoraGaConfig(rank=rank, direction=direction, scale=scale,
                                                    target_modules=["blocks.0.mlp.fc_in"]),
                             loss_fn=lambda m, b: m.loss(b))
    ours = copy.deepcopy(dt)
    apply_init(ours, "t", result, AdapterConfig(rank=rank, alpha=4.0,
                                                target_modules=["blocks.0.mlp.fc_in"]))
    layer = ours.blocks[0].mlp.fc_in
    for mine, peft_w in ((layer.lora_A["t"], theirs.lora_A["default"].weight),
                         (layer.lora_B["t"].T, theirs.lora_B["default"].weight.T)):
        sign = torch.sign((mine.detach() * peft_w.detach()).sum(1))[:, None]
        # weight_svd: PEFT's top singular value of W comes from svd_lowrank(q=r)
        assert rel(mine.detach() * sign, peft_w.detach()) < 2e-3


def test_result_round_trip_and_rank_check(tmp_path):
    dt, data = tiny_dt(), batches()[:2]
    result = compute_corda(dt, data, CordaConfig(rank=3, rank_pattern={"blocks.1.*": 0}))
    result.save(tmp_path / "corda")
    back = InitResult.load(tmp_path / "corda")
    assert back.kind == "corda" and back.config == result.config
    assert all(torch.equal(back.V[p], result.V[p]) for p in result.paths)
    model = copy.deepcopy(dt)
    with pytest.raises(ValueError, match="has ranks"):
        apply_init(model, "t", back, AdapterConfig(rank=3))
    apply_init(model, "t", back, AdapterConfig(rank=3, rank_pattern={"blocks.1.*": 0}))
    assert adapter_layers(model)["blocks.1.mlp.fc_in"].ranks["t"] == 0
    with pytest.raises(ValueError, match="initialises 'lora' adapters"):
        apply_init(copy.deepcopy(dt), "t", back, AdapterConfig(method="dora", rank=3,
                                                              rank_pattern={"blocks.1.*": 0}))
    (tmp_path / "corda" / "init.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="checksum"):
        InitResult.load(tmp_path / "corda")
    with pytest.raises(ValueError, match="needs 34 components"):
        compute_lora_ga(dt, data, LoraGaConfig(rank=17), loss_fn=lambda m, b: m.loss(b))


@pytest.mark.slow
def test_corda_and_lora_ga_run_end_to_end(setup, tmp_path):
    """``run_experiment`` with both methods; the adapter right after attach (re-attached
    from the saved result, as a resumed task does) leaves the predictions unchanged."""
    from agents.finetune import attach_method, finetune_seed
    from agents.methods import get_method
    from agents.peft_export import export_run_adapters
    from agents.protocols import (
        check_inputs,
        load_agent,
        read_record,
        run_dir_of,
        run_experiment,
        task_dir_of,
    )
    from eva_rl.data import WindowSampler

    exp = experiment(setup, protocol="single", methods=("corda_ipm", "lora_ga"), steps=2,
                     eval_every=0, eval_at_start=False, eval_episodes=1)
    results = run_experiment(exp, tmp_path / "run", report=False)
    datasets = check_inputs(exp)
    for run in results["runs"]:
        method = get_method(run["method"])
        for index, rec in enumerate(run["per_task"]):
            task = TASKS[index]
            assert rec["eva_seconds"] > 0 and rec["eva_ranks"] is None
            tdir = task_dir_of(run_dir_of(tmp_path / "run", method.name, 0), index, task)
            assert read_record(tdir) is not None
            saved = InitResult.load(tdir / method.initializer.result_dir)
            assert saved.extra["wall_seconds"] == pytest.approx(rec["eva_seconds"])
            agent = load_agent(exp, datasets)
            batch = WindowSampler([datasets[task]], agent.config.context_len,
                                  state_mean=agent.state_mean, state_std=agent.state_std,
                                  seed=1).sample(4)
            batch = {k: torch.as_tensor(v) for k, v in batch.items() if k != "task_index"}
            before = agent.model(**batch)
            _, seconds, ranks, _ = attach_method(agent, task, datasets[task], method,
                                                 exp.config, finetune_seed(0, index), tdir)
            assert seconds == pytest.approx(rec["eva_seconds"]) and ranks is None  # reused
            torch.testing.assert_close(agent.model(**batch), before, atol=1e-6, rtol=0)
            # the trained adapter differs from its initial A, B (offset kept as saved)
            trained = load_agent(exp, datasets)
            load_adapter(trained.model, tdir / "adapter", name=task)
            layer = next(iter(adapter_layers(trained.model).values()))
            assert not torch.equal(layer.lora_A[task], layer.lora_offset_A[task])
            # the run's export: PEFT on the pretrained base reproduces the trained adapter
            out = export_run_adapters(tmp_path / "run", method.name, 0,
                                      tmp_path / f"peft_{index}", tasks=[task])[task]
            provenance = json.loads((out / "eva_rl_export.json").read_text())
            assert provenance["kind"] == method.name and provenance["init"]["rank"] == 4
            base = load_agent(exp, datasets).model
            with torch.no_grad():
                theirs = peft.PeftModel.from_pretrained(base, str(out))(**batch)
                torch.testing.assert_close(theirs, trained.model(**batch), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_bench_inits_prints_a_row_per_method(capsys):
    import re

    import bench_inits

    bench_inits.main(["--presets", "tiny", "--batches", "2", "--batch-size", "4"])
    out = capsys.readouterr().out
    for name in bench_inits.METHODS:
        assert re.search(rf"^\| tiny \| [\d,]+ \| {name} \| [12] \| \d+\.\d+ \| [\d.na/]+ \|$",
                         out, re.MULTILINE), name
