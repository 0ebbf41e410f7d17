"""Decision Transformer: a GPT-style causal decoder over interleaved trajectory tokens.

Each timestep contributes ``len(token_layout)`` tokens (paper: state, return-to-go, action,
reward). Every token gets its modality embedding plus a learned timestep embedding and,
optionally, a global position embedding over token positions in the window. The action
of step ``t`` is predicted (tanh head) from the output of step ``t``'s ``predict_from``
token, which precedes the action token, so the model never sees the action it predicts.

Every weight matrix in the blocks is its own ``nn.Linear`` so adapters can wrap each one:
``blocks.{i}.attn.{q_proj,k_proj,v_proj,out_proj}`` and ``blocks.{i}.mlp.{fc_in,fc_out}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eva_rl.schema import check_known_fields

MODALITIES = ("state", "rtg", "action", "reward")

# Sizes chosen from the measured CPU step times (scripts/bench/bench_dt.py; the figures
# are in docs/benchmarks.md): `small` (0.6M parameters in the blocks) is for experiments
# on a CPU, `tiny` for tests and the `bench` tier, `paper` is the EVA paper's model
# (GPU-sized). `small` skips dropout on attention weights: on the CPU that dropout forces
# torch's unfused attention and measured ~2x slower training steps.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, context_len=5, dropout=0.0),
    "small": dict(n_layer=3, n_head=4, n_embd=128, context_len=20, dropout=0.1,
                  attn_dropout=0.0),
    "paper": dict(n_layer=4, n_head=8, n_embd=512, context_len=50, dropout=0.2),
}


@dataclass
class DTConfig:
    """Every architecture knob of the Decision Transformer."""

    state_dim: int = 39
    """Size of one observation."""
    act_dim: int = 4
    """Size of one action (targets must lie in [-1, 1]: the head is tanh)."""
    n_layer: int = 3
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block (must divide ``n_embd``)."""
    n_embd: int = 128
    """Hidden size."""
    context_len: int = 20
    """Timesteps per window (tokens = ``context_len * len(token_layout)``)."""
    max_ep_len: int = 1000
    """Size of the timestep embedding table; timesteps must be ``< max_ep_len``."""
    dropout: float = 0.1
    """Dropout on the embeddings and the residual branches."""
    attn_dropout: float | None = None
    """Dropout on attention weights (None = ``dropout``). Any value > 0 makes torch's
    attention fall back from its fused kernel to the unfused one during training."""
    token_layout: tuple[str, ...] = ("state", "rtg", "action", "reward")
    """Order of the tokens within one timestep (a subset of state, rtg, action, reward)."""
    predict_from: str = "rtg"
    """The token whose output predicts the action; must precede ``action`` in the layout."""
    position_embedding: bool = True
    """Add a learned embedding of the token position in the window (right-aligned)."""
    reward_scale: float = 200.0
    """Returns-to-go are divided by this (stored with the model for inference)."""

    def __post_init__(self) -> None:
        self.token_layout = tuple(self.token_layout)
        layout = self.token_layout
        unknown = [t for t in layout if t not in MODALITIES]
        if unknown:
            raise ValueError(f"token_layout has unknown tokens {unknown}; valid: {MODALITIES}")
        if len(set(layout)) != len(layout):
            raise ValueError(f"token_layout has duplicate tokens: {layout}")
        for needed in ("state", "action"):
            if needed not in layout:
                raise ValueError(f"token_layout must contain {needed!r}: {layout}")
        if self.predict_from not in layout:
            raise ValueError(f"predict_from={self.predict_from!r} is not in {layout}")
        if layout.index(self.predict_from) >= layout.index("action"):
            raise ValueError(
                f"predict_from={self.predict_from!r} must precede 'action' in {layout} "
                "(otherwise the model would see the action it predicts)"
            )
        for name in ("state_dim", "act_dim", "n_layer", "n_head", "n_embd", "context_len",
                     "max_ep_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.reward_scale <= 0:
            raise ValueError(f"reward_scale must be > 0, got {self.reward_scale}")

    @property
    def n_tokens(self) -> int:
        """Tokens per timestep."""
        return len(self.token_layout)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DTConfig:
        """A named configuration (``tiny``, ``small``, ``paper``) with optional overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``from_dict`` inverts it)."""
        d = dataclasses.asdict(self)
        d["token_layout"] = list(self.token_layout)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DTConfig:
        """Build from ``to_dict`` output; unknown keys are an error."""
        check_known_fields(cls, d, "DTConfig fields")
        return cls(**dict(d))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections."""

    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        c = config.n_embd
        self.n_head = config.n_head
        self.attn_dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        h = self.n_head
        q = self.q_proj(x).view(B, L, h, C // h).transpose(1, 2)  # (B, h, L, d)
        k = self.k_proj(x).view(B, L, h, C // h).transpose(1, 2)
        v = self.v_proj(x).view(B, L, h, C // h).transpose(1, 2)
        p = self.attn_dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, L, C)  # (B, L, C)
        return self.resid_drop(self.out_proj(y))


class MLP(nn.Module):
    """Feed-forward block: fc_in (4x wider), GELU, fc_out."""

    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.fc_out = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc_out(F.gelu(self.fc_in(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class DecisionTransformer(nn.Module):
    """GPT-style Decision Transformer; see the module docstring for the token scheme."""

    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        self.config = config
        c = config.n_embd
        layout = config.token_layout
        # Only the modalities in the layout get an embedding: an unused parameter would
        # never receive a gradient (and DDP would refuse it).
        if "state" in layout:
            self.embed_state = nn.Linear(config.state_dim, c)
        if "rtg" in layout:
            self.embed_rtg = nn.Linear(1, c)
        if "action" in layout:
            self.embed_action = nn.Linear(config.act_dim, c)
        if "reward" in layout:
            self.embed_reward = nn.Linear(1, c)
        self.embed_timestep = nn.Embedding(config.max_ep_len, c)
        if config.position_embedding:
            self.embed_position = nn.Embedding(config.context_len * config.n_tokens, c)
        self.embed_ln = nn.LayerNorm(c)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(c)
        self.action_head = nn.Linear(c, config.act_dim)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self._predict_index = layout.index(config.predict_from)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def n_tokens(self) -> int:
        """Tokens per timestep."""
        return self.config.n_tokens

    def num_parameters(self) -> int:
        """Number of parameters (all of them, trainable or not)."""
        return sum(p.numel() for p in self.parameters())

    def token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Which token rows are real: ``(B, K)`` step mask -> ``(B, K * n_tokens)`` bool."""
        return mask.bool().repeat_interleave(self.n_tokens, dim=1)

    def token_types(self, context_len: int | None = None) -> torch.Tensor:
        """Modality of every token row, ``(K * n_tokens,)`` long indices into the layout."""
        k = self.config.context_len if context_len is None else context_len
        device = self.embed_ln.weight.device
        return torch.arange(self.n_tokens, device=device).repeat(k)

    def _attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Causal mask AND real keys, as ``(B, 1, L, L)`` bool (True = may attend)."""
        tok = self.token_mask(mask)  # (B, L)
        L = tok.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=mask.device)
        # Every token may attend to itself: padded rows are otherwise fully masked, and
        # softmax over nothing is NaN. Real tokens never see padding either way.
        return (causal & (tok[:, None, :] | eye)).unsqueeze(1)

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict actions ``(B, K, act_dim)`` in [-1, 1] for windows of ``K <= context_len``.

        Shapes: states (B, K, state_dim), actions (B, K, act_dim), rewards (B, K, 1),
        returns_to_go (B, K, 1), timesteps (B, K) long, mask (B, K) bool (True = real step,
        padding on the left; None = all real). Tokens of modalities missing from the
        layout are ignored (their inputs may be any tensor of the right shape).
        """
        x = self.hidden_states(states, actions, rewards, returns_to_go, timesteps, mask)
        B, K = timesteps.shape
        x = x.view(B, K, self.n_tokens, -1)[:, :, self._predict_index]  # (B, K, C)
        return torch.tanh(self.action_head(x))

    def hidden_states(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-LayerNorm outputs of every token, ``(B, K * n_tokens, n_embd)``."""
        cfg = self.config
        B, K = timesteps.shape
        if K > cfg.context_len:
            raise ValueError(f"window of {K} timesteps exceeds context_len={cfg.context_len}")
        if states.shape[-1] != cfg.state_dim:
            raise ValueError(f"states have dim {states.shape[-1]}, model expects {cfg.state_dim}")
        if actions.shape[-1] != cfg.act_dim:
            raise ValueError(f"actions have dim {actions.shape[-1]}, model expects {cfg.act_dim}")
        if timesteps.numel() and int(timesteps.max()) >= cfg.max_ep_len:
            raise ValueError(
                f"timestep {int(timesteps.max())} >= max_ep_len={cfg.max_ep_len}; "
                "raise max_ep_len to cover the episode horizon"
            )
        inputs = {"state": states, "rtg": returns_to_go, "action": actions, "reward": rewards}
        embed = {"state": "embed_state", "rtg": "embed_rtg", "action": "embed_action",
                 "reward": "embed_reward"}
        time = self.embed_timestep(timesteps)  # (B, K, C)
        tokens = [getattr(self, embed[t])(inputs[t]) + time for t in cfg.token_layout]
        x = torch.stack(tokens, dim=2).reshape(B, K * self.n_tokens, cfg.n_embd)  # (B, L, C)
        if cfg.position_embedding:
            # Right-aligned: the newest token always has the last position, so a short
            # unpadded window and the same window left-padded to full length agree.
            P = cfg.context_len * self.n_tokens
            pos = torch.arange(P - x.shape[1], P, device=x.device)
            x = x + self.embed_position(pos)
        x = self.drop(self.embed_ln(x))
        attn_mask = None if mask is None else self._attention_mask(mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean squared action error over real (unpadded) steps of a sampler batch."""
        mask = batch.get("mask")
        preds = self(
            batch["states"], batch["actions"], batch["rewards"], batch["returns_to_go"],
            batch["timesteps"], mask,
        )
        err = (preds.float() - batch["actions"].float()).pow(2).mean(dim=-1)  # (B, K)
        if mask is None:
            return err.mean()
        m = mask.to(err.dtype)
        return (err * m).sum() / m.sum().clamp_min(1.0)
