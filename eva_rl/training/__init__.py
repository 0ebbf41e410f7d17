"""Training: the trainer, pretraining, learning-rate schedule, checkpoints, run directories,
DDP."""

from eva_rl.training.callbacks import Callback, StepHook
from eva_rl.training.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from eva_rl.training.distributed import DistInfo, init_distributed, resolve_device
from eva_rl.training.pretraining import (
    PretrainConfig,
    PretrainResult,
    pretrain,
    pretrain_train_config,
)
from eva_rl.training.run import (
    ADAPTERS_DIR,
    CONFIG_FILE,
    RUN_KEYS,
    WEIGHTS_FILE,
    CheckpointError,
    adapter_dirs,
    default_target_return,
    default_target_returns,
    load_weights,
    read_run_config,
    read_weights,
    save_weights,
    write_run_config,
)
from eva_rl.training.schedule import lr_at
from eva_rl.training.trainer import TrainConfig, Trainer, build_optimizer, resolve_precision

__all__ = [
    "ADAPTERS_DIR",
    "CONFIG_FILE",
    "Callback",
    "RUN_KEYS",
    "WEIGHTS_FILE",
    "CheckpointError",
    "DistInfo",
    "PretrainConfig",
    "PretrainResult",
    "TrainConfig",
    "Trainer",
    "adapter_dirs",
    "build_optimizer",
    "checkpoint_dir",
    "default_target_return",
    "default_target_returns",
    "init_distributed",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_weights",
    "lr_at",
    "pretrain",
    "pretrain_train_config",
    "read_run_config",
    "read_weights",
    "resolve_device",
    "resolve_precision",
    "save_checkpoint",
    "save_weights",
    "StepHook",
    "write_run_config",
]
