"""Pretraining: a Decision Transformer on offline task datasets -> a run directory.

    config = PretrainConfig(preset="tiny", train=pretrain_train_config(steps=2000))
    result = pretrain("data/mt40", MT40, "runs/pretrain-tiny", config)
    agent = DTAgent.load(result.run_dir)

The run directory (`eva_rl.training.run`) gets ``config.json`` (model and training
settings, state-normalisation statistics, per-task target returns), ``model.safetensors``,
``tb/`` and ``checkpoints/``. ``resume=True`` continues it from its latest checkpoint with
its saved settings; only the number of updates (and the progress bar) may change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eva_rl.data import WindowSampler, compute_state_stats, open_datasets
from eva_rl.io import check_writable
from eva_rl.killpoints import kill_point
from eva_rl.models import PRESETS, DecisionTransformer, DTConfig
from eva_rl.runlock import RunLock
from eva_rl.training import distributed
from eva_rl.training.checkpoint import list_checkpoints
from eva_rl.training.run import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    default_target_returns,
    read_run_config,
    save_weights,
    write_run_config,
)
from eva_rl.training.trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)

MIXINGS = ("uniform", "proportional")


def pretrain_warmup(steps: int) -> int:
    """Pretraining's default warm-up: a tenth of the updates, at most 4000."""
    return min(4000, steps // 10)


def pretrain_train_config(steps: int = 10_000, **changes: Any) -> TrainConfig:
    """Pretraining's optimisation defaults (`TrainConfig`'s, with batch 64, lr 3e-4 and
    `pretrain_warmup(steps)` warm-up), with ``changes`` applied; ``min_lr`` is capped at
    ``lr``. A change of None means "not given" (the default stays)."""
    given = {k: v for k, v in changes.items() if v is not None}
    settings = {"batch_size": 64, "lr": 3e-4, "warmup_steps": pretrain_warmup(steps), **given}
    settings["min_lr"] = min(settings.get("min_lr", TrainConfig.min_lr), settings["lr"])
    return TrainConfig(steps=steps, **settings)


@dataclass
class PretrainConfig:
    """Everything a pretraining run is made of, besides its data and tasks."""

    preset: str = "small"
    """Model size: a `DTConfig` preset (``tiny`` | ``small`` | ``paper``)."""
    context_len: int | None = None
    """Window length K (None = the preset's)."""
    dropout: float | None = None
    """Dropout (None = the preset's)."""
    reward_scale: float = 200.0
    """Divisor of returns-to-go and rewards fed to the model."""
    mixing: str = "uniform"
    """How windows are drawn over tasks: ``uniform`` (each task alike) or ``proportional``
    (to its number of transitions)."""
    train: TrainConfig = field(default_factory=pretrain_train_config)
    """Optimisation settings (see `pretrain_train_config` for pretraining's defaults); its
    ``seed`` also seeds the initial weights and the window sampler."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")

    def model_config(self, obs_dim: int, act_dim: int, horizon: int) -> DTConfig:
        """The model for data of these dimensions and episodes up to ``horizon`` steps."""
        overrides: dict[str, Any] = {"state_dim": obs_dim, "act_dim": act_dim,
                                     "reward_scale": self.reward_scale,
                                     "max_ep_len": max(1000, horizon)}
        if self.context_len is not None:
            overrides["context_len"] = self.context_len
        if self.dropout is not None:
            overrides["dropout"] = self.dropout
        return DTConfig.preset(self.preset, **overrides)


@dataclass
class PretrainResult:
    """What `pretrain` did in this call."""

    run_dir: Path
    model: DecisionTransformer
    history: list[tuple[int, float, float]]
    """(step, loss, grad norm) of each update of this call (empty if nothing was left)."""
    seconds: float
    """Wall time of this call's training."""
    precision: str
    """The precision the Trainer used (``fp32`` | ``bf16``)."""


def pretrain(
    data: str | os.PathLike,
    tasks: Sequence[str],
    out: str | os.PathLike,
    config: PretrainConfig | None = None,
    resume: bool = False,
    force_unlock: bool = False,
) -> PretrainResult:
    """Pretrain a Decision Transformer on ``data/<task>`` for every task; write ``out``.

    ``tasks`` are dataset directory names (resolved task names). A non-empty ``out``
    needs ``resume=True``, which continues that run from its latest checkpoint with its
    saved settings (the model, statistics, target returns, mixing and training settings
    of ``config.json``); only ``config.train.steps`` and ``config.train.progress`` are
    taken from ``config``, and fewer steps than the checkpoint has done are refused.
    ``resume=True`` on an empty ``out``, or on one interrupted before its first
    checkpoint, starts from step 0. Everything is validated (device, data, output
    location, the checkpoint to resume) before anything is written; ``config.json`` is
    rewritten only after the checkpoint has loaded. The main process holds ``out``'s
    `RunLock` while it writes (``force_unlock`` breaks one held on another host).
    Under ``torchrun`` (after `init_distributed`) every process trains its slice of the
    global batch and rank 0 writes the files.

    Raises ``FileExistsError`` (occupied ``out`` without ``resume``), `RunLocked` (another
    process writes ``out``) or ``ValueError`` naming the file or value (data that does not
    fit the saved run, episodes longer than the model's ``max_ep_len``, a missing or
    corrupt dataset or checkpoint, a device that is not there).
    """
    config = config or PretrainConfig()
    out, tasks = Path(out), list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    dist = distributed.current(config.train.device)  # an unknown or absent device fails here
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    datasets = open_datasets(data, tasks)
    first = next(iter(datasets.values()))
    horizon = max(int(ds.episode_lengths.max()) for ds in datasets.values())
    check_writable(out)
    lock = RunLock(out, force=force_unlock) if dist.is_main else contextlib.nullcontext()
    with lock:
        return _pretrain_locked(data, tasks, out, config, resume, datasets, first.obs_dim,
                                first.act_dim, horizon, dist)


def _pretrain_locked(data: str | os.PathLike, tasks: list[str], out: Path,
                     config: PretrainConfig, resume: bool, datasets: Mapping[str, Any],
                     obs_dim: int, act_dim: int, horizon: int,
                     dist: distributed.DistInfo) -> PretrainResult:
    """`pretrain` once ``out`` is this process's: decide, check, then write."""
    has_config = (out / CONFIG_FILE).is_file()
    visible = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    if visible and not resume:
        raise FileExistsError(f"{out} already exists; resume it (--resume, resume=True) or "
                              "choose a new output directory")
    if visible and not has_config:
        raise FileExistsError(f"{out} holds files but no pretraining run ({CONFIG_FILE} is "
                              f"missing: {', '.join(sorted(visible)[:5])}); choose a new "
                              "output directory")
    resume = resume and has_config  # nothing to continue: a fresh run
    distributed.barrier()  # every process decided before rank 0 writes config.json
    if resume:
        model_cfg, tcfg, run = _saved_run(out, data, tasks, obs_dim, act_dim, config.train)
    else:
        model_cfg, tcfg = config.model_config(obs_dim, act_dim, horizon), config.train
        mean, std = compute_state_stats(datasets)
        run = {"state_mean": mean, "state_std": std, "mixing": config.mixing,
               "target_returns": default_target_returns(datasets)}
    if horizon > model_cfg.max_ep_len:
        raise ValueError(f"episodes of {horizon} steps in {data} exceed max_ep_len="
                         f"{model_cfg.max_ep_len} of the model")
    checkpoints = list_checkpoints(out) if resume else []
    if checkpoints and checkpoints[-1][0] > tcfg.steps:
        raise ValueError(f"{checkpoints[-1][1]}: the run has done {checkpoints[-1][0]} "
                         f"updates; --steps {tcfg.steps} asks for fewer (give --steps >= "
                         f"{checkpoints[-1][0]}, or a new --out)")
    sampler = WindowSampler(list(datasets.values()), model_cfg.context_len,
                            reward_scale=model_cfg.reward_scale, mixing=run["mixing"],
                            state_mean=run["state_mean"], state_std=run["state_std"],
                            seed=tcfg.seed)
    torch.manual_seed(tcfg.seed)  # the initial weights, so seeded runs are reproducible
    model = DecisionTransformer(model_cfg)
    trainer = Trainer(model, sampler, tcfg, out,
                      hparams={"model": model_cfg.to_dict(), "tasks": ",".join(tasks)})
    if checkpoints:  # a corrupt checkpoint fails here, before config.json changes
        trainer.resume_latest()
    if dist.is_main:
        write_run_config(out, model=model_cfg, train=tcfg, tasks=tasks, data=str(data),
                         state_mean=run["state_mean"], state_std=run["state_std"],
                         target_returns=run["target_returns"], overwrite=resume,
                         mixing=run["mixing"], seed=tcfg.seed)
        kill_point("pretrain.config_written")
        logger.info("%d tasks, %d transitions; model %d x %d: %s parameters; %d process(es) "
                    "on %s", len(tasks), sum(d.n_transitions for d in datasets.values()),
                    model_cfg.n_layer, model_cfg.n_embd, f"{model.num_parameters():,}",
                    dist.world_size, dist.device)
    t0 = time.perf_counter()
    # a run interrupted before its first checkpoint starts again from step 0
    history = trainer.train(resume=bool(checkpoints))
    seconds = time.perf_counter() - t0
    if dist.is_main:
        save_weights(model, out / WEIGHTS_FILE)
    return PretrainResult(out, model, history, seconds, trainer.precision)


def _saved_run(out: Path, data: str | os.PathLike, tasks: list[str], obs_dim: int,
               act_dim: int, train: TrainConfig
               ) -> tuple[DTConfig, TrainConfig, Mapping[str, Any]]:
    """The model and training settings of the run in ``out``, checked against the data."""
    saved = read_run_config(out)
    model_cfg = DTConfig.from_dict(saved["model"])
    if (model_cfg.state_dim, model_cfg.act_dim) != (obs_dim, act_dim):
        raise ValueError(f"{out} holds a model with state_dim={model_cfg.state_dim}, "
                         f"act_dim={model_cfg.act_dim}, but the data in {data} has "
                         f"obs_dim={obs_dim}, act_dim={act_dim}")
    if list(saved["tasks"]) != tasks:
        raise ValueError(f"{out} was trained on {saved['tasks']}, not {tasks}")
    tcfg = dataclasses.replace(TrainConfig.from_dict(saved["train"]), steps=train.steps,
                               progress=train.progress)
    run = {"state_mean": saved["state_mean"], "state_std": saved["state_std"],
           "target_returns": saved["target_returns"],
           "mixing": saved.get("mixing", MIXINGS[0])}
    return model_cfg, tcfg, run
