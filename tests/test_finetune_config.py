"""The fine-tuning settings nested by concern (`agents.finetune_config`): one flat name per
setting (replace, method_settings, the command line), old flat records read and compared as
settings, --help grouped by concern, one-line errors naming the setting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import finetune as finetune_script
import pytest

from agents.finetune_config import (
    CONFIGS,
    FLAT_FIELDS,
    GROUPS,
    AdaLoraSettings,
    AdapterSettings,
    EvalSettings,
    EvaSettings,
    FinetuneConfig,
    RoutingSettings,
)
from agents.methods import METHODS
from agents.protocols import Experiment
from agents.tiers import TIERS, Tier, read_tier_file

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "results" / "bench"
# a value of the right type, other than the default, for every nested setting
OTHER = {"rank": 8, "alpha": 2.0, "dropout": 0.1, "rho": 2.0, "tau": 0.9, "eva_batch_size": 7,
         "eva_max_batches": 3, "eva_token_types": ("state",), "eva_center": "token_type",
         "eva_row_norm": "lora", "eva_whiten": True, "adalora_init_rank": 12,
         "adalora_tinit": 0.2, "adalora_tfinal": 0.3, "adalora_delta_t": 5,
         "adalora_orth_weight": 0.0, "eval_every": 7, "eval_at_start": False,
         "eval_episodes": 3, "final_eval_episodes": 9, "max_episode_steps": 50,
         "eval_stop_on_success": True, "routing": "eva", "routing_after": 2,
         "routing_redecide": True, "signature_rank": 6, "steps": 11, "batch_size": 5,
         "grad_accum": 2, "lr": 0.02, "min_lr": 1e-5, "warmup_steps": 3, "weight_decay": 0.1,
         "betas": (0.8, 0.9), "grad_clip": 1.0, "precision": "fp32", "log_every": 3,
         "checkpoint_every": 4, "keep_checkpoints": 5, "seed": 3, "device": "cpu",
         "progress": False}


def published_flat_config() -> dict:
    results = json.loads((BENCH / "single" / "results.json").read_text())
    config = results["runs"][0]["config"]
    assert "adapter" not in config and "rank" in config  # recorded flat
    return config


def test_every_flat_name_is_one_nested_field_and_replace_changes_it():
    nested = {(group, f.name) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
    assert sorted(FLAT_FIELDS.values()) == sorted(nested)  # one flat name per field, no other
    assert set(OTHER) == set(FLAT_FIELDS)
    base = FinetuneConfig()
    for name, (group, field) in FLAT_FIELDS.items():
        changed = base.replace(**{name: OTHER[name]})
        before = getattr(getattr(base, group), field)
        assert getattr(getattr(changed, group), field) == OTHER[name] != before, name
        assert changed.flat_settings()[name] == OTHER[name]
        expected = [] if name in ("progress", "device") else [
            f"{name}: {OTHER[name]!r} -> {before!r}"]  # a resume may change those two
        assert base.differences(changed.to_dict()) == expected
    assert base.replace(adapter=AdapterSettings(rank=8)).adapter.rank == 8  # a whole group
    with pytest.raises(ValueError, match="unknown fine-tuning settings: rnak"):
        base.replace(rnak=8)


def test_a_published_flat_config_equals_its_nested_form():
    flat = published_flat_config()
    config = FinetuneConfig.from_dict(flat)
    nested = json.loads(json.dumps(config.to_dict()))
    assert set(nested) == {"train", "fft_lr", *GROUPS, "method_settings"}
    assert FinetuneConfig.from_dict(nested) == config
    assert config.differences(nested) == [] and config.differences(flat) == []
    # the settings added after the run was recorded take the values it ran with
    assert "routing" not in flat and config.routing == RoutingSettings()
    bench = TIERS["bench"]
    assert bench.finetune.differences(flat) == []  # progress alone differs: resumable
    assert read_tier_file(BENCH / "tier.json") == bench  # the published tier, written flat
    assert Tier.from_dict(json.loads(json.dumps(bench.to_dict()))) == bench
    exp = Experiment(pretrained="p", data="d", tasks="CW10", methods=("lora",),
                     config=bench.finetune)
    assert exp.differences({**exp.to_dict(), "config": flat}) == []  # a flat run resumes
    assert exp.differences({**exp.to_dict(), "config": {**flat, "rank": 8}}) == [
        "config.rank: 8 -> 4"]
    assert FinetuneConfig.from_dict({"rank": 8, **nested}).adapter.rank == 8  # a hand edit
    with pytest.raises(ValueError, match=r"unknown fine-tuning settings \['rnak'\]"):
        FinetuneConfig.from_dict({**flat, "rnak": 8})
    with pytest.raises(ValueError, match=r"unknown eva settings \['rho2'\]"):
        FinetuneConfig.from_dict({**nested, "eva": {"rho2": 1.0}})


def help_sections(capsys) -> dict[str, list[str]]:
    """--help's option groups: title -> the lines of each flag, joined."""
    with pytest.raises(SystemExit):
        finetune_script.parse_args(["--help"])
    sections: dict[str, list[str]] = {}
    title = None
    for line in capsys.readouterr().out.splitlines():
        if line and not line.startswith(" "):
            title = line.rstrip(":")
            sections[title] = []
        elif line.startswith("  --") and title is not None:
            sections[title].append(line.strip())
        elif line.startswith("   ") and title is not None and sections[title]:
            sections[title][-1] += " " + line.strip()
    return sections


def test_help_lists_every_setting_under_its_group_with_its_default(capsys):
    sections = help_sections(capsys)
    preset = CONFIGS[finetune_script.DEFAULT_CONFIG]
    for name, (group, field) in FLAT_FIELDS.items():
        if name in finetune_script.UNFLAGGED:
            continue
        value = getattr(getattr(preset, group), field)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        flag = f"--{name.replace('_', '-')}"
        entries = [e for e in sections[f"{group} settings (config.{group})"]
                   if e.split()[0].rstrip(",") == flag]
        assert len(entries) == 1, flag
        assert entries[0].endswith(f"(default: {shown})"), entries[0]
    assert any(e.startswith("--fft-lr") and e.endswith("(default: 0.0003)")
               for e in sections["train settings (config.train)"])
    assert any(e.startswith("--method-settings") for e in sections["per-method settings"])


@pytest.mark.parametrize("make, needle", [
    (lambda: AdapterSettings(rank=0), "rank must be >= 1, got 0"),
    (lambda: AdapterSettings(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
    (lambda: EvaSettings(center="type"), "eva_center must be one of mean, token_type"),
    (lambda: EvaSettings(max_batches=2.5), "eva_max_batches must be an integer, got 2.5"),
    (lambda: AdaLoraSettings(tinit=0.5, tfinal=0.5), "adalora_tinit and adalora_tfinal"),
    (lambda: AdaLoraSettings(orth_weight=float("nan")), "adalora_orth_weight must be a finite"),
    (lambda: EvalSettings(final_episodes=0), "final_eval_episodes must be >= 1 (or None)"),
    (lambda: RoutingSettings(after=0), "routing_after must be >= 1, got 0"),
    (lambda: RoutingSettings(router="evaa"), "unknown router 'evaa'"),
    (lambda: FinetuneConfig().replace(rank=8, adalora_init_rank=6),
     "adalora_init_rank (6) must be >= rank (8)"),
    (lambda: FinetuneConfig.from_dict({"eval": {"episodes": 0}}), "eval_episodes must be >= 1"),
])
def test_a_bad_value_is_a_one_line_error_naming_the_setting(make, needle):
    with pytest.raises(ValueError) as err:
        make()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_only_adalora_has_a_rank_budget():
    assert [m.name for m in METHODS.values() if m.has_budget] == ["adalora"]
    config = FinetuneConfig().replace(rank=4)
    assert config.adapter_rank(METHODS["adalora"]) == 6 == config.adalora.initial_rank(4)
    assert config.adapter_rank(METHODS["lora"]) == 4
    schedule = config.adalora.schedule(100, 4)
    assert (schedule.tinit, schedule.tfinal, schedule.target_rank) == (10, 20, 4)
