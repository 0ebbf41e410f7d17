"""eva-rl: the method — Decision Transformer, adapters, EVA, data, training, metrics.

Depends on torch and numpy only; the subpackages are imported explicitly
(`eva_rl.adapters`, `eva_rl.eva`, `eva_rl.models`, `eva_rl.data`, `eva_rl.training`).
"""

__version__ = "0.1.0"
