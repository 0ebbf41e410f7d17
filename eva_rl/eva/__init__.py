"""EVA (Explained Variance Adaptation): data-driven LoRA/DoRA initialisation with adaptive ranks.

    from eva_rl.eva import EvaConfig, compute_eva, apply_eva
    result = compute_eva(model, batches, EvaConfig(rank=8, rho=2.0, tau=0.99))
    apply_eva(model, "task", result, AdapterConfig(method="lora", rank=8))
"""

from eva_rl.eva.allocation import allocate_ranks, rescale_alpha
from eva_rl.eva.config import EvaConfig
from eva_rl.eva.core import apply_eva, compute_eva
from eva_rl.eva.hooks import (
    ActivationCollector,
    default_forward,
    dt_forward_and_mask,
    dt_token_groups,
    find_shared_inputs,
    find_target_layers,
)
from eva_rl.eva.incremental_svd import IncrementalSVD, choose_solver, partial_fit_many
from eva_rl.eva.result import EvaResult
from eva_rl.eva.tensorboard import log_eva

__all__ = [
    "ActivationCollector",
    "EvaConfig",
    "EvaResult",
    "IncrementalSVD",
    "allocate_ranks",
    "apply_eva",
    "choose_solver",
    "compute_eva",
    "default_forward",
    "dt_forward_and_mask",
    "dt_token_groups",
    "find_shared_inputs",
    "find_target_layers",
    "log_eva",
    "partial_fit_many",
    "rescale_alpha",
]
