"""Decision Transformer: config validation, shapes, causality, padding, masks."""

import pytest
import torch
from torch import nn

from eva_rl.models import PRESETS, DecisionTransformer, DTConfig


def make_inputs(cfg: DTConfig, B: int = 3, K: int | None = None, seed: int = 0):
    K = cfg.context_len if K is None else K
    g = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn(B, K, cfg.state_dim, generator=g),
        "actions": torch.rand(B, K, cfg.act_dim, generator=g) * 2 - 1,
        "rewards": torch.randn(B, K, 1, generator=g),
        "returns_to_go": torch.randn(B, K, 1, generator=g),
        "timesteps": torch.arange(K).repeat(B, 1) + 7,
        "mask": torch.ones(B, K, dtype=torch.bool),
    }


def predict(model, batch):
    keys = ("states", "actions", "rewards", "returns_to_go", "timesteps", "mask")
    return model(*(batch[k] for k in keys))


@pytest.fixture
def tiny() -> DecisionTransformer:
    torch.manual_seed(0)
    return DecisionTransformer(DTConfig.preset("tiny")).eval()


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_presets_build_with_expected_shapes(name):
    cfg = DTConfig.preset(name)
    model = DecisionTransformer(cfg).eval()
    batch = make_inputs(cfg, B=2)
    out = predict(model, batch)
    assert out.shape == (2, cfg.context_len, cfg.act_dim)
    assert out.abs().max() <= 1.0
    assert model.token_mask(batch["mask"]).shape == (2, cfg.context_len * 4)
    assert model.token_types().tolist() == [0, 1, 2, 3] * cfg.context_len
    for key, value in PRESETS[name].items():
        assert getattr(cfg, key) == value


def test_paper_preset_matches_paper():
    cfg = DTConfig.preset("paper")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.context_len, cfg.dropout) == (
        4, 8, 512, 50, 0.2)
    assert cfg.token_layout == ("state", "rtg", "action", "reward")
    assert cfg.predict_from == "rtg"


def test_module_paths_are_plain_linears(tiny):
    modules = dict(tiny.named_modules())
    for i in range(tiny.config.n_layer):
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                     "mlp.fc_in", "mlp.fc_out"):
            assert type(modules[f"blocks.{i}.{name}"]) is nn.Linear
    for name in ("embed_state", "embed_rtg", "embed_action", "embed_reward",
                 "embed_timestep", "embed_position", "embed_ln", "ln_f", "action_head"):
        assert name in modules


def test_causality_later_tokens_never_change_earlier_predictions(tiny):
    cfg = tiny.config
    batch = make_inputs(cfg)
    ref = predict(tiny, batch)
    t = 2
    changed = {k: v.clone() for k, v in batch.items()}
    for key in ("states", "rewards", "returns_to_go"):
        changed[key][:, t:] += 5.0
    changed["actions"][:, t:] = -changed["actions"][:, t:]
    # the action and reward of step t-1 come after its prediction token too
    changed["actions"][:, t - 1] = -changed["actions"][:, t - 1]
    changed["rewards"][:, t - 1] += 3.0
    out = predict(tiny, changed)
    assert torch.equal(out[:, : t - 1], ref[:, : t - 1])
    # state and rtg of step t-1 precede its prediction token: same prediction
    assert torch.allclose(out[:, t - 1], ref[:, t - 1], atol=1e-6)
    assert not torch.allclose(out[:, t:], ref[:, t:])


def test_prediction_does_not_see_its_own_action(tiny):
    batch = make_inputs(tiny.config)
    ref = predict(tiny, batch)
    batch["actions"][:, -1] = -batch["actions"][:, -1]
    assert torch.allclose(predict(tiny, batch), ref, atol=1e-6)


def test_left_padding_does_not_change_predictions(tiny):
    cfg = tiny.config
    K, real = cfg.context_len, 3
    short = make_inputs(cfg, K=real)
    padded = make_inputs(cfg, K=K, seed=1)  # random junk in the padded slots
    for key in ("states", "actions", "rewards", "returns_to_go", "timesteps"):
        padded[key][:, K - real:] = short[key]
    padded["mask"][:, : K - real] = False
    out_padded = predict(tiny, padded)
    out_short = predict(tiny, {**short, "mask": None})
    assert not torch.isnan(out_padded).any()
    torch.testing.assert_close(out_padded[:, K - real:], out_short, atol=1e-5, rtol=1e-5)
    # changing what sits in the padding changes nothing either
    padded["states"][:, : K - real] += 100.0
    torch.testing.assert_close(predict(tiny, padded)[:, K - real:], out_short, atol=1e-5,
                               rtol=1e-5)


def test_fully_padded_rows_are_finite_and_gradients_too():
    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig.preset("tiny"))
    batch = make_inputs(model.config)
    batch["mask"][0] = False
    batch["mask"][1, :4] = False
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_ignores_padded_positions(tiny):
    batch = make_inputs(tiny.config)
    batch["mask"][:, :2] = False
    ref = tiny.loss(batch)
    batch["actions"][:, :2] = 0.9  # targets at padded positions
    assert torch.equal(tiny.loss(batch), ref)
    batch["actions"][:, 3] = -batch["actions"][:, 3]
    assert not torch.equal(tiny.loss(batch), ref)


def test_token_mask_and_types_follow_layout():
    model = DecisionTransformer(
        DTConfig.preset("tiny", token_layout=("rtg", "state", "action"), predict_from="state"))
    mask = torch.tensor([[False, True, True, True, True]])
    assert model.token_mask(mask).tolist() == [[False] * 3 + [True] * 12]
    assert model.token_types(2).tolist() == [0, 1, 2, 0, 1, 2]
    assert not hasattr(model, "embed_reward")
    out = predict(model.eval(), make_inputs(model.config))
    assert out.shape == (3, 5, 4)


def test_config_dict_round_trip():
    cfg = DTConfig.preset("small", state_dim=12, token_layout=["state", "rtg", "action"])
    d = cfg.to_dict()
    assert d["token_layout"] == ["state", "rtg", "action"]
    assert DTConfig.from_dict(d) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(predict_from="action"), "must precede 'action'"),
        (dict(predict_from="reward"), "must precede 'action'"),
        (dict(token_layout=("state", "rtg", "act")), "unknown tokens"),
        (dict(token_layout=("state", "rtg")), "must contain 'action'"),
        (dict(token_layout=("state", "state", "action")), "duplicate"),
        (dict(n_embd=30, n_head=4), "not divisible"),
        (dict(context_len=0), "context_len"),
        (dict(attn_dropout=1.0), "attn_dropout"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        DTConfig.preset("tiny", **overrides)


def test_bad_inputs_are_clear_errors(tiny):
    cfg = tiny.config
    with pytest.raises(ValueError, match="unknown preset"):
        DTConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown DTConfig fields"):
        DTConfig.from_dict({**cfg.to_dict(), "n_layers": 3})
    with pytest.raises(ValueError, match="exceeds context_len"):
        predict(tiny, make_inputs(cfg, K=cfg.context_len + 1))
    with pytest.raises(ValueError, match="states have dim 12"):
        predict(tiny, {**make_inputs(cfg), "states": torch.zeros(3, 5, 12)})
    bad = make_inputs(cfg)
    bad["timesteps"][0, -1] = cfg.max_ep_len
    with pytest.raises(ValueError, match="max_ep_len"):
        predict(tiny, bad)


def test_no_position_embedding_option():
    model = DecisionTransformer(DTConfig.preset("tiny", position_embedding=False))
    assert not hasattr(model, "embed_position")
    assert predict(model.eval(), make_inputs(model.config)).shape == (3, 5, 4)
