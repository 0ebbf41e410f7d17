"""scripts/finetune.py: every fine-tuning setting is a flag derived from the config
dataclasses, with its docstring and default in --help."""

from __future__ import annotations

import dataclasses

import finetune as finetune_script
import pytest

from agents.finetune_config import CONFIGS, FinetuneConfig
from eva_rl.training import TrainConfig

BASE = ["--pretrained", "p", "--data", "d", "--methods", "lora", "--out", "o"]


def test_every_setting_is_a_flag():
    args = finetune_script.parse_args(BASE)
    reachable = set(args.config_fields)
    assert set(FinetuneConfig().flat_settings()) - reachable == {"seed", "progress"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - reachable == {"seed", "progress"}
    assert all(getattr(args, name) is None for name in reachable)  # "not given"


def test_flags_of_every_kind_parse():
    args = finetune_script.parse_args(BASE + [
        "--eva-token-types", "state,action", "--eval-stop-on-success", "--no-eval-at-start",
        "--betas", "0.8,0.95", "--precision", "fp32", "--eva-center", "token_type",
        "--method-settings", '{"eva": {"lr": 0.003}}'])
    assert args.eva_token_types == ("state", "action")
    assert args.eval_stop_on_success is True and args.eval_at_start is False
    assert args.betas == (0.8, 0.95) and args.precision == "fp32"
    config = CONFIGS["cpu"].replace(**{n: getattr(args, n) for n in args.config_fields})
    assert config.eva.center == "token_type" and config.train.betas == (0.8, 0.95)
    assert config.eval.at_start is False and config.train.steps == CONFIGS["cpu"].train.steps
    assert config.method_settings == {"eva": {"lr": 0.003}}
    with pytest.raises(ValueError, match="invalid choice"):
        finetune_script.parse_args(BASE + ["--precision", "fp16"])
    with pytest.raises(ValueError, match="expected a JSON object"):
        finetune_script.parse_args(BASE + ["--method-settings", "[1]"])


def test_help_shows_defaults_and_what_each_preset_holds(capsys):
    with pytest.raises(SystemExit):
        finetune_script.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "bench: steps=500, batch_size=64, lr=0.01" in text
    assert "--steps STEPS Number of optimizer updates. (default: 300)" in text  # cpu's
    assert "--eva-whiten, --no-eva-whiten" in text
