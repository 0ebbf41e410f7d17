"""Unit and multi-task tests of eva_rl.adapters on small models of nn.Linear layers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from eva_rl.adapters import (
    ADAPTER_KINDS,
    AdapterConfig,
    AdapterLinear,
    active_adapter,
    adapter_layers,
    adapter_names,
    add_adapter,
    count_parameters,
    delete_adapter,
    dora_weight_norm,
    load_adapter,
    merge_adapter,
    prepare_full_finetuning,
    save_adapter,
    set_active_adapter,
    unmerge_adapter,
)
from eva_rl.adapters.variants import dora_linear, low_rank_addmm

D, H, IN, OUT = 8, 12, 5, 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(D, H)
        self.fc_out = nn.Linear(H, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc_out(torch.tanh(self.fc_in(x)))


class Tiny(nn.Module):
    """embed -> 2 residual blocks -> head; module paths like the DT's `blocks.{i}.*`."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


pytestmark = pytest.mark.usefixtures("one_thread")


BLOCK_PATHS = ["blocks.0.fc_in", "blocks.0.fc_out", "blocks.1.fc_in", "blocks.1.fc_out"]


@pytest.fixture
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(4, 6, IN, generator=torch.Generator().manual_seed(1))


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, seed: int = 0) -> None:
    """A few plain SGD steps on the trainable parameters towards a random target.

    Written out by hand: the first `torch.optim` optimiser imports torch._dynamo (~6 s here).
    """
    target = torch.randn(*x.shape[:-1], OUT, generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing trainable"
    model.train()
    for _ in range(steps):
        model.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        with torch.no_grad():
            for p in params:
                p -= 0.5 * p.grad


# --- initialisation --------------------------------------------------------------------


@pytest.mark.parametrize("method", ADAPTER_KINDS)
def test_fresh_adapter_keeps_the_output_and_base(model: Tiny, x: torch.Tensor, method: str) -> None:
    y0 = model(x)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = add_adapter(model, "t1", AdapterConfig(method=method, rank=4, alpha=6.0))
    assert paths == BLOCK_PATHS
    y1 = model(x)
    if method == "lora":
        assert torch.equal(y0, y1)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for path, layer in adapter_layers(model).items():
        assert torch.equal(layer.weight, base[f"{path}.weight"])  # shared base untouched
        torch.testing.assert_close(layer.effective_weight("t1"), layer.weight, atol=1e-5, rtol=0)
    assert not isinstance(model.embed, AdapterLinear) and not isinstance(model.head, AdapterLinear)


def test_lora_init_and_scaling(model: Tiny) -> None:
    cfg = AdapterConfig(
        rank=4, alpha=8.0, rank_pattern={"blocks.*.fc_out": 2, "blocks.1.fc_out": 3},
        alpha_pattern={"blocks.0.*": 1.0},
    )
    add_adapter(model, "t", cfg)
    layers = adapter_layers(model)
    assert {p: lay.ranks["t"] for p, lay in layers.items()} == dict(
        zip(BLOCK_PATHS, [4, 2, 4, 3], strict=True)
    )
    assert layers["blocks.0.fc_in"].scaling["t"] == pytest.approx(1.0 / 4)
    assert layers["blocks.1.fc_out"].scaling["t"] == pytest.approx(8.0 / 3)
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_B["t"]) == 0
        assert torch.count_nonzero(layer.lora_A["t"]) == layer.lora_A["t"].numel()
    add_adapter(model, "rs", AdapterConfig(rank=4, alpha=8.0, use_rslora=True))
    assert layers["blocks.0.fc_in"].scaling["rs"] == pytest.approx(8.0 / 2)


def test_seeded_init_is_reproducible() -> None:
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        torch.manual_seed(3)
        add_adapter(m, "t", AdapterConfig(method="dora"))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_given_a(model: Tiny, x: torch.Tensor, method: str) -> None:
    """EVA's path: each listed layer gets that A (rank = A.shape[0], 0 allowed), B = 0."""
    y0 = model(x)
    given = {"blocks.0.fc_in": torch.randn(3, D), "blocks.1.fc_out": torch.randn(0, H),
             "head": torch.randn(2, D)}
    cfg = AdapterConfig(method=method, alpha=2.0, alpha_pattern={"blocks.*": 5.0, "head": 7.0})
    paths = add_adapter(model, "eva", cfg, lora_A=given)
    assert paths == ["blocks.0.fc_in", "blocks.1.fc_out", "head"]  # model order
    layers = adapter_layers(model)
    assert set(layers) == set(paths)
    assert torch.equal(layers["blocks.0.fc_in"].lora_A["eva"], given["blocks.0.fc_in"])
    assert torch.count_nonzero(layers["head"].lora_B["eva"]) == 0
    assert layers["blocks.0.fc_in"].scaling["eva"] == pytest.approx(5.0 / 3)
    assert layers["head"].scaling["eva"] == pytest.approx(7.0 / 2)  # exact key wins over glob
    zero = layers["blocks.1.fc_out"]
    assert zero.ranks["eva"] == 0 and "eva" not in zero.lora_A and "eva" not in zero.lora_B
    if method == "dora":
        for p in ("blocks.0.fc_in", "head"):
            torch.testing.assert_close(
                layers[p].lora_magnitude_vector["eva"], layers[p].weight.norm(dim=1)
            )
    assert count_parameters(model, "eva") == 3 * (D + H) + 2 * (D + OUT) + (
        (H + OUT) if method == "dora" else 0
    )
    torch.testing.assert_close(model(x), y0, rtol=1e-5, atol=1e-6)


def test_given_a_errors(model: Tiny) -> None:
    with pytest.raises(ValueError, match="methods"):
        add_adapter(model, "e", AdapterConfig(method="pissa"), lora_A={"head": torch.ones(1, D)})
    with pytest.raises(ValueError, match=r"lora_A\['head'\] must be a \(rank, 8\)"):
        add_adapter(model, "e", AdapterConfig(), lora_A={"head": torch.ones(2, D + 1)})
    with pytest.raises(ValueError, match="not nn.Linear"):
        add_adapter(model, "e", AdapterConfig(), lora_A={"blocks.0": torch.ones(2, D)})
    with pytest.raises(ValueError, match="contradicts"):
        add_adapter(
            model, "e", AdapterConfig(rank_pattern={"head": 3}), lora_A={"head": torch.ones(2, D)}
        )
    with pytest.raises(ValueError, match="non-finite"):
        add_adapter(model, "e", AdapterConfig(), lora_A={"head": torch.full((2, D), torch.nan)})
    assert adapter_layers(model) == {}  # a refused call changes nothing


def test_config_and_target_errors(model: Tiny) -> None:
    with pytest.raises(ValueError, match="unknown adapter method 'vera'"):
        AdapterConfig(method="vera")
    with pytest.raises(ValueError, match="rank must be an integer"):
        AdapterConfig(rank=-1)
    with pytest.raises(ValueError, match="dropout"):
        AdapterConfig(dropout=1.0)
    with pytest.raises(ValueError, match="'attn.*' matches no nn.Linear"):
        add_adapter(model, "t", AdapterConfig(target_modules=("blocks.*", "attn.*")))
    with pytest.raises(ValueError, match="rank_pattern key 'blocks.*.q_proj'"):
        add_adapter(model, "t", AdapterConfig(rank_pattern={"blocks.*.q_proj": 2}))
    with pytest.raises(ValueError, match="pissa rank 9 on layer 'blocks.0.fc_in'"):
        add_adapter(model, "t", AdapterConfig(method="pissa", rank=9))
    with pytest.raises(ValueError, match="alpha must be > 0 on layer 'blocks.1.fc_in'"):
        add_adapter(model, "t", AdapterConfig(alpha_pattern={"blocks.1.fc_in": 0.0}))
    with pytest.raises(ValueError, match="adapter name"):
        add_adapter(model, "a.b", AdapterConfig())
    assert adapter_layers(model) == {}
    add_adapter(model, "t", AdapterConfig())
    with pytest.raises(ValueError, match="already has an adapter named 't'"):
        add_adapter(model, "t", AdapterConfig(method="dora"))
    with pytest.raises(KeyError, match="no adapter named 'u'"):
        set_active_adapter(model, "u")
    cfg = AdapterConfig(target_modules=["embed", "head"])
    assert AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_targets_heads_and_no_double_wrapping(model: Tiny) -> None:
    add_adapter(model, "a", AdapterConfig(target_modules=("blocks.0.*",)))
    add_adapter(model, "b", AdapterConfig(target_modules=("blocks.*", "head")))
    layers = adapter_layers(model)
    assert list(layers) == [*BLOCK_PATHS, "head"]
    assert not isinstance(layers["blocks.0.fc_in"].base_layer, AdapterLinear)
    assert set(layers["blocks.0.fc_in"].ranks) == {"a", "b"}
    assert set(layers["head"].ranks) == {"b"}
    assert adapter_names(model) == ["a", "b"]


# --- activation, counting, fft ----------------------------------------------------------


def test_set_active_adapter_and_counts(model: Tiny, x: torch.Tensor) -> None:
    n_base = sum(p.numel() for p in model.parameters())
    y0 = model(x)
    add_adapter(model, "lo", AdapterConfig(rank=2))
    add_adapter(model, "do", AdapterConfig(method="dora", rank=3))
    lora_n = 2 * 2 * (D + H) + 2 * 2 * (H + D)
    dora_n = 3 * 2 * (D + H) + 3 * 2 * (H + D) + 2 * (H + D)
    assert count_parameters(model, "lo") == lora_n
    assert count_parameters(model, "do") == dora_n
    assert active_adapter(model) == "do" and count_parameters(model) == dora_n
    set_active_adapter(model, "lo")
    assert count_parameters(model) == lora_n
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".lo") for n in trainable)
    for layer in adapter_layers(model).values():
        layer.lora_B["lo"].data.normal_()
    assert not torch.allclose(model(x), y0)
    set_active_adapter(model, None)
    assert count_parameters(model) == 0 and torch.equal(model(x), y0)
    assert sum(p.numel() for p in model.parameters()) == n_base + lora_n + dora_n


def test_full_finetuning(model: Tiny) -> None:
    n = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    assert prepare_full_finetuning(model) == n == count_parameters(model)
    add_adapter(model, "t", AdapterConfig())
    with pytest.raises(ValueError, match="without adapters"):
        prepare_full_finetuning(model)


def test_delete_adapter_restores_plain_linears(model: Tiny, x: torch.Tensor) -> None:
    keys = set(model.state_dict())
    y0 = model(x)
    add_adapter(model, "a", AdapterConfig(rank=2))
    add_adapter(model, "b", AdapterConfig(method="pissa", rank=2, target_modules=("blocks.0.*",)))
    delete_adapter(model, "a")
    assert adapter_names(model) == ["b"] and list(adapter_layers(model)) == BLOCK_PATHS[:2]
    assert active_adapter(model) == "b"
    delete_adapter(model, "b")
    assert adapter_layers(model) == {} and set(model.state_dict()) == keys
    assert torch.equal(model(x), y0)
    with pytest.raises(KeyError):
        delete_adapter(model, "b")


# --- variants --------------------------------------------------------------------------


def test_dora_fast_norm_matches_dense() -> None:
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(33, 17, generator=g), torch.randn(5, 17, generator=g), torch.randn(
        33, 5, generator=g
    )
    fast = dora_weight_norm(w, w.square().sum(1), a, b, 0.7)
    torch.testing.assert_close(fast, (w + 0.7 * b @ a).norm(dim=1), rtol=1e-5, atol=0)


def test_dora_output_and_detached_norm(model: Tiny, x: torch.Tensor) -> None:
    add_adapter(model, "d", AdapterConfig(method="dora", rank=3, alpha=4.0))
    layer = model.blocks[0].fc_in
    layer.lora_B["d"].data.normal_()
    layer.lora_magnitude_vector["d"].data.uniform_(0.5, 2.0)
    h = torch.randn(7, D)
    w_dir = layer.weight + layer.scaling["d"] * layer.lora_B["d"] @ layer.lora_A["d"]
    expected = (layer.lora_magnitude_vector["d"] / w_dir.norm(dim=1)) * (h @ w_dir.T) + layer.bias
    torch.testing.assert_close(layer(h), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        layer.effective_weight("d") @ h.T + layer.bias[:, None], expected.T, rtol=1e-5, atol=1e-5
    )
    layer.weight.data.mul_(1.5)  # an in-place edit of the base is seen (no stale norm)
    w_dir = layer.weight + layer.scaling["d"] * layer.lora_B["d"] @ layer.lora_A["d"]
    expected = (layer.lora_magnitude_vector["d"] / w_dir.norm(dim=1)) * (h @ w_dir.T) + layer.bias
    torch.testing.assert_close(layer(h), expected, rtol=1e-5, atol=1e-6)
    # the norm is a constant for autograd: d out / d m = direction output / norm
    layer.zero_grad()
    layer(h).sum().backward()
    grad_m = ((h @ w_dir.T) / w_dir.norm(dim=1)).sum(0)
    torch.testing.assert_close(layer.lora_magnitude_vector["d"].grad, grad_m, rtol=1e-5, atol=1e-5)


def test_low_rank_backward_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    args = [
        torch.randn(shape, generator=g, dtype=torch.double).requires_grad_(True)
        for shape in ((6, 5), (6, 4), (3, 4), (5, 3))
    ]
    assert torch.autograd.gradcheck(lambda *t: low_rank_addmm(*t, 0.7), args)
    x, w, bias, a, b, ms = (
        torch.randn(shape, generator=g, dtype=torch.double).requires_grad_(True)
        for shape in ((6, 4), (5, 4), (5,), (3, 4), (5, 3), (5,))
    )
    assert torch.autograd.gradcheck(lambda *t: dora_linear(*t, 0.7), (x, w, bias, a, b, ms))
    no_bias = (w, a, b, ms)
    assert torch.autograd.gradcheck(lambda *t: dora_linear(x, t[0], None, *t[1:], 0.7), no_bias)


@pytest.mark.parametrize("method", ["lora", "dora", "pissa"])
def test_bf16_autocast_training(model: Tiny, x: torch.Tensor, method: str) -> None:
    add_adapter(model, "t", AdapterConfig(method=method, rank=4))
    for layer in adapter_layers(model).values():
        layer.lora_B["t"].data.normal_()
    params = [p for p in model.parameters() if p.requires_grad]
    model(x).sum().backward()
    ref = [p.grad.clone() for p in params]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for p, r in zip(params, ref, strict=True):
        assert p.grad.dtype == torch.float32
        assert float((p.grad - r).norm() / r.norm()) < 0.05


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_only_in_training(model: Tiny, x: torch.Tensor, method: str) -> None:
    add_adapter(model, "t", AdapterConfig(method=method, dropout=0.5))
    for layer in adapter_layers(model).values():
        layer.lora_B["t"].data.normal_()
    model.eval()
    y_eval = model(x)
    assert torch.equal(model(x), y_eval)
    model.train()
    assert not torch.allclose(model(x), y_eval)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_weight_driven_offset_inside_the_adapter(model: Tiny, method: str) -> None:
    base = model.blocks[0].fc_in.weight.detach().clone()
    add_adapter(model, "w", AdapterConfig(method=method, rank=3, alpha=2.0))
    layer = model.blocks[0].fc_in
    s = layer.scaling["w"]
    offset = -s * layer.lora_offset_B["w"] @ layer.lora_offset_A["w"]
    torch.testing.assert_close(offset, -s * layer.lora_B["w"] @ layer.lora_A["w"])
    assert not layer.lora_offset_A["w"].requires_grad
    if method == "pissa":  # s·BA is the top-3 SVD part of W
        u, sv, vh = torch.linalg.svd(base)
        torch.testing.assert_close(-offset, (u[:, :3] * sv[:3]) @ vh[:3], atol=1e-5, rtol=0)
    else:  # B has orthonormal columns
        b = layer.lora_B["w"]
        torch.testing.assert_close(b.T @ b, torch.eye(3), atol=1e-5, rtol=0)
    assert torch.equal(layer.weight, base)
    assert count_parameters(model, "w") == 3 * 2 * (D + H) + 3 * 2 * (H + D)


# --- merge ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ADAPTER_KINDS)
def test_merge_unmerge_exact(model: Tiny, x: torch.Tensor, method: str) -> None:
    add_adapter(model, "other", AdapterConfig())
    add_adapter(model, "t", AdapterConfig(method=method, rank=3, rank_pattern={"*.fc_out": 0}))
    train_steps(model, x)
    model.eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    y = model(x)
    merge_adapter(model, "t")
    assert not torch.equal(model.blocks[0].fc_in.weight, base["blocks.0.fc_in.base_layer.weight"])
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    assert count_parameters(model) == 0
    with pytest.raises(RuntimeError, match="merged"):
        add_adapter(model, "new", AdapterConfig())
    with pytest.raises(RuntimeError, match="merged"):
        set_active_adapter(model, "other")
    with pytest.raises(RuntimeError, match="merged"):
        delete_adapter(model, "t")
    with pytest.raises(RuntimeError, match="training through it is refused"):
        model.train()(x)
    set_active_adapter(model, "t")  # allowed (it is the merged one), still nothing trainable
    assert count_parameters(model) == 0
    unmerge_adapter(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, base[key]), key
    assert torch.equal(model.eval()(x), y)
    assert count_parameters(model) == count_parameters(model, "t")


# --- save / load -----------------------------------------------------------------------


def test_save_load_roundtrip_and_errors(model: Tiny, x: torch.Tensor, tmp_path) -> None:
    fresh, reshaped = copy.deepcopy(model), copy.deepcopy(model)
    reshaped.blocks[1].fc_out = nn.Linear(H, D + 1)
    add_adapter(model, "t", AdapterConfig(method="dora", rank=3, rank_pattern={"*.1.fc_in": 0}))
    train_steps(model, x)
    model.eval()
    y = model(x)
    save_adapter(model, "t", tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert meta["method"] == "dora" and meta["layers"]["blocks.1.fc_in"]["rank"] == 0
    with pytest.raises(FileExistsError):
        save_adapter(model, "t", tmp_path / "t")
    assert load_adapter(fresh, tmp_path / "t") == "t"
    assert torch.equal(fresh.eval()(x), y)
    assert count_parameters(fresh) == count_parameters(model, "t")
    with pytest.raises(ValueError, match="already has an adapter named 't'"):
        load_adapter(fresh, tmp_path / "t")
    assert load_adapter(fresh, tmp_path / "t", name="t2") == "t2"

    other = Tiny()  # same shapes, other weights
    with pytest.raises(ValueError, match="layer 'blocks.0.fc_in': the base weights differ"):
        load_adapter(other, tmp_path / "t")
    with pytest.raises(ValueError, match=r"layer 'blocks.1.fc_out' has \(out, in\) = \(9, 12\)"):
        load_adapter(reshaped, tmp_path / "t")
    assert adapter_layers(reshaped) == {} and adapter_layers(other) == {}

    save_adapter(model, "t", tmp_path / "t", overwrite=True)
    (tmp_path / "t" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checksum"):
        load_adapter(copy.deepcopy(fresh), tmp_path / "t", name="t3")
    with pytest.raises(FileNotFoundError, match="not a saved adapter"):
        load_adapter(fresh, tmp_path / "missing")


# --- multi-task --------------------------------------------------------------------------


def test_task2_never_changes_task1(model: Tiny, x: torch.Tensor) -> None:
    add_adapter(model, "task1", AdapterConfig(method="dora", rank=4))
    train_steps(model, x, seed=1)
    model.eval()
    y1 = model(x)
    t1 = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".task1")}
    add_adapter(model, "task2", AdapterConfig(rank=2, rank_pattern={"blocks.0.fc_out": 0}))
    train_steps(model, x, seed=2)
    model.eval()
    y2 = model(x)
    set_active_adapter(model, "task1")
    assert torch.equal(model(x), y1)
    for k, v in t1.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not torch.allclose(y2, y1)
    # rank 0 for task2 on blocks.0.fc_out: task1's adapter stays there; task2 is the identity
    layer = model.blocks[0].fc_out
    assert layer.ranks == {"task1": 4, "task2": 0} and "task1" in layer.lora_A
    set_active_adapter(model, "task2")
    h = torch.randn(3, H)
    assert torch.equal(layer(h), layer.base_layer(h))


def test_ten_task_adapters_save_and_reload(model: Tiny, x: torch.Tensor, tmp_path) -> None:
    fresh = copy.deepcopy(model)
    outputs = {}
    for i in range(10):
        name = f"task-{i}"
        method = ADAPTER_KINDS[i % len(ADAPTER_KINDS)]
        rp = {BLOCK_PATHS[i % 4]: 0, "blocks.1.fc_in": 1 + i % 3}
        add_adapter(model, name, AdapterConfig(method=method, rank=2 + i % 2, rank_pattern=rp))
        train_steps(model, x, steps=2, seed=i)
        save_adapter(model, name, tmp_path / name)
    model.eval()
    for i in range(10):
        set_active_adapter(model, f"task-{i}")
        outputs[f"task-{i}"] = model(x)
    assert len({tuple(y.flatten().tolist()) for y in outputs.values()}) == 10
    for i in reversed(range(10)):  # load order differs from creation order
        load_adapter(fresh, tmp_path / f"task-{i}")
    fresh.eval()
    assert adapter_names(fresh) == [f"task-{i}" for i in reversed(range(10))]
    for name, y in outputs.items():
        set_active_adapter(fresh, name)
        assert torch.equal(fresh(x), y), name
        assert count_parameters(fresh, name) == count_parameters(model, name)


def test_adapters_on_different_layer_subsets_reload(model: Tiny, x: torch.Tensor, tmp_path) -> None:
    fresh = copy.deepcopy(model)
    add_adapter(model, "all", AdapterConfig(method="dora", rank=2))
    add_adapter(model, "some", AdapterConfig(rank=3, target_modules=("blocks.0.fc_in", "head")))
    train_steps(model, x)
    set_active_adapter(model, "all")
    train_steps(model, x)
    model.eval()
    outputs = {}
    for name in ("all", "some"):
        set_active_adapter(model, name)
        outputs[name] = model(x)
        save_adapter(model, name, tmp_path / name)
    load_adapter(fresh, tmp_path / "some")  # the subset first, then the superset
    load_adapter(fresh, tmp_path / "all")
    assert list(adapter_layers(fresh)) == [*BLOCK_PATHS, "head"]
    fresh.eval()
    for name, y in outputs.items():
        set_active_adapter(fresh, name)
        assert torch.equal(fresh(x), y), name
