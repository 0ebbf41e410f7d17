"""Shared adapter module: LoRA, DoRA, PiSSA, OLoRA, AdaLoRA and a pool of per-task adapters on one
frozen base, for any torch model built of `nn.Linear` layers; plus full fine-tuning (fft).

    from eva_rl.adapters import AdapterConfig, add_adapter, set_active_adapter
    add_adapter(model, "hammer-v3", AdapterConfig(method="dora", rank=8, alpha=8.0))
    ...train...
    save_adapter(model, "hammer-v3", run_dir / "adapters" / "hammer-v3")
    export_peft(model, "hammer-v3", "peft/hammer-v3")  # PeftModel.from_pretrained reads it
"""

from eva_rl.adapters.adalora import (
    AdaLoraAllocator,
    AdaLoraSchedule,
    AdaLoraStep,
    orthogonal_regularization,
)
from eva_rl.adapters.config import ADAPTER_KINDS, DEFAULT_TARGETS, AdapterConfig
from eva_rl.adapters.layer import AdapterLinear
from eva_rl.adapters.model import (
    active_adapter,
    adapter_layers,
    adapter_names,
    add_adapter,
    count_parameters,
    delete_adapter,
    merge_adapter,
    prepare_full_finetuning,
    set_active_adapter,
    unmerge_adapter,
)
from eva_rl.adapters.peft_format import export_peft, import_peft
from eva_rl.adapters.saving import load_adapter, save_adapter
from eva_rl.adapters.variants import VARIANTS, dora_weight_norm

__all__ = [
    "ADAPTER_KINDS",
    "DEFAULT_TARGETS",
    "VARIANTS",
    "AdaLoraAllocator",
    "AdaLoraSchedule",
    "AdaLoraStep",
    "AdapterConfig",
    "AdapterLinear",
    "active_adapter",
    "adapter_layers",
    "adapter_names",
    "add_adapter",
    "count_parameters",
    "delete_adapter",
    "dora_weight_norm",
    "export_peft",
    "import_peft",
    "load_adapter",
    "merge_adapter",
    "orthogonal_regularization",
    "prepare_full_finetuning",
    "save_adapter",
    "set_active_adapter",
    "unmerge_adapter",
]
