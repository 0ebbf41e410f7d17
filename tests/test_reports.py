"""Reports from a hand-made results structure: summary numbers, files, plots, tensorboard."""

import csv
import json

import numpy as np
import pytest

from agents import reports

TASKS = ["hammer-v3", "push-wall-v3"]


def record(task, index, success, auc, eva_ranks=None):
    return {
        "task": task, "index": index, "success": success, "mean_return": 100.0 * success,
        "trainable_params": 1000, "finetune_seconds": 10.0, "train_seconds": 8.0,
        "eval_seconds": 1.5, "eva_seconds": 0.5 if eva_ranks else 0.0,
        "eva_share": 0.05 if eva_ranks else 0.0, "first_grad_norm": 0.3,
        "loss_curve": {"steps": [1, 2], "loss": [0.5, 0.4]},
        "success_curve": {"steps": [0, 2], "success": [0.0, success]}, "auc": auc,
        "eva_ranks": eva_ranks,
    }  # fmt: skip


def single_run(method, seed, successes, aucs):
    return {"protocol": "single", "method": method, "seed": seed, "tasks": TASKS,
            "per_task": [record(t, i, s, a) for i, (t, s, a) in
                         enumerate(zip(TASKS, successes, aucs, strict=True))],
            "success_matrix": None, "return_matrix": None, "config": {}}


def seq_run(method, seed, matrix, aucs, ranks=None):
    return {"protocol": "sequential", "method": method, "seed": seed, "tasks": TASKS,
            "per_task": [record(t, i, matrix[i][i], aucs[i], ranks) for i, t in
                         enumerate(TASKS)],
            "success_matrix": matrix, "return_matrix": matrix, "config": {}}


@pytest.fixture(scope="module")
def results():
    res = reports.empty_results({"note": "test"})
    ranks = {"blocks.0.attn.q_proj": 6, "blocks.0.mlp.fc_in": 2, "blocks.10.mlp.fc_out": 0}
    res["runs"] = [
        single_run("lora", 0, [0.8, 0.4], [0.5, 0.2]),
        single_run("lora", 1, [1.0, 0.6], [0.7, 0.4]),
        seq_run("eva", 0, [[0.9, 0.1], [0.5, 0.7]], [0.6, 0.5], ranks),
        seq_run("lora", 0, [[0.8, 0.0], [0.2, 0.6]], [0.6, 0.3]),
        seq_run("lora", 1, [[1.0, 0.2], [0.6, 0.8]], [0.8, 0.5]),
        {**seq_run("dora", 0, [[0.5, 0.5], [0.5, 0.5]], [0.1, 0.1]), "per_task": [],
         "success_matrix": []},  # unfinished
    ]
    return res


def test_summary_numbers(results):
    s = reports.summarize(results)
    assert set(s) == {"single", "sequential"}
    assert "dora" not in s["sequential"]  # unfinished runs are left out
    lora = s["single"]["lora"]
    assert lora["per_task"]["hammer-v3"]["mean"] == pytest.approx(0.9)
    assert lora["per_task"]["hammer-v3"]["stderr"] == pytest.approx(0.1)
    # average column: mean over seeds of the per-seed task mean (0.6 and 0.8)
    assert lora["average"]["mean"] == pytest.approx(0.7)
    assert lora["average"]["stderr"] == pytest.approx(0.1)
    seq = s["sequential"]["lora"]
    # final success = last matrix row, not the diagonal
    assert seq["per_task"]["hammer-v3"]["mean"] == pytest.approx(0.4)
    assert seq["average_performance"]["mean"] == pytest.approx((0.4 + 0.7) / 2)
    assert seq["forgetting"]["mean"] == pytest.approx(((0.8 - 0.2) + (1.0 - 0.6)) / 2)
    np.testing.assert_allclose(seq["success_matrix"], [[0.9, 0.1], [0.4, 0.7]])
    # forward transfer against the same-seed single run's AUC
    ft0 = np.mean([(0.6 - 0.5) / 0.5, (0.3 - 0.2) / 0.8])
    ft1 = np.mean([(0.8 - 0.7) / 0.3, (0.5 - 0.4) / 0.6])
    assert seq["forward_transfer"]["mean"] == pytest.approx((ft0 + ft1) / 2)
    lo, hi = seq["forward_transfer"]["ci90"]
    assert min(ft0, ft1) - 1e-9 <= lo <= hi <= max(ft0, ft1) + 1e-9
    # single runs from another pretrained model are no reference
    other = {**results, "runs": [{**r, "pretrained": "other"} if r["protocol"] == "single"
                                 else r for r in results["runs"]]}
    assert reports.summarize(other)["sequential"]["lora"]["forward_transfer"] is None
    # eva has no single reference in these results
    assert s["sequential"]["eva"]["forward_transfer"] is None
    assert s["sequential"]["eva"]["eva_share"] == pytest.approx(0.05)


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
    """One full report (plots are the slow part), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("report")
    return out, reports.write_report(results, out)


def test_write_report_files(results, written):
    tmp_path, paths = written
    loaded = reports.load_results(tmp_path)
    assert loaded["runs"][0] == results["runs"][0]
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 2 * 5  # 5 runs x 2 tasks; the unfinished run has no records
    seq_lora0 = [r for r in rows if r["protocol"] == "sequential" and r["method"] == "lora"
                 and r["seed"] == "0"]
    assert [float(r["success_final"]) for r in seq_lora0] == [0.2, 0.6]
    assert [float(r["success"]) for r in seq_lora0] == [0.8, 0.6]
    md = paths["report"].read_text()
    assert "| method | hammer | push-wall | avg | paper avg | seeds |" in md
    assert "| lora | 0.90 ± 0.10 | 0.50 ± 0.10 | 0.70 ± 0.10 | 0.86 | 2 |" in md
    assert "Success matrix — eva" in md
    assert "| 1: push-wall | 0.50 | 0.70 |" in md
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == sorted([
        "success_per_task_single.png", "success_per_task_sequential.png",
        "success_matrix_eva.png", "success_matrix_lora.png",
        "success_over_sequence_eva.png", "success_over_sequence_lora.png",
        "eva_ranks_sequential_eva.png",
    ])
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in md
    assert not list(tmp_path.rglob("*.tmp*"))


def test_tensorboard_tags_and_rewrite(results, written):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, _ = written
    summary = EventAccumulator(str(tmp_path / "tb" / "summary"))
    summary.Reload()
    assert "plots/success_matrix_lora" in summary.Tags()["images"]
    # a second write replaces the event files, never appends to them
    reports.write_tensorboard(results, reports.summarize(results), {}, tmp_path / "tb")
    run_dir = tmp_path / "tb" / "sequential_lora_seed0"
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/hammer-v3/success", "eval/push-wall-v3/success", "cl/average_success",
            "cl/forgetting", "cl/forward_transfer", "finetune/hammer-v3/loss",
            "finetune/push-wall-v3/success", "finetune/hammer-v3/first_grad_norm"} <= tags
    hammer = [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/hammer-v3/success")]
    assert hammer == [(0, 0.8), (1, 0.2)]
    assert [round(e.value, 4) for e in acc.Scalars("cl/forgetting")] == [0.0, 0.6]
    assert len(list(run_dir.glob("events.*"))) == 1
    assert len(list((tmp_path / "tb" / "summary").glob("events.*"))) == 1


def test_merge_and_load_errors(results, tmp_path):
    a = reports.empty_results()
    a["runs"] = results["runs"][:2]
    b = reports.empty_results()
    b["runs"] = results["runs"][1:3]
    merged = reports.merge_results([a, b])
    assert len(merged["runs"]) == 3
    with pytest.raises(ValueError, match="no results.json"):
        reports.load_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an eva-rl results file"):
        reports.load_results(tmp_path)
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        reports.load_results(tmp_path)


def test_terminal_table(results):
    text = reports.format_table(reports.summarize(results))
    assert "lora" in text and "0.86" in text and "forgetting" in text


@pytest.mark.slow
def test_report_script_combines_runs(results, tmp_path):
    from helpers import run_script

    single, seq = reports.empty_results(), reports.empty_results()
    single["runs"] = [r for r in results["runs"] if r["protocol"] == "single"]
    seq["runs"] = [r for r in results["runs"] if r["protocol"] == "sequential"]
    reports.write_json(tmp_path / "a" / "results.json", single)
    reports.write_json(tmp_path / "b" / "results.json", seq)
    done = run_script("report", [str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                                 str(tmp_path / "c"), "--no-tensorboard"])
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "c" / "report.md").read_text()
    assert "`single` protocol" in md and "`sequential` protocol" in md
    # forward transfer is computed once the single runs sit next to the sequential ones
    merged = reports.load_results(tmp_path / "c")
    assert reports.summarize(merged)["sequential"]["lora"]["forward_transfer"] is not None
    missing = run_script("report", [str(tmp_path / "missing"), "--out", str(tmp_path / "d")])
    assert missing.returncode == 2 and "no results.json" in missing.stderr
