"""Trainer, schedule, checkpoints, exact resume, DDP, run directories, pretraining."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import run_main

from eva_rl.data import WindowSampler, open_datasets, write_dataset
from eva_rl.models import DecisionTransformer, DTConfig
from eva_rl.training import (
    WEIGHTS_FILE,
    CheckpointError,
    PretrainConfig,
    TrainConfig,
    Trainer,
    build_optimizer,
    default_target_returns,
    list_checkpoints,
    load_weights,
    lr_at,
    pretrain,
    pretrain_train_config,
    read_run_config,
    save_weights,
    write_run_config,
)
from eva_rl.training.pretraining import pretrain_warmup

TASKS = ("reach-v3", "door-open-v3")
OBS, ACT = 6, 2


def synthetic_data(root: Path, n_episodes: int = 6, length: int = 12, obs_dim: int = OBS
                   ) -> Path:
    """Episodes whose actions are a fixed smooth function of the observation (learnable)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(obs_dim, ACT))
    for k, task in enumerate(TASKS):
        obs = rng.normal(size=(n_episodes * length, obs_dim)).astype(np.float32)
        act = np.tanh(obs @ w + k).astype(np.float32)
        rew = rng.uniform(0, 10, size=n_episodes * length).astype(np.float32)
        write_dataset(root / task, task=task, observations=obs, actions=act, rewards=rew,
                      successes=rew > 9, episode_offsets=np.arange(n_episodes + 1) * length,
                      metadata={"collector": "synthetic"})
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory.mktemp("data"))


def make_parts(data_root: Path, seed: int = 0, dropout: float = 0.0, context_len: int = 4):
    datasets = open_datasets(data_root, TASKS)
    sampler = WindowSampler(datasets, context_len=context_len, reward_scale=20.0, seed=seed)
    torch.manual_seed(seed)
    cfg = DTConfig.preset("tiny", state_dim=OBS, act_dim=ACT, context_len=context_len,
                          dropout=dropout, max_ep_len=64)
    return DecisionTransformer(cfg), sampler


def tconfig(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, log_every=2,
                checkpoint_every=3, progress=False, precision="fp32", device="cpu")
    return TrainConfig(**{**base, **kw})


def test_schedule_warmup_then_cosine_to_floor():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    lrs = [lr_at(s, **kw) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1) == lrs[19]


def test_optimizer_decays_matrices_only_and_skips_frozen(data_root):
    model, _ = make_parts(data_root)
    model.embed_state.weight.requires_grad_(False)
    opt = build_optimizer(model, tconfig())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 for p in no_decay["params"])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.embed_state.weight) not in ids
    assert len(ids) == sum(p.requires_grad for p in model.parameters())


def test_loss_falls_and_run_dir_is_written(data_root, tmp_path):
    model, sampler = make_parts(data_root)
    trainer = Trainer(model, sampler, tconfig(steps=40, checkpoint_every=0, log_every=10),
                      tmp_path / "run", hparams={"model": model.config.to_dict()})
    history = trainer.train()
    assert [h[0] for h in history] == list(range(1, 41))
    first, last = np.mean([h[1] for h in history[:5]]), np.mean([h[1] for h in history[-5:]])
    assert last < 0.5 * first
    assert all(h[2] > 0 for h in history)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [40]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/grad_norm", "train/lr", "time/tokens_per_s"):
        assert [e.step for e in events.Scalars(tag)] == [10, 20, 30, 40], tag
    losses = [h[1] for h in history]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(np.mean(losses[30:]))
    assert any("hparams" in t for t in tags["tensors"])
    with pytest.raises(FileExistsError, match="holds checkpoints already"):
        Trainer(model, sampler, tconfig(), tmp_path / "run").train()


def test_grad_accum_matches_one_big_batch(data_root):
    histories, weights = [], []
    for accum in (1, 4):
        model, sampler = make_parts(data_root)
        histories.append(Trainer(model, sampler, tconfig(steps=3, grad_accum=accum)).train())
        weights.append(model.state_dict())
    np.testing.assert_allclose(np.array(histories[0]), np.array(histories[1]), rtol=1e-5)
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-6)


def test_resume_equals_uninterrupted_run_bit_for_bit(data_root, tmp_path):
    # dropout on: the restored torch RNG matters as much as the sampler and optimizer
    model, sampler = make_parts(data_root, dropout=0.1)
    full = Trainer(model, sampler, tconfig(), tmp_path / "run").train()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3, 6]
    # "interrupt" after step 3: drop the later checkpoint, resume in fresh objects
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_6")
    model2, sampler2 = make_parts(data_root, seed=123, dropout=0.1)  # state comes from disk
    resumed = Trainer(model2, sampler2, tconfig(), tmp_path / "run").train(resume=True)
    assert resumed == full
    for k, v in model2.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_checkpoint_round_trip_gives_identical_outputs(data_root, tmp_path):
    model, sampler = make_parts(data_root)
    Trainer(model, sampler, tconfig(steps=2), tmp_path / "run").train()
    batch = {k: torch.as_tensor(v) for k, v in sampler.sample(4).items()}
    model.eval()
    save_weights(model, tmp_path / "w.safetensors")
    other, _ = make_parts(data_root, seed=5)
    load_weights(other, tmp_path / "run" / "checkpoints" / "step_2" / "model.safetensors")
    other.eval()
    assert torch.equal(other.loss(batch), model.loss(batch))
    assert torch.equal(load_weights(other, tmp_path / "w.safetensors").loss(batch),
                       model.loss(batch))


def test_corrupted_checkpoint_is_a_clear_error(data_root, tmp_path):
    model, sampler = make_parts(data_root)
    Trainer(model, sampler, tconfig(steps=3), tmp_path / "run").train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_3"
    state = ckpt / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"state\.pt: corrupt"):
        Trainer(*make_parts(data_root), tconfig(steps=4), tmp_path / "run").train(resume=True)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"\x00" * 50)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        load_weights(model, weights)


def test_weights_mismatch_is_a_clear_error(data_root, tmp_path):
    model, _ = make_parts(data_root)
    save_weights(model, tmp_path / "w.safetensors")
    wider = DecisionTransformer(DTConfig.preset("tiny", state_dim=OBS + 1, act_dim=ACT,
                                                context_len=4, max_ep_len=64))
    with pytest.raises(CheckpointError, match=r"w\.safetensors: .*shape mismatch.*embed_state"):
        load_weights(wider, tmp_path / "w.safetensors")
    deeper = DecisionTransformer(DTConfig.preset("tiny", n_layer=3, state_dim=OBS, act_dim=ACT,
                                                 context_len=4, max_ep_len=64))
    with pytest.raises(CheckpointError, match=r"missing keys blocks\.2\."):
        load_weights(deeper, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(model, tmp_path / "nope.safetensors")


def test_run_config_round_trip_and_errors(tmp_path):
    cfg = DTConfig.preset("tiny")
    path = write_run_config(tmp_path, model=cfg, train=tconfig(), tasks=["a"], data="/d",
                            state_mean=np.zeros(39), state_std=np.ones(39),
                            target_returns={"a": np.float32(12.5)})
    read = read_run_config(tmp_path)
    assert read["format"] == "eva-rl-run" and read["version"] == 1
    assert DTConfig.from_dict(read["model"]) == cfg
    assert TrainConfig.from_dict(read["train"]) == tconfig()
    assert read["target_returns"] == {"a": 12.5}
    with pytest.raises(FileExistsError):
        write_run_config(tmp_path, model=cfg, train=tconfig(), tasks=["a"], data="/d",
                         state_mean=[0.0], state_std=[1.0], target_returns={})
    path.write_text('{"format": "eva-rl-run", "vers')
    with pytest.raises(ValueError, match=r"config\.json: corrupt"):
        read_run_config(tmp_path)
    with pytest.raises(ValueError, match="no run config"):
        read_run_config(tmp_path / "missing")


def test_bad_train_config_is_a_clear_error(data_root):
    with pytest.raises(ValueError, match="precision"):
        tconfig(precision="fp16")
    model, sampler = make_parts(data_root)
    with pytest.raises(ValueError, match="multiple of world_size"):
        Trainer(model, sampler, tconfig(batch_size=6, grad_accum=4))


def _ddp_worker(rank: int, world: int, init: str, data_root: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, sampler = make_parts(Path(data_root))
        history = Trainer(model, sampler, tconfig(steps=4, grad_accum=2)).train()
        if rank == 0:
            save_weights(model, Path(out) / "ddp.safetensors")
            (Path(out) / "ddp.json").write_text(json.dumps(history))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one(data_root, tmp_path):
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_ddp_worker, args=(2, init, str(data_root), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    model, sampler = make_parts(data_root)
    single = Trainer(model, sampler, tconfig(steps=4, grad_accum=2)).train()
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    np.testing.assert_allclose(np.array(ddp), np.array(single), rtol=1e-5)
    other, _ = make_parts(data_root, seed=9)
    load_weights(other, tmp_path / "ddp.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_pretrain_writes_run_dir_resumes_exactly_and_refuses_bad_input(data_root, tmp_path):
    def config(steps, **train):
        return PretrainConfig(preset="tiny", train=pretrain_train_config(
            steps, batch_size=8, checkpoint_every=2, progress=False, device="cpu", **train))

    out = tmp_path / "run"
    pretrain(data_root, TASKS, out, config(4))
    saved = read_run_config(out)
    assert saved["tasks"] == list(TASKS) and saved["model"]["state_dim"] == OBS
    assert saved["train"]["warmup_steps"] == pretrain_warmup(4) == 0
    assert saved["train"]["lr"] == pretrain_train_config().lr == 3e-4
    datasets = open_datasets(data_root, TASKS)
    assert saved["target_returns"] == default_target_returns(datasets)
    for task in TASKS:
        assert saved["target_returns"][task] == pytest.approx(
            float(datasets[task].episode_returns.max()))
    model = DecisionTransformer(DTConfig.from_dict(saved["model"]))
    load_weights(model, out / WEIGHTS_FILE)
    with pytest.raises(FileExistsError, match="already exists"):
        pretrain(data_root, TASKS, out, config(4))
    # continuing to 6 updates (other settings given are ignored: the run's are kept)
    more = pretrain(data_root, TASKS, out, config(6, lr=1e-2), resume=True)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6]
    assert [h[0] for h in more.history] == [1, 2, 3, 4, 5, 6]
    assert read_run_config(out)["train"]["lr"] == 3e-4
    # a run cut after its checkpoint at 4 (of 6) resumes to exactly the uninterrupted one
    straight = pretrain(data_root, TASKS, tmp_path / "straight", config(6))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "straight", cut)
    (cut / WEIGHTS_FILE).unlink()
    shutil.rmtree(dict(list_checkpoints(cut))[6])
    resumed = pretrain(data_root, TASKS, cut, config(6), resume=True)
    assert [h[0] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0)
    wider = synthetic_data(tmp_path / "wider", obs_dim=OBS + 1)
    with pytest.raises(ValueError, match=f"state_dim={OBS}.*obs_dim={OBS + 1}"):
        pretrain(wider, TASKS, out, config(8), resume=True)


@pytest.mark.slow
def test_pretrain_script_runs_and_reports_bad_input_in_one_line(data_root, tmp_path):
    out = tmp_path / "cli"
    argv = ["--data", str(data_root), "--tasks", ",".join(TASKS), "--preset", "tiny",
            "--steps", "2", "--batch-size", "8", "--no-progress", "--out", str(out)]
    done = run_main("pretrain", argv)
    assert done.returncode == 0, done.stderr
    assert "step 2: loss" in done.stdout and (out / WEIGHTS_FILE).is_file()
    again = run_main("pretrain", argv)
    err = again.stderr.strip().splitlines()
    assert again.returncode == 2 and err[-1].startswith("error: ")
    assert "already exists" in err[-1] and "--resume" in err[-1]
    assert "Traceback" not in again.stderr
