"""Models: the Decision Transformer and its configuration presets."""

from eva_rl.models.dt import PRESETS, DecisionTransformer, DTConfig

__all__ = ["PRESETS", "DTConfig", "DecisionTransformer"]
