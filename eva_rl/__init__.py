"""eva-rl: the method — Decision Transformer, adapters, EVA, data, training, metrics.

Depends on torch, numpy, safetensors (weights and EVA results on disk) and tqdm (progress
bars); tensorboard only when a `RunLogger` writes. No gymnasium, no Meta-World: the adapters
and EVA work on any torch model. The subpackages are imported explicitly (`eva_rl.adapters`,
`eva_rl.eva`, `eva_rl.inits` (CorDA, LoRA-GA), `eva_rl.models`, `eva_rl.data`,
`eva_rl.training`).
"""

__version__ = "0.1.0"
