"""Benchmark tiers: the tier spec, its run directory, `scripts/tier.py` end to end and
`scripts/reproduce.py` rerunning one published cell."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import comparable, run_main, run_script, tiny_config

from agents.protocols import Cell, cell_finished
from agents.tiers import (
    TIERS,
    Tier,
    carry_restored_costs,
    check_same_base,
    cost_split,
    format_cost_split,
    get_tier,
    prepare_tier_dir,
    read_costs,
    read_tier_file,
    restore_cells,
    sequential_experiment,
    tier_paths,
    timed_stage,
    write_tier_file,
)
from envs import CW10, MT40
from eva_rl.training import PretrainConfig, pretrain_train_config


def tiny_tier(**changes) -> Tier:
    """A tier of seconds: 2 episodes per task, 6 pretraining and 6 fine-tuning updates."""
    spec = dict(name="tiny", episodes=2, noise=(0.0, 0.3), data_seed=0,
                pretrain_tasks=("reach-v3",), tuning_tasks=(),
                pretrain=PretrainConfig(preset="tiny", train=pretrain_train_config(
                    6, batch_size=8, checkpoint_every=0, progress=False)),
                finetune=tiny_config(eval_every=3, eval_episodes=1, final_eval_episodes=2),
                tasks=("window-close-v3", "faucet-close-v3"), methods=("lora", "eva"),
                seeds=(0,), sequential_methods=("lora",), sequential_final_episodes=1)
    return Tier(**{**spec, **changes})


def test_bench_tier_never_pretrains_or_tunes_on_the_reported_tasks():
    bench = get_tier("bench")
    assert bench.tasks == CW10
    assert not set(bench.pretrain_tasks) & set(CW10)
    assert not set(bench.tuning_tasks) & (set(CW10) | set(bench.pretrain_tasks))
    assert set(bench.pretrain_tasks) | set(bench.tuning_tasks) == set(MT40)
    assert bench.finetune.eval.final_episode_count == 50


def test_a_tier_round_trips_through_its_file(tmp_path):
    for tier in (tiny_tier(), *TIERS.values()):
        path = write_tier_file(tier, tmp_path / f"{tier.name}.json")
        assert read_tier_file(path) == tier
        assert get_tier(str(path)) == tier


def test_bad_tiers_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="overlap.*window-close-v3"):
        tiny_tier(pretrain_tasks=("reach-v3", "window-close-v3"))
    with pytest.raises(ValueError, match="unknown tier 'nope'; valid tiers: bench"):
        get_tier("nope")
    (tmp_path / "tier.json").write_text("{not json")
    with pytest.raises(ValueError, match="tier.json: corrupt tier file"):
        get_tier(str(tmp_path / "tier.json"))


def test_a_tier_directory_holds_one_tier(tmp_path):
    prepare_tier_dir(tiny_tier(), tmp_path)
    prepare_tier_dir(tiny_tier(), tmp_path)  # the same tier: continue
    with pytest.raises(ValueError, match=r"another tier's settings \(differs in: episodes\)"):
        prepare_tier_dir(tiny_tier(episodes=3), tmp_path)


def test_stage_costs_add_up_over_sessions_and_interruptions(tmp_path):
    with timed_stage(tmp_path, "pretrain", lambda: 10.0):
        pass
    with pytest.raises(KeyboardInterrupt), timed_stage(tmp_path, "pretrain", lambda: 30.0):
        raise KeyboardInterrupt
    costs = read_costs(tmp_path)
    assert costs["peak_rss_mib"] == {"pretrain": 30.0}
    first = costs["seconds"]["pretrain"]
    with timed_stage(tmp_path, "pretrain"):
        pass
    assert read_costs(tmp_path)["seconds"]["pretrain"] > first
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        with timed_stage(tmp_path, "train"):
            pass


def test_cost_split_sums_the_records_per_protocol():
    costs = {"seconds": {"collect": 5.0, "single": 20.0}, "peak_rss_mib": {"single": 300.0}}
    rec = {"train_seconds": 3.0, "eval_seconds": 1.0, "eva_seconds": 0.5, "peak_rss_mib": 700}
    results = {"runs": [
        {"protocol": "single", "per_task": [rec, {**rec, "peak_rss_mib": 900}]},
        {"protocol": "sequential", "per_task": [{**rec, "row_eval_seconds": 4.0}]}]}
    split = cost_split(costs, results)
    assert split["single"]["cells"] == 2 and split["single"]["train_seconds"] == 6.0
    assert split["single"]["worker_peak_rss_mib"] == 900
    assert split["sequential"]["row_eval_seconds"] == 4.0
    text = format_cost_split(split)
    assert "| collect | 5 | – |" in text and "| single | 20 | 300 |" in text
    assert "| train | 6 | 66.7% |" in text  # 6 of 6 + 2 + 1 seconds
    assert "| row eval | 4 | 47.1% |" in text  # 4 of 3 + 1 + 4 + 0.5


def test_restored_cells_bring_their_share_of_the_published_cost(tmp_path):
    def costs(root, seconds, peaks):
        root.mkdir(parents=True, exist_ok=True)
        (root / "costs.json").write_text(json.dumps({
            "format": "eva-rl-tier-costs", "version": 1, "seconds": seconds,
            "peak_rss_mib": peaks}))

    costs(tmp_path / "pub", {"collect": 7.0, "single": 100.0}, {"single": 50.0})
    costs(tmp_path / "run", {"collect": 3.0, "single": 10.0}, {"single": 80.0})
    carry_restored_costs(tmp_path / "run", tmp_path / "pub", 0.5)
    assert read_costs(tmp_path / "run") == {"seconds": {"collect": 3.0, "single": 60.0},
                                            "peak_rss_mib": {"single": 80.0}}
    carry_restored_costs(tmp_path / "fresh", tmp_path / "pub", 1.0)  # no costs yet
    assert read_costs(tmp_path / "fresh")["seconds"] == {"single": 100.0}


@pytest.mark.slow
def test_tier_then_reproduce_one_cell(tmp_path):
    spec = write_tier_file(tiny_tier(), tmp_path / "tiny.json")
    root, pub, work = tmp_path / "run", tmp_path / "published", tmp_path / "work"
    done = run_script("tier", ["--tier", str(spec), "--out", str(root), "--workers", "1",
                               "--publish", str(pub), "--no-progress"])
    assert done.returncode == 0, done.stderr
    costs = read_costs(root)
    assert set(costs["seconds"]) == {"collect", "pretrain", "single", "sequential"}
    assert all(v > 0 for v in costs["peak_rss_mib"].values())
    for name in ("tier.json", "costs.json", "fingerprints.json", "single/results.json",
                 "single/report.md", "sequential/results.json", "report/report.md",
                 "report/costs.md"):
        assert (pub / name).is_file(), name
    assert not list(pub.rglob("*.safetensors")) and not list(pub.rglob("checkpoints"))
    report = (pub / "report" / "report.md").read_text()
    assert "forward transfer" in report.lower()

    args = ["--results", str(pub), "--method", "eva", "--task", "faucet-close",
            "--seed", "0", "--work", str(work), "--no-progress"]
    same = run_script("reproduce", args)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "identical" in same.stdout and "note:" not in same.stdout

    # a new run directory continues from the published cells: one dropped is run again
    partial = json.loads((pub / "single" / "results.json").read_text())
    dropped = partial["runs"][0]["per_task"].pop()
    (tmp_path / "partial" / "single").mkdir(parents=True)
    (tmp_path / "partial" / "single" / "results.json").write_text(json.dumps(partial))
    (tmp_path / "partial" / "tier.json").write_bytes((pub / "tier.json").read_bytes())
    (tmp_path / "partial" / "costs.json").write_bytes((pub / "costs.json").read_bytes())
    shutil.copytree(pub / "sequential", tmp_path / "partial" / "sequential")  # whole chains
    again = run_script("tier", ["--tier", str(spec), "--out", str(tmp_path / "again"),
                                "--stages", "collect,pretrain,single,sequential",
                                "--workers", "1", "--restore-from", str(tmp_path / "partial"),
                                "--no-progress"])
    assert again.returncode == 0, again.stderr
    assert (f"restored {len(tiny_tier().methods) * 2 - 1} finished single task records"
            in again.stderr)
    assert "restored 2 finished sequential task records" in again.stderr
    chains = json.loads((tmp_path / "again" / "sequential" / "results.json").read_text())
    assert [r["success_matrix"] for r in chains["runs"]] == \
        [r["success_matrix"] for r in json.loads(
            (pub / "sequential" / "results.json").read_text())["runs"]]
    assert read_costs(tmp_path / "again")["seconds"]["sequential"] >= \
        read_costs(pub)["seconds"]["sequential"]  # the chain's cost came with it
    n_cells = len(tiny_tier().methods) * 2
    carried = read_costs(pub)["seconds"]["single"] * (n_cells - 1) / n_cells
    assert read_costs(tmp_path / "again")["seconds"]["single"] > carried  # + its own cell
    rerun = json.loads((tmp_path / "again" / "single" / "results.json").read_text())
    published = json.loads((pub / "single" / "results.json").read_text())
    assert [r["per_task"] for r in comparable(rerun)] == \
        [r["per_task"] for r in comparable(published)]  # the paths differ, not the cells
    assert rerun["runs"][0]["per_task"][-1]["task"] == dropped["task"]

    results = json.loads((pub / "single" / "results.json").read_text())
    for run in results["runs"]:
        for rec in run["per_task"]:
            if run["method"] == "eva" and rec["task"] == "faucet-close-v3":
                rec["auc"] += 0.125
    (pub / "single" / "results.json").write_text(json.dumps(results))
    differs = run_script("reproduce", args)  # the work directory is reused: only the cell
    assert differs.returncode == 1
    assert "DIFFERENT" in differs.stdout and "auc: published" in differs.stdout


def test_reproduce_names_what_the_tier_does_not_have(tmp_path):
    pub = tmp_path / "published"
    pub.mkdir()
    write_tier_file(tiny_tier(), pub / "tier.json")
    bad_task = run_main("reproduce", ["--results", str(pub), "--method", "lora",
                                      "--task", "hammer", "--seed", "0"])
    assert bad_task.returncode == 2
    assert "hammer-v3 is not a task of tier tiny; its tasks: window-close-v3" in bad_task.stderr
    bad_method = run_main("reproduce", ["--results", str(pub), "--method", "dora",
                                        "--task", "window-close", "--seed", "0"])
    assert bad_method.returncode == 2 and "its methods: lora, eva" in bad_method.stderr
    no_results = run_main("reproduce", ["--results", str(pub), "--method", "lora",
                                        "--task", "window-close", "--seed", "0"])
    assert no_results.returncode == 2 and "results.json" in no_results.stderr


def test_published_chains_are_restored_whole_or_not_at_all(tmp_path):
    pub = tmp_path / "pub"
    (pub / "sequential").mkdir(parents=True)
    published = Path("docs/results/bench")
    (pub / "tier.json").write_bytes((published / "tier.json").read_bytes())
    results = json.loads((published / "sequential" / "results.json").read_text())
    cut = results["runs"][0]
    cut["per_task"].pop()
    (pub / "sequential" / "results.json").write_text(json.dumps(results))
    bench = get_tier("bench")
    whole = [r for r in results["runs"] if len(r["per_task"]) == len(bench.tasks)]
    written = restore_cells(bench, tmp_path / "run", pub, "sequential")
    assert cut not in whole and whole
    assert written == len(whole) * len(bench.tasks)
    exp = sequential_experiment(bench, tmp_path / "run")
    runs = tier_paths(tmp_path / "run").sequential
    for run in results["runs"]:
        finished = cell_finished(runs, exp, Cell(run["method"], run["seed"]))
        assert finished == (run in whole)
    assert restore_cells(bench, tmp_path / "run", pub, "sequential") == 0  # kept, not rewritten
    with pytest.raises(ValueError, match="another tier's"):
        restore_cells(tiny_tier(), tmp_path / "other", pub, "sequential")


def test_a_published_tier_is_not_continued_on_another_base_model(tmp_path):
    pub, root = tmp_path / "pub", tmp_path / "run"
    pub.mkdir()
    write_tier_file(tiny_tier(), pub / "tier.json")
    (root / "pretrained").mkdir(parents=True)
    (root / "pretrained" / "model.safetensors").write_bytes(b"weights made here")
    (root / "machine.json").write_text(json.dumps({"cpu": "CPU B", "cpu_capability": "AVX512"}))
    check_same_base(root, pub)  # nothing published to compare with: allowed
    (pub / "fingerprints.json").write_text(json.dumps({
        "data": {}, "pretrained": "0" * 64,
        "machine": {"cpu": "CPU A", "cpu_capability": "AVX2", "torch": "2.13.0"}}))
    with pytest.raises(ValueError, match=r"is not the base model of .*CPU B \(AVX512.*"
                                         r"published one on CPU A \(AVX2; torch 2.13.0"):
        restore_cells(tiny_tier(), root, pub)
    assert not (root / "single").exists()  # nothing restored
    same = hashlib.sha256(b"weights made here").hexdigest()
    (pub / "fingerprints.json").write_text(json.dumps({"data": {}, "pretrained": same}))
    assert restore_cells(tiny_tier(), root, pub) == 0  # the same base: restoring goes on
