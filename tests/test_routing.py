"""Routing by activation subspaces (`eva_rl.routing`): synthetic tasks, signatures on disk."""

import json

import pytest
import torch

from eva_rl.eva import EvaConfig, compute_eva
from eva_rl.routing import SignatureError, SignaturePool, TaskSignature, model_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

D, K = 16, 3


class Net(torch.nn.Module):
    """Two linear layers whose inputs are the synthetic activations."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(D, D)
        self.b = torch.nn.Linear(D, D)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def task_rows(basis: torch.Tensor, n: int, gen: torch.Generator, shift: float = 0.0,
              noise: float = 0.05) -> torch.Tensor:
    """Rows spread along `basis` (K, D) rows, plus small isotropic noise."""
    coef = torch.randn(n, basis.shape[0], generator=gen) * 3.0
    return coef @ basis + shift + noise * torch.randn(n, D, generator=gen)


def signature(task: str, net: Net, rows: torch.Tensor, fp: str = "fp") -> TaskSignature:
    result = compute_eva(net, [rows[i:i + 64] for i in range(0, len(rows), 64)],
                         EvaConfig(rank=K, rho=1.0, tau=0.999, target_modules=("a",)))
    return TaskSignature.from_eva(task, result, ["a"], fp)


def route(pool: SignaturePool, windows: torch.Tensor, score="ppca", unknown=False):
    """Route windows (W, n, D) of rows of layer a."""
    W, n, _ = windows.shape
    rows = {"a": windows.reshape(-1, D)}
    window = torch.arange(W).repeat_interleave(n)
    return pool.route_subspace(rows, window, W, score, unknown)


@pytest.fixture(scope="module")
def separable():
    """Three tasks on disjoint coordinate subspaces (same mean)."""
    gen = torch.Generator().manual_seed(0)
    eye = torch.eye(D)
    bases = {"t0": eye[0:K], "t1": eye[K:2 * K], "t2": eye[2 * K:3 * K]}
    net = Net()
    sigs = {t: signature(t, net, task_rows(b, 640, gen)) for t, b in bases.items()}
    return bases, sigs, gen


@pytest.mark.parametrize("score", ["ppca", "residual"])
def test_separable_subspaces_are_routed_perfectly(separable, score):
    bases, sigs, gen = separable
    pool = SignaturePool()
    for s in sigs.values():
        pool.add(s)
    for task, basis in bases.items():
        windows = task_rows(basis, 20 * 4, gen).reshape(20, 4, D)  # 20 windows of 4 rows
        assert route(pool, windows, score) == [task] * 20


def test_overlapping_subspaces_are_not_separated():
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(D, K, generator=gen))[0].T  # the same for both
    net = Net()
    pool = SignaturePool()
    for t in ("x", "y"):
        pool.add(signature(t, net, task_rows(basis, 640, gen)))
    chosen = route(pool, task_rows(basis, 200 * 4, gen).reshape(200, 4, D))
    share = chosen.count("x") / len(chosen)
    assert 0.2 < share < 0.8  # a coin flip, not a routing


def test_adding_a_task_leaves_the_other_scores_unchanged(separable):
    bases, sigs, gen = separable
    windows = task_rows(bases["t0"], 40, gen)
    rows, window = {"a": windows}, torch.arange(10).repeat_interleave(4)
    pool = SignaturePool()
    pool.add(sigs["t0"])
    pool.add(sigs["t1"])
    before = pool.subspace_scores(rows, window, 10)
    pool.add(sigs["t2"])
    after = pool.subspace_scores(rows, window, 10)
    assert after.shape == (10, 3)
    assert torch.equal(after[:, :2], before)


def test_unknown_task_is_none_and_known_is_not(separable):
    bases, sigs, gen = separable
    pool = SignaturePool()
    for t in ("t0", "t1"):
        sig = sigs[t]
        own = task_rows(bases[t], 400, gen)
        sig.calibrate({"a": own}, torch.arange(100).repeat_interleave(4), 100)
        pool.add(sig)
    known = task_rows(bases["t0"], 80, gen).reshape(20, 4, D)
    assert route(pool, known, unknown=True).count(None) <= 1
    novel = task_rows(bases["t2"], 80, gen).reshape(20, 4, D)  # explained by neither
    assert route(pool, novel, unknown=True) == [None] * 20


def test_signature_round_trip(separable, tmp_path):
    _, sigs, _ = separable
    sig = sigs["t1"]
    sig.centroids = {"obs": torch.arange(5.0)}
    sig.thresholds = {"ppca": 1.5, "residual": 0.2}
    sig.save(tmp_path / "s")
    back = TaskSignature.load(tmp_path / "s", task="t1", fingerprint="fp")
    assert back.task == "t1" and back.fingerprint == "fp" and back.thresholds == sig.thresholds
    assert torch.equal(back.centroids["obs"], sig.centroids["obs"])
    for p, sub in sig.layers.items():
        b = back.layers[p]
        assert torch.equal(b.components, sub.components) and torch.equal(b.mean, sub.mean)
        assert torch.equal(b.variances, sub.variances)
        assert b.total_variance == sub.total_variance
    x = torch.randn(12, D)
    w = torch.arange(3).repeat_interleave(4)
    assert torch.equal(back.window_scores({"a": x}, w, 3), sig.window_scores({"a": x}, w, 3))


def test_signature_errors_name_task_and_file(separable, tmp_path):
    _, sigs, _ = separable
    d = sigs["t0"].save(tmp_path / "s")
    with pytest.raises(SignatureError, match=r"task t0: .*signature.json.*another base model"):
        TaskSignature.load(d, task="t0", fingerprint="other")
    with pytest.raises(SignatureError, match=r"task t9: .*is the signature of task 't0'"):
        TaskSignature.load(d, task="t9")
    with pytest.raises(SignatureError, match=r"task t0: .*missing"):
        TaskSignature.load(tmp_path / "nothing", task="t0")
    tensors = d / "signature.safetensors"
    blob = bytearray(tensors.read_bytes())
    blob[-3] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(SignatureError, match=r"task t0: .*signature.safetensors.*checksum"):
        TaskSignature.load(d, task="t0")
    (d / "signature.json").write_text("{not json")
    with pytest.raises(SignatureError, match=r"task t0: .*signature.json: corrupt"):
        TaskSignature.load(d, task="t0")
    meta = {"format": "eva-rl-task-signature", "version": 99, "task": "t0"}
    (d / "signature.json").write_text(json.dumps(meta))
    with pytest.raises(SignatureError, match="version 99"):
        TaskSignature.load(d, task="t0")


def test_pool_refuses_another_base_and_empty_routing(separable):
    _, sigs, _ = separable
    pool = SignaturePool()
    with pytest.raises(ValueError, match="no task signatures"):
        pool.route_centroid("obs", torch.zeros(1, 3))
    pool.add(sigs["t0"])
    other = TaskSignature(task="t5", layers=sigs["t1"].layers, fingerprint="another")
    with pytest.raises(SignatureError, match="task t5: .*fingerprint mismatch"):
        pool.add(other)
    with pytest.raises(SignatureError, match="no 'obs' centroid"):
        pool.route_centroid("obs", torch.zeros(1, 3))


def test_model_fingerprint_sees_every_weight():
    net = Net()
    fp = model_fingerprint(net.state_dict())
    assert fp == model_fingerprint(Net().state_dict() | net.state_dict())
    with torch.no_grad():
        net.b.bias[0] += 1e-6
    assert model_fingerprint(net.state_dict()) != fp


def test_finetune_config_routing_round_trip_and_old_runs_compare_equal():
    from agents.finetune_config import FinetuneConfig

    plain = FinetuneConfig().to_dict()
    # a run recorded (flat) before routing existed resumes
    old = {k: v for k, v in FinetuneConfig().flat_settings().items()
           if k not in plain["train"] and not k.startswith("routing")}
    assert FinetuneConfig.from_dict({**old, "train": plain["train"]}) == FinetuneConfig()
    cfg = FinetuneConfig().replace(routing="eva", routing_after=3)
    back = FinetuneConfig.from_dict(cfg.to_dict())
    assert back.routing.router_config().router == "eva" and back.routing.after == 3
    with pytest.raises(ValueError, match="unknown router 'evaa'"):
        FinetuneConfig().replace(routing="evaa")
