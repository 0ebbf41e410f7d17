"""EVA: incremental SVD maths, rank allocation, hooks, compute/apply, save/load, logging, DDP."""

from __future__ import annotations

import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from eva_rl.adapters import AdapterConfig, adapter_layers, add_adapter, set_active_adapter
from eva_rl.eva import (
    EvaConfig,
    EvaResult,
    IncrementalSVD,
    allocate_ranks,
    apply_eva,
    compute_eva,
    dt_forward_and_mask,
    log_eva,
    partial_fit_many,
)
from eva_rl.models import DecisionTransformer, DTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

def known_spectrum(n=600, d=24, k=6, seed=0, center_shift=0.0):
    """Rows with a clear top-k subspace: singular values 10..5 then a 0.3 noise floor."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]  # orthonormal columns
    scales = torch.cat([torch.linspace(10, 5, k), torch.full((d - k,), 0.3)])
    x = torch.randn(n, d, generator=g) * scales @ basis.T
    return x + center_shift


def subspace_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine of the principal angles between the row spaces of a and b."""
    qa, qb = torch.linalg.qr(a.double().T)[0], torch.linalg.qr(b.double().T)[0]
    return float(torch.linalg.svdvals(qa.T @ qb).min())


@pytest.mark.parametrize("solver", ["exact", "lowrank", "gram"])
@pytest.mark.parametrize("batch", [40, 150, 600])
def test_incremental_svd_matches_full_svd(solver, batch):
    x = known_spectrum(center_shift=3.0)
    xc = x - x.mean(0)
    _, s_full, vt_full = torch.linalg.svd(xc.double(), full_matrices=False)
    for order in (torch.arange(len(x)), torch.randperm(len(x), generator=torch.Generator()
                                                       .manual_seed(1))):
        svd = IncrementalSVD(6, svd=solver)
        for i in range(0, len(x), batch):
            svd.partial_fit(x[order[i:i + batch]])
        assert svd.n_samples_seen_ == len(x)
        assert svd.components_.shape == (6, 24)
        assert subspace_cos(svd.components_, vt_full[:6].float()) >= 0.99
        # each component individually, up to sign
        cos = (svd.components_.double() * vt_full[:6]).sum(1).abs()
        assert cos.min() >= 0.99
        ratio_full = s_full[:6] ** 2 / (s_full**2).sum()
        torch.testing.assert_close(svd.explained_variance_ratio_.double(), ratio_full,
                                   rtol=0.03, atol=1e-3)
        torch.testing.assert_close(svd.mean_, x.mean(0), rtol=1e-4, atol=1e-4)


def test_uncentred_option_and_signs():
    x = known_spectrum(center_shift=4.0)
    _, _, vt = torch.linalg.svd(x.double(), full_matrices=False)
    svd = IncrementalSVD(7, center=False, svd="exact")  # the mean direction + the 6 strong ones
    for i in range(0, len(x), 300):
        svd.partial_fit(x[i:i + 300])
    assert subspace_cos(svd.components_, vt[:7].float()) >= 0.99
    mean_dir = x.mean(0) / x.mean(0).norm()
    assert abs(float(svd.components_[0] @ mean_dir)) > 0.9
    # deterministic signs: the largest-|.| entry of each component is positive
    idx = svd.components_.abs().argmax(1)
    assert (svd.components_[torch.arange(7), idx] > 0).all()


def test_partial_fit_many_batched_equals_separate():
    xs = [known_spectrum(n=400, seed=s) for s in range(3)]
    a = [IncrementalSVD(4, svd="exact") for _ in xs]
    b = [IncrementalSVD(4, svd="exact") for _ in xs]
    for i in range(0, 400, 100):
        assert partial_fit_many(a, [x[i:i + 100] for x in xs], batched=True) == [True] * 3
        for svd, x in zip(b, xs, strict=True):
            svd.partial_fit(x[i:i + 100])
    for s1, s2 in zip(a, b, strict=True):
        torch.testing.assert_close(s1.components_, s2.components_, atol=1e-4, rtol=1e-4)


def test_incremental_svd_bad_input():
    svd = IncrementalSVD(4)
    with pytest.raises(ValueError, match="2-d"):
        svd.partial_fit(torch.randn(3, 4, 5))
    svd.partial_fit(torch.randn(2, 8))  # fewer rows than components: skipped
    assert not svd.fitted
    svd.partial_fit(torch.randn(10, 8))
    with pytest.raises(ValueError, match="features"):
        svd.partial_fit(torch.randn(10, 9))
    with pytest.raises(ValueError, match="solver"):
        IncrementalSVD(4, svd="qr")


def test_allocate_ranks():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1, 0.05]), "b": torch.tensor([0.2, 0.01, 0.0, 0.0]),
              "c": torch.tensor([0.02, 0.01, 0.0, 0.0])}
    assert allocate_ranks(ratios, budget=6) == {"a": 4, "b": 1, "c": 1}
    assert allocate_ranks(ratios, budget=5) == {"a": 4, "b": 1, "c": 0}  # rank 0 allowed
    assert sum(allocate_ranks(ratios, budget=6).values()) == 6
    # reverse: the 6 lowest ratios (four zeros, then the two 0.01s)
    assert allocate_ranks(ratios, budget=6, reverse=True) == {"a": 0, "b": 3, "c": 3}
    # ties go to the earlier layer
    tied = {"q": torch.tensor([0.4, 0.2]), "k": torch.tensor([0.4, 0.2])}
    assert allocate_ranks(tied, budget=3) == {"q": 2, "k": 1}
    with pytest.raises(ValueError, match="exceeds"):
        allocate_ranks(ratios, budget=13)


class AttnMLP(nn.Module):
    """Attention-like toy: q, k, v read the same normalised input; then an MLP."""

    def __init__(self, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(5, d)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln=nn.LayerNorm(d), q=nn.Linear(d, d), k=nn.Linear(d, d), v=nn.Linear(d, d),
            fc_in=nn.Linear(d, 2 * d), fc_out=nn.Linear(2 * d, d))) for _ in range(2))

    def forward(self, x):
        x = self.embed(x)  # (B, L, d)
        for b in self.blocks:
            h = b["ln"](x)
            att = torch.softmax(b["q"](h) @ b["k"](h).mT / 4, -1) @ b["v"](h)
            x = x + att
            x = x + b["fc_out"](torch.relu(b["fc_in"](x)))
        return x


def toy_batches(n=30, b=8, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(5, 5, generator=g)
    return [torch.randn(b, length, 5, generator=g) * torch.tensor([3, 2, 1, .5, .2]) @ mix
            for _ in range(n)]


def test_compute_eva_budget_sharing_and_convergence():
    model = AttnMLP()
    res = compute_eva(model, toy_batches(60), EvaConfig(rank=3, rho=2.0, tau=0.99))
    assert len(res.paths) == 10
    assert sum(res.ranks.values()) == 10 * 3
    assert res.stop_reason == "converged" and res.converged and not res.cap_reached
    # q, k, v share one decomposition (the same tensor), others are their own
    for i in range(2):
        assert res.shared[f"blocks.{i}.k"] == f"blocks.{i}.q" == res.shared[f"blocks.{i}.v"]
        assert res.components[f"blocks.{i}.k"] is res.components[f"blocks.{i}.q"]
        assert res.shared[f"blocks.{i}.fc_in"] == f"blocks.{i}.fc_in"
    assert all(c.shape[0] == 6 for c in res.components.values())
    assert all(0 <= r <= 6 for r in res.ranks.values())
    # rank redistribution actually happened, and alpha follows alpha * r_new / r
    assert len(set(res.ranks.values())) > 1
    for p in res.paths:
        assert res.alphas[p] == pytest.approx(8.0 * res.ranks[p] / 3)
    # components orthonormal
    c = res.components["blocks.0.fc_out"]
    torch.testing.assert_close(c @ c.T, torch.eye(6), atol=1e-4, rtol=0)
    # a converged layer is unhooked: layers converging earlier saw fewer rows
    steps = {p: res.convergence_step[p] for p in res.paths}
    assert all(s is not None for s in steps.values())
    early = min(steps, key=steps.get)
    late = max(steps, key=steps.get)
    if steps[early] < steps[late]:
        assert res.n_samples[early] < res.n_samples[late]
    # no hooks left behind
    assert all(not m._forward_hooks for m in model.modules())


def test_rho_one_gives_r_everywhere():
    res = compute_eva(AttnMLP(), toy_batches(40), EvaConfig(rank=4, rho=1.0))
    assert set(res.ranks.values()) == {4}
    assert all(c.shape[0] == 4 for c in res.components.values())


def test_cap_is_honoured_and_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="eva_rl.eva.core"):
        res = compute_eva(AttnMLP(), toy_batches(20), EvaConfig(rank=2, tau=1.0, max_batches=3))
    assert res.batches_used == 3 and res.cap_reached and res.stop_reason == "max_batches"
    assert "max_batches=3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eva_rl.eva.core"):
        res = compute_eva(AttnMLP(), toy_batches(4), EvaConfig(rank=2, tau=1.0))
    assert res.batches_used == 4 and res.stop_reason == "exhausted" and not res.cap_reached
    assert "ran out" in caplog.text


def test_padded_rows_do_not_change_result():
    batches = toy_batches(25)
    masks = [torch.arange(12)[None, :] >= torch.randint(0, 6, (8, 1)) for _ in batches]
    garbage = [torch.where(m[..., None], x, torch.randn_like(x) * 50) for x, m in
               zip(batches, masks, strict=True)]

    class Model(nn.Module):  # per-token model: padded rows cannot leak into real rows
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 8))

        def forward(self, x):
            return self.blocks(x)

    cfg = EvaConfig(rank=2, rho=2.0, svd="exact", max_batches=6)
    mask_of = dict(zip(map(id, batches), masks, strict=True))
    mask_of.update(zip(map(id, garbage), masks, strict=True))
    res_a = compute_eva(Model(), batches, cfg, mask_fn=lambda b: mask_of[id(b)])
    res_b = compute_eva(Model(), garbage, cfg, mask_fn=lambda b: mask_of[id(b)])
    res_c = compute_eva(Model(), garbage, cfg)  # without the mask the garbage does matter
    for p in res_a.paths:
        torch.testing.assert_close(res_a.components[p], res_b.components[p])
        assert res_a.n_samples[p] == res_b.n_samples[p] == sum(int(m.sum()) for m in
                                                                masks[:res_a.batches_used])
    assert not torch.allclose(res_a.components["blocks.0"], res_c.components["blocks.0"],
                              atol=1e-2)
    with pytest.raises(ValueError, match="mask has"):
        compute_eva(Model(), batches, cfg, mask_fn=lambda b: torch.ones(3, dtype=torch.bool))


def tiny_dt_batches(n=12, b=6, seed=0, pad=True):
    cfg = DTConfig.preset("tiny")
    g = torch.Generator().manual_seed(seed)
    k = cfg.context_len
    out = []
    for _ in range(n):
        start = torch.randint(0, k, (b, 1), generator=g) if pad else torch.zeros(b, 1)
        out.append(dict(
            states=torch.randn(b, k, 39, generator=g), actions=torch.rand(b, k, 4, generator=g),
            rewards=torch.randn(b, k, 1, generator=g),
            returns_to_go=torch.randn(b, k, 1, generator=g),
            timesteps=torch.randint(0, 100, (b, k), generator=g),
            mask=torch.arange(k)[None] >= start, task_index=torch.zeros(b, dtype=torch.long)))
    return out


def test_dt_mask_drops_padding_and_selects_token_types():
    torch.manual_seed(0)
    dt = DecisionTransformer(DTConfig.preset("tiny")).eval()
    batches = tiny_dt_batches()
    forward, mask_fn = dt_forward_and_mask(dt)
    cfg = EvaConfig(rank=2, svd="exact", tau=1.0, max_batches=4)
    res = compute_eva(dt, batches, cfg, forward=forward, mask_fn=mask_fn)
    real = sum(int(b["mask"].sum()) for b in batches[:4]) * 4  # 4 tokens per real step
    assert res.n_samples["blocks.0.attn.q_proj"] == real
    # padded positions' content does not matter (attention never reads padded keys)
    noisy = [{**b, "states": torch.where(b["mask"][..., None], b["states"], 99.0)}
             for b in batches]
    res2 = compute_eva(dt, noisy, cfg, forward=forward, mask_fn=mask_fn)
    for p in res.paths:
        torch.testing.assert_close(res.components[p], res2.components[p], atol=1e-4, rtol=0)
    forward, mask_fn = dt_forward_and_mask(dt, token_types=("state", "action"))
    res3 = compute_eva(dt, batches, cfg, forward=forward, mask_fn=mask_fn)
    assert res3.n_samples["blocks.0.attn.q_proj"] == real // 2
    with pytest.raises(ValueError, match="valid"):
        dt_forward_and_mask(dt, token_types=("image",))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_apply_eva_keeps_output_and_other_adapters(method):
    torch.manual_seed(0)
    dt = DecisionTransformer(DTConfig.preset("tiny")).eval()
    batches = tiny_dt_batches()
    x = {k: v for k, v in batches[0].items() if k != "task_index"}
    base_out = dt(**x)
    add_adapter(dt, "old", AdapterConfig(method="lora", rank=2))
    with torch.no_grad():  # make the old adapter non-trivial
        for layer in adapter_layers(dt).values():
            layer.lora_B["old"].normal_()
    old_state = {p: {k: t.clone() for k, t in layer.adapter_tensors("old").items()}
                 for p, layer in adapter_layers(dt).items()}
    old_out = dt(**x)
    assert not torch.allclose(old_out, base_out)
    forward, mask_fn = dt_forward_and_mask(dt)
    res = compute_eva(dt, batches, EvaConfig(rank=4, rho=2.0, alpha=2.0), forward, mask_fn)
    # EVA ran on the base model and put the old adapter back
    assert adapter_layers(dt)["blocks.0.mlp.fc_in"].active_adapter == "old"
    torch.testing.assert_close(dt(**x), old_out)
    paths = apply_eva(dt, "new", res, AdapterConfig(method=method, rank=4, alpha=2.0))
    assert paths == res.paths
    torch.testing.assert_close(dt(**x), base_out, atol=1e-5, rtol=1e-5)  # B = 0
    layers = adapter_layers(dt)
    for p, layer in layers.items():
        assert layer.ranks["new"] == res.ranks[p]
        assert layer.alphas["new"] == pytest.approx(2.0 * res.ranks[p] / 4)
        if res.ranks[p]:
            torch.testing.assert_close(layer.lora_A["new"], res.lora_A()[p])
            assert not layer.lora_B["new"].any()
            if method == "dora":
                torch.testing.assert_close(layer.lora_magnitude_vector["new"],
                                           layer.weight.norm(dim=1))
        for k, t in old_state[p].items():
            assert torch.equal(layer.adapter_tensors("old")[k], t)
    set_active_adapter(dt, "old")
    torch.testing.assert_close(dt(**x), old_out)
    with pytest.raises(ValueError, match="pissa"):
        apply_eva(dt, "other", res, AdapterConfig(method="pissa"))


def test_whiten_and_reverse():
    batches = toy_batches(30)
    plain = compute_eva(AttnMLP(), batches, EvaConfig(rank=2, svd="exact", tau=0.9))
    white = compute_eva(AttnMLP(), batches, EvaConfig(rank=2, svd="exact", tau=0.9, whiten=True))
    p = "blocks.0.fc_in"
    r = white.ranks[p]
    expected = plain.components[p][:r] / plain.singular_values[p][:r].sqrt()[:, None]
    torch.testing.assert_close(white.lora_A()[p], expected)
    rev = compute_eva(AttnMLP(), batches, EvaConfig(rank=2, svd="exact", tau=0.9, reverse=True,
                                                    max_batches=30))
    assert sum(rev.ranks.values()) == 20
    a = rev.lora_A()[p]
    k = rev.components[p].shape[0]
    torch.testing.assert_close(a, rev.components[p][k - rev.ranks[p]:])


def test_save_load_roundtrip(tmp_path):
    res = compute_eva(AttnMLP(), toy_batches(30), EvaConfig(rank=3))
    res.save(tmp_path / "eva")
    with pytest.raises(FileExistsError):
        res.save(tmp_path / "eva")
    back = EvaResult.load(tmp_path / "eva")
    assert back.ranks == res.ranks and back.alphas == res.alphas and back.shared == res.shared
    assert back.config == res.config and back.stop_reason == res.stop_reason
    assert back.convergence_step == res.convergence_step
    for p in res.paths:
        torch.testing.assert_close(back.components[p], res.components[p])
        torch.testing.assert_close(back.lora_A()[p], res.lora_A()[p])
    assert not list((tmp_path / "eva").glob("*.tmp"))
    (tmp_path / "eva" / "eva.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt"):
        EvaResult.load(tmp_path / "eva")
    with pytest.raises(ValueError, match="missing"):
        EvaResult.load(tmp_path / "nothing")


def test_log_eva_writes_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    res = compute_eva(AttnMLP(), toy_batches(30), EvaConfig(rank=3))
    with SummaryWriter(tmp_path) as w:
        log_eva(w, res, step=5)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    assert "eva/rank/blocks.0.q" in tags["scalars"]
    assert acc.Scalars("eva/rank/blocks.1.fc_out")[0].value == res.ranks["blocks.1.fc_out"]
    assert acc.Scalars("eva/rank/blocks.1.fc_out")[0].step == 5
    curve = acc.Scalars("eva/cumulative_explained_variance/blocks.0.fc_in")
    assert len(curve) == 6 and curve[-1].value <= 1.0 + 1e-6
    assert acc.Scalars("eva/init_seconds")[0].value == pytest.approx(res.seconds, rel=1e-5)
    assert any("ranks" in t for t in tags["tensors"])  # add_text is stored as a tensor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batches = toy_batches(10, seed=rank)  # every rank sees different data
        res = compute_eva(AttnMLP(), batches, EvaConfig(rank=3, svd="exact"))
        res.save(os.path.join(out_dir, f"rank{rank}"))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_agree_and_use_all_data(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (EvaResult.load(tmp_path / f"rank{i}") for i in range(2))
    assert r0.ranks == r1.ranks and r0.batches_used == r1.batches_used
    # the same as one process seeing both ranks' batch i concatenated
    joined = [torch.cat([a, b]) for a, b in zip(toy_batches(10, seed=0), toy_batches(10, seed=1),
                                                 strict=True)]
    single = compute_eva(AttnMLP(), joined, EvaConfig(rank=3, svd="exact"))
    assert single.ranks == r0.ranks and single.batches_used == r0.batches_used
    for p in r0.paths:
        assert torch.equal(r0.lora_A()[p], r1.lora_A()[p])
        torch.testing.assert_close(r0.components[p], single.components[p], atol=1e-4, rtol=0)
        assert r0.n_samples[p] == single.n_samples[p]
