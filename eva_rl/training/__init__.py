"""Training: the trainer, learning-rate schedule, checkpoints, run directories, DDP."""

from eva_rl.training.callbacks import Callback, StepHook
from eva_rl.training.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from eva_rl.training.distributed import DistInfo, init_distributed, resolve_device
from eva_rl.training.run import (
    CheckpointError,
    load_weights,
    read_run_config,
    read_weights,
    save_weights,
    write_run_config,
)
from eva_rl.training.schedule import lr_at
from eva_rl.training.trainer import TrainConfig, Trainer, build_optimizer, resolve_precision

__all__ = [
    "Callback",
    "CheckpointError",
    "DistInfo",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "checkpoint_dir",
    "init_distributed",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_weights",
    "lr_at",
    "read_run_config",
    "read_weights",
    "resolve_device",
    "resolve_precision",
    "save_checkpoint",
    "save_weights",
    "StepHook",
    "write_run_config",
]
