"""A tier's tuning stage: a grid of each method's own settings run on held-out tasks as
ordinary experiments, one fixed selection rule, and the chosen settings used by the
reported stages, published, and reproduced."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from helpers import run_script
from test_tiers import tiny_tier

from agents.runs import read_experiment
from agents.tier_records import DIGESTS_KEY
from agents.tiers import Tier, get_tier, restore_cells, tier_paths, write_tier_file
from agents.tuning import (
    CHOICE_FILE,
    PLOT_FILE,
    REPORT_FILE,
    TUNING_DIR,
    choose,
    read_choice,
    trial_experiment,
)

GRID = {"lora": [{"lr": 1e-3}, {"lr": 3e-2}],
        "eva": [{"lr": 1e-3, "eva_center": "token_type"}, {"lr": 3e-2}]}


def tuned_tier(**changes):
    return tiny_tier(**{"tuning_tasks": ("drawer-close-v3",), "tuning": GRID,
                        "tuning_seeds": (0, 1), **changes})


def row(method, trial, success, auc, cells=4):
    return {"method": method, "trial": trial, "settings": {}, "cells": cells,
            "success": success, "auc": auc}


def test_the_rule_picks_success_then_auc_then_the_earlier_trial():
    rows = [row("a", 0, 0.5, 0.2), row("a", 1, 0.6, 0.1), row("a", 2, 0.6, 0.1),
            row("b", 0, 0.5, 0.2), row("b", 1, 0.5, 0.3)]
    chosen = choose(rows, cells=4)
    assert chosen["a"]["trial"] == 1 and chosen["b"]["trial"] == 1
    with pytest.raises(ValueError, match="has 3 of its 4 cells"):
        choose([row("a", 0, 0.5, 0.2, cells=3)], cells=4)


def test_a_grid_gives_every_method_the_same_number_of_valid_trials():
    tier = tuned_tier()
    assert tier.to_dict()["tuning"] == GRID and tier.tuning_seeds == (0, 1)
    assert "tuning" not in get_tier("bench").to_dict()  # published tiers compare equal
    for grid, needle in (({"lora": GRID["lora"]}, "methods without trials: eva"),
                         ({**GRID, "dora": [{}, {}]}, "tier does not run: dora"),
                         ({**GRID, "eva": [{"lr": 1e-3}]}, "the same number"),
                         ({**GRID, "eva": [{"lr": 1e-3}, {"eval_episodes": 3}]},
                          "shared by every method"),
                         ({**GRID, "eva": [{"lr": 1e-3}, {"eva_center": "x"}]},
                          "eva_center must be one of")):
        with pytest.raises(ValueError, match=needle):
            tuned_tier(tuning=grid)
    with pytest.raises(ValueError, match="needs tuning_tasks"):
        tiny_tier(tuning=GRID)


@pytest.mark.slow
def test_the_tune_stage_chooses_and_the_reported_stages_train_with_it(tmp_path):
    tier = tuned_tier()
    spec = write_tier_file(tier, tmp_path / "tuned.json")
    root, pub = tmp_path / "run", tmp_path / "pub"
    refused = run_script("tier", ["--tier", str(spec), "--out", str(root), "--stages",
                                  "collect,pretrain,single", "--workers", "1",
                                  "--no-progress"])
    assert refused.returncode == 2 and "run the tune stage first" in refused.stderr
    done = run_script("tier", ["--tier", str(spec), "--out", str(root), "--workers", "1",
                               "--stages", "collect,pretrain,tune,single,report",
                               "--publish", str(pub), "--no-progress"])
    assert done.returncode == 0, done.stderr
    tuning = root / TUNING_DIR
    for name in (CHOICE_FILE, REPORT_FILE, PLOT_FILE):
        assert (tuning / name).is_file() and (pub / TUNING_DIR / name).is_file(), name
    assert sorted(p.name for p in tuning.glob("trial_*")) == ["trial_00", "trial_01"]
    for t in (0, 1):  # each trial's records are published with their digests
        published = json.loads((pub / TUNING_DIR / f"trial_{t:02d}" / "results.json")
                               .read_text())
        assert published["runs"] == json.loads(
            (tuning / f"trial_{t:02d}" / "results.json").read_text())["runs"]
        assert len(published[DIGESTS_KEY]) == sum(len(r["per_task"]) for r in published["runs"])
    choice = read_choice(root, tier)
    for method, settings in choice.items():
        assert settings in GRID[method]
    # the rule over the trials' own records
    means = {}
    for t in (0, 1):
        for run in json.loads((tuning / f"trial_{t:02d}" / "results.json").read_text())["runs"]:
            assert len(run["per_task"]) == 1 and run["tasks"] == ["drawer-close-v3"]
            means.setdefault((run["method"], t), []).append(
                (run["per_task"][0]["success"], run["per_task"][0]["auc"]))
    for method in GRID:
        scores = [(sum(s for s, _ in means[(method, t)]), sum(a for _, a in means[(method, t)]),
                   -t) for t in (0, 1)]
        assert GRID[method][-max(scores)[2]] == choice[method]
    single = read_experiment(tier_paths(root).single)
    assert single["config"]["method_settings"] == choice
    table = (tuning / REPORT_FILE).read_text()
    assert "Selection rule" in table and table.count("| eva |") == 2
    # a published tuning stage is restored, not rerun, on the same base model
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy2(root / "tier.json", again / "tier.json")
    for sub in ("data", "pretrained"):
        shutil.copytree(root / sub, again / sub)
    restored = run_script("tier", ["--tier", str(spec), "--out", str(again), "--stages", "tune",
                                   "--restore-from", str(pub), "--no-progress"])
    assert restored.returncode == 0, restored.stderr
    cells = sum(len(r["per_task"]) for t in (0, 1) for r in json.loads(
        (pub / TUNING_DIR / f"trial_{t:02d}" / "results.json").read_text())["runs"])
    assert f"restored {cells} finished tune task records" in restored.stderr
    assert read_choice(again, tier) == choice
    assert not list((again / TUNING_DIR).rglob("*.safetensors"))  # nothing was trained
    # published cells trained with settings this run's choice does not hold are refused
    path = again / TUNING_DIR / CHOICE_FILE
    edited = json.loads(path.read_text())
    other = 1 - edited["chosen"]["lora"]["trial"]
    edited["chosen"]["lora"].update(trial=other, settings=GRID["lora"][other])
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="single cells were trained with other settings"):
        restore_cells(tier, again, pub, "single")
    assert not (again / "single").exists()  # refused before anything was written
    # a published tuned cell reproduces with the published choice
    same = run_script("reproduce", ["--results", str(pub), "--method", "eva", "--task",
                                    "window-close", "--seed", "0", "--work",
                                    str(tmp_path / "work"), "--no-progress"])
    assert same.returncode == 0, same.stdout + same.stderr


def test_the_fair_bench_tier_tunes_every_method_alike_on_held_out_tasks():
    fair, bench = get_tier("bench-tuned"), get_tier("bench")
    assert fair.pretrain_tasks == bench.pretrain_tasks
    assert fair.pretrain.train.steps == 3 * bench.pretrain.train.steps  # chosen on held-out
    assert not set(fair.tuning_tasks) & (set(fair.tasks) | set(fair.pretrain_tasks))
    assert "stick-push-v3" not in fair.tuning_tasks  # no signal for any method
    assert {"corda_ipm", "corda_kpm", "lora_ga"} <= set(fair.methods)
    assert len({len(trials) for trials in fair.tuning.values()}) == 1
    assert set(fair.tuning) == set(fair.methods) | set(fair.sequential_methods)
    # each tuning cell evaluates once, after its last update: no zero-shot point
    exp, _ = trial_experiment(fair, tier_paths("unused"), 0)
    evaluation = exp.config.eval
    assert (evaluation.every, evaluation.at_start, evaluation.final_episode_count) == (
        0, False, 20)
    assert exp.config.train.steps == fair.finetune.train.steps  # the same training


def test_a_tiers_tuning_evaluation_is_checked():
    fair = get_tier("bench-tuned")
    for bad in ({"lr": 0.1}, {"final_eval_episodes": 0}, "fewer"):
        with pytest.raises(ValueError, match="tuning_eval"):
            dataclasses.replace(fair, tuning_eval=bad)
    with pytest.raises(ValueError, match="tuning_eval needs a tuning grid"):
        dataclasses.replace(get_tier("bench"), tuning_eval={"eval_every": 0})
    assert Tier.from_dict(fair.to_dict()) == fair
