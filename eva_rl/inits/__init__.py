"""Data-driven LoRA initialisations that change W, kept inside the adapter as an offset:
CorDA (covariance-weighted SVD of W, IPM / KPM) and LoRA-GA (SVD of the loss gradient).

    result = compute_corda(model, batches, CordaConfig(mode="ipm", rank=8), forward, mask_fn)
    result = compute_lora_ga(model, batches, LoraGaConfig(rank=8), loss_fn)
    result.save(task_dir / "corda"); result = InitResult.load(task_dir / "corda")
    apply_init(model, "hammer", result, AdapterConfig(method="lora", rank=8, alpha=8.0))

The adapter starts from A, B and keeps a frozen copy as the offset -s·B0 A0, so the model's
function is unchanged at init and the shared base weights are never edited.
"""

from eva_rl.adapters import AdapterConfig
from eva_rl.inits.corda import CORDA_MODES, CordaConfig, apply_corda, compute_corda
from eva_rl.inits.lora_ga import LoraGaConfig, apply_lora_ga, compute_lora_ga
from eva_rl.inits.result import InitResult

APPLY = {"corda": apply_corda, "lora_ga": apply_lora_ga}


def apply_init(model, adapter_name: str, result: InitResult,
               adapter_config: AdapterConfig) -> list[str]:
    """Add adapter ``adapter_name`` initialised from ``result`` (CorDA or LoRA-GA)."""
    if result.kind not in APPLY:
        raise ValueError(f"unknown init result kind {result.kind!r}; expected {list(APPLY)}")
    return APPLY[result.kind](model, adapter_name, result, adapter_config)


__all__ = [
    "APPLY",
    "CORDA_MODES",
    "CordaConfig",
    "InitResult",
    "LoraGaConfig",
    "apply_corda",
    "apply_init",
    "apply_lora_ga",
    "compute_corda",
    "compute_lora_ga",
]
