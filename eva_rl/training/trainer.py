"""A small trainer: AdamW, warm-up + cosine, clipping, accumulation, bf16, DDP, resume.

The trainer does not assume a Decision Transformer: it optimises ``loss_fn(model, batch)``
(default ``model.loss(batch)``) over the parameters with ``requires_grad`` only, so the
same loop fine-tunes adapters on a frozen model.

Batches and distributed training: every step draws one *global* batch of
``batch_size`` windows from the sampler; with the same sampler seed every process draws
the same batch and keeps its slice, which it splits into ``grad_accum`` micro-batches.
Each micro-batch loss is weighted by its share of the global batch's real (unpadded)
steps, so the summed gradient equals the gradient of the global batch's mean loss:
two processes, or four micro-batches, give the update one process gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from eva_rl.io import to_json_safe
from eva_rl.killpoints import kill_point
from eva_rl.progress import progress_bar
from eva_rl.schema import check_known_fields
from eva_rl.tensorboard import RunLogger
from eva_rl.training import distributed
from eva_rl.training.callbacks import Callback
from eva_rl.training.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from eva_rl.training.run import CheckpointError
from eva_rl.training.schedule import lr_at

logger = logging.getLogger(__name__)

TB_DIR = "tb"
# Fields that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "keep_checkpoints",
                      "progress", "device"}


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the EVA paper's pretraining, except the lengths)."""

    steps: int = 10_000
    """Number of optimizer updates."""
    batch_size: int = 128
    """Global batch (windows per update, over all processes and micro-batches)."""
    grad_accum: int = 1
    """Micro-batches per update in each process."""
    lr: float = 1e-4
    """Peak learning rate (after warm-up)."""
    min_lr: float = 1e-6
    """Floor of the cosine decay."""
    warmup_steps: int = 1000
    """Linear warm-up updates."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices (ndim >= 2) only."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 0.25
    """Clip the global gradient norm to this (0 = no clipping; the norm is still logged)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast or fp32; ``auto`` = bf16 on GPUs that have it (see resolve_precision)."""
    log_every: int = 10
    """Tensorboard scalars every this many updates."""
    checkpoint_every: int = 1000
    """Checkpoint every this many updates (0 = only at the end); one is always written last."""
    keep_checkpoints: int | None = None
    """Keep only the newest this many checkpoints (None = keep all)."""
    seed: int = 0
    """Seed of torch's RNG (dropout), offset by the process rank."""
    device: str = "auto"
    """``auto`` (cuda when present), ``cpu``, ``cuda``, ``cuda:1``..."""
    progress: bool = True
    """Show a tqdm progress bar (main process only)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 < self.lr < math.inf and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got {self.lr}, {self.min_lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be None or >= 1: {self.keep_checkpoints}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        distributed.check_device_name(self.device)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        check_known_fields(cls, d, "TrainConfig fields")
        return cls(**dict(d))


class Sampler(Protocol):
    """What the trainer needs from a batch source (e.g. ``eva_rl.data.WindowSampler``)."""

    def sample(self, batch_size: int) -> dict[str, np.ndarray]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


def default_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model.loss(batch)``."""
    return model.loss(batch)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on GPUs with bf16, else ``fp32``. Never bf16 on a CPU unless
    asked: a run then gives the same numbers on any CPU kind (bf16 rounds differently per
    instruction set), and even with AMX bf16 was slower for the small presets
    (scripts/bench/bench_dt.py: 2.8x the fp32 step on `tiny`, 1.15x on `small`, 0.51x on
    `paper`), so pass ``precision="bf16"`` for large models on such CPUs."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight decay on matrices (ndim >= 2) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                             betas=config.betas)


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a forward so DDP sees (and syncs) the call."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class Trainer:
    """Trains ``model`` on batches from ``sampler``; see the module docstring.

    Args:
        model: any module; only parameters with ``requires_grad`` are optimised.
        sampler: batch source with ``sample(n)``, ``state_dict()``, ``load_state_dict()``.
        config: the ``TrainConfig``.
        run_dir: where ``tb/`` and ``checkpoints/`` go; None = no files at all.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the mean loss over the batch
            (default ``model.loss(batch)``).
        hparams: extra hyperparameters for the tensorboard table (e.g. the model config).
        callbacks: hooks into the loop (`eva_rl.training.callbacks`); their state is saved
            in every checkpoint.

    After ``train()``, ``history`` holds ``(step, loss, grad_norm)`` per update (the
    gradient norm before clipping).
    """

    def __init__(
        self,
        model: nn.Module,
        sampler: Sampler,
        config: TrainConfig,
        run_dir: str | os.PathLike | None = None,
        loss_fn: LossFn | None = None,
        hparams: Mapping[str, Any] | None = None,
        callbacks: list[Callback] | None = None,
    ) -> None:
        self.config = config
        self.callbacks = list(callbacks or [])
        names = [cb.name for cb in self.callbacks]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"callbacks need distinct, non-empty names, got {names}")
        self.log: RunLogger | None = None
        self.sampler = sampler
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.dist = distributed.current(config.device)
        self.device = self.dist.device
        per_rank, rest = divmod(config.batch_size, self.dist.world_size * config.grad_accum)
        if rest or per_rank < 1:
            raise ValueError(
                f"batch_size={config.batch_size} must be a positive multiple of world_size "
                f"({self.dist.world_size}) x grad_accum ({config.grad_accum})"
            )
        self.precision = resolve_precision(config.precision, self.device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn or default_loss
        self.hparams = dict(hparams or {})
        self.optimizer = build_optimizer(self.model, config)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.step = 0
        self._resumed = False
        self.history: list[tuple[int, float, float]] = []
        torch.manual_seed(config.seed + self.dist.rank)
        self._loss_module: nn.Module = _LossModule(self.model, self.loss_fn)
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._loss_module = DistributedDataParallel(self._loss_module, device_ids=ids)

    # ------------------------------------------------------------------ training loop

    def train(self, resume: bool = False) -> list[tuple[int, float, float]]:
        """Run until ``config.steps`` updates; with ``resume`` continue the latest checkpoint.

        Without ``resume``, a ``run_dir`` that already holds checkpoints is an error
        (nothing is overwritten). Returns ``history``.
        """
        cfg, main = self.config, self.dist.is_main
        if resume:
            if not self._resumed:
                self.resume_latest()
        elif self.run_dir is not None and list_checkpoints(self.run_dir):
            raise FileExistsError(
                f"{self.run_dir / 'checkpoints'}: holds checkpoints already; pass "
                "resume=True to continue that run or use a new run directory"
            )
        log = None
        if self.run_dir is not None:  # purge_step drops events an interrupted run left
            log = RunLogger(self.run_dir / TB_DIR, enabled=main,
                            purge_step=self.step + 1 if self.step else None)
            log.hparams(self._all_hparams())
        self.log = log
        self.model.train()
        bar = progress_bar(total=cfg.steps, initial=self.step,
                           disable=not (cfg.progress and main), desc="train", dynamic_ncols=True)
        window: list[tuple[float, float, float, int]] = []
        try:
            self._call("on_train_start")
            while self.step < cfg.steps:
                self._call("on_step_start")
                t0 = time.perf_counter()
                lr = self._set_lr()
                loss, grad_norm, tokens = self._update()
                self.step += 1
                self.history.append((self.step, loss, grad_norm))
                window.append((loss, grad_norm, time.perf_counter() - t0, tokens))
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    mean_loss = float(np.mean([w[0] for w in window]))
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    if log is not None:
                        log.scalars({
                            "train/loss": mean_loss,
                            "train/grad_norm": float(np.mean([w[1] for w in window])),
                            "train/lr": lr,
                            "time/tokens_per_s": sum(w[3] for w in window)
                            / sum(w[2] for w in window),
                        }, self.step)
                    window.clear()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {self.step}")
                self._call("on_step_end")
                every = cfg.checkpoint_every
                if self.run_dir is not None and (
                    (every and self.step % every == 0) or self.step == cfg.steps
                ):
                    self.save_checkpoint()
                kill_point("trainer.step")
            self._call("on_train_end")
        finally:
            bar.close()
            self.log = None
            if log is not None:
                if self.history:
                    log.hparams(self._all_hparams(), {"hparam/final_loss": self.history[-1][1]})
                log.close()
        return self.history

    def _call(self, hook: str) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self)

    def log_scalars(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Tensorboard scalars next to the trainer's own (no-op without a run_dir)."""
        if self.log is not None:
            self.log.scalars(dict(values), self.step if step is None else step)

    def _set_lr(self) -> float:
        cfg = self.config
        lr = lr_at(self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                   total_steps=cfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _update(self) -> tuple[float, float, int]:
        """One optimizer update; returns (global mean loss, pre-clip grad norm, tokens)."""
        cfg, world = self.config, self.dist.world_size
        batch = self.sampler.sample(cfg.batch_size)
        n = cfg.batch_size // world
        local = {k: v[self.dist.rank * n:(self.dist.rank + 1) * n] for k, v in batch.items()}
        total = max(_count(batch), 1.0)
        micro = n // cfg.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(cfg.grad_accum):
            part = {k: v[i * micro:(i + 1) * micro] for k, v in local.items()}
            weight = _count(part) / total
            sync = i == cfg.grad_accum - 1 or not self.dist.distributed
            ctx = contextlib.nullcontext() if sync else self._loss_module.no_sync()
            with ctx:
                with self._autocast():
                    loss = self._loss_module(self._to_device(part))
                # DDP averages gradients over processes, hence the factor world.
                (loss * (weight * world)).backward()
            loss_sum += loss.detach().double() * weight
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, clip)
        self.optimizer.step()
        self._call("on_optimizer_step")
        distributed.all_reduce_sum(loss_sum)
        tokens = int(np.prod(batch["mask"].shape)) if "mask" in batch else cfg.batch_size
        tokens *= int(getattr(self.model, "n_tokens", 1))
        return float(loss_sum), float(grad_norm), tokens

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v).to(self.device, non_blocking=True)
                for k, v in batch.items()}

    def _all_hparams(self) -> dict[str, Any]:
        return {"train": {**self.config.to_dict(), "precision_used": self.precision,
                          "world_size": self.dist.world_size}, **self.hparams}

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write ``run_dir/checkpoints/step_<step>/`` (every process must call this)."""
        if self.run_dir is None:
            raise ValueError("this trainer has no run_dir to save checkpoints in")
        rng = torch.get_rng_state()
        cpu_rngs = distributed.all_gather(rng.to(self._collective_device()))
        state: dict[str, Any] = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "train_config": json.dumps(self.config.to_dict()),
            "sampler": json.dumps(self.sampler.state_dict()),
            "rng_cpu": [r.cpu() for r in cpu_rngs],
            "world_size": self.dist.world_size,
            "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 3),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
        }
        if self.device.type == "cuda":
            cuda = torch.cuda.get_rng_state(self.device).to(self.device)
            state["rng_cuda"] = [r.cpu() for r in distributed.all_gather(cuda)]
        path = checkpoint_dir(self.run_dir, self.step)
        if self.dist.is_main:
            if path.exists():
                logger.info("checkpoint %s exists already; keeping it", path)
            else:
                save_checkpoint(path, self.model, state)
                logger.info("saved checkpoint %s", path)
                kill_point("trainer.checkpoint_saved")
                if self.config.keep_checkpoints:
                    prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
        distributed.barrier()
        return path

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def resume_latest(self) -> Path:
        """Restore the latest checkpoint of ``run_dir`` now (``train(resume=True)`` then
        continues from it without loading it again); returns its path."""
        if self.run_dir is None:
            raise ValueError("resume=True needs a run_dir")
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"{self.run_dir / 'checkpoints'}: no checkpoint to resume")
        self.load_checkpoint(path)
        self._resumed = True
        logger.info("resumed from %s at step %d", path, self.step)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, sampler, RNG and history from a checkpoint directory."""
        path = Path(path)
        state = load_checkpoint(path, self.model)
        file = path / "state.pt"
        try:
            saved_cfg = json.loads(state["train_config"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.load_state_dict(json.loads(state["sampler"]))
            step, history = int(state["step"]), state["history"]
            rngs = state["rng_cpu"]
            saved_callbacks = state.get("callbacks", {})
            for cb in self.callbacks:
                if cb.name in saved_callbacks:
                    cb.load_state_dict(saved_callbacks[cb.name])
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{file}: cannot restore training state: {err}") from err
        changed = {k: (v, getattr(self.config, k)) for k, v in saved_cfg.items()
                   if k not in _RESUMABLE_CHANGES and to_json_safe(getattr(self.config, k)) != v}
        if changed:
            logger.warning("resuming %s with changed settings %s: the run will not match "
                           "an uninterrupted one", path, changed)
        if int(state.get("world_size", 1)) == self.dist.world_size:
            torch.set_rng_state(rngs[self.dist.rank])
            if "rng_cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"][self.dist.rank], self.device)
        else:
            logger.warning("checkpoint was written by %s processes, resuming with %d: "
                           "dropout randomness will differ", state.get("world_size"),
                           self.dist.world_size)
            torch.manual_seed(self.config.seed + self.dist.rank + step)
        self.step = step
        self.history = [(int(s), float(l), float(g)) for s, l, g in history.tolist()]


def _count(batch: Mapping[str, np.ndarray]) -> float:
    """Real (unpadded) steps in a batch, or its number of samples without a mask."""
    if "mask" in batch:
        return float(np.count_nonzero(batch["mask"]))
    return float(len(next(iter(batch.values()))))

