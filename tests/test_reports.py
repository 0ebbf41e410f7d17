"""Reports from a hand-made results structure: summary numbers, files, plots, tensorboard.

Expected numbers are Continual World's definitions worked out by hand (see
tests/test_metrics.py for the formulas); rliable's comparisons are in
tests/test_report_statistics.py.
"""

import csv
import json

import numpy as np
import pytest

from agents import reports

TASKS = ["hammer-v3", "push-wall-v3"]
REPS = 300  # bootstrap resamples: enough for the tests, fast on 2 cores


def record(task, index, success, auc, eva_ranks=None):
    # success curve 0 -> auc -> auc at steps 0, 5, 10: Continual World's AUC (the mean of the
    # evaluations after step 0) is `auc`; the record's own "auc" field holds the trapezoid
    # of the same curve, 0.75 * auc, as older eva-rl wrote it, which the report must ignore
    return {
        "task": task, "index": index, "success": success, "mean_return": 100.0 * success,
        "trainable_params": 1000, "finetune_seconds": 10.0, "train_seconds": 8.0,
        "eval_seconds": 1.5, "eva_seconds": 0.5 if eva_ranks else 0.0,
        "eva_share": 0.05 if eva_ranks else 0.0, "first_grad_norm": 0.3,
        "loss_curve": {"steps": [1, 2], "loss": [0.5, 0.4]},
        "success_curve": {"steps": [0, 5, 10], "success": [0.0, auc, auc]}, "auc": 0.75 * auc,
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


@pytest.fixture(scope="module")
def summary(results):
    return reports.summarize(results, bootstrap_reps=REPS)


def test_summary_numbers(results, summary):
    s = summary
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
    # Continual World's forgetting, over all T = 2 tasks: seed 0 ((0.8 - 0.2) + 0) / 2 = 0.3,
    # seed 1 ((1.0 - 0.6) + 0) / 2 = 0.2; mean 0.25
    assert seq["forgetting"]["mean"] == pytest.approx(0.25)
    assert seq["variants"]["forgetting_excluding_last"]["mean"] == pytest.approx(0.5)
    np.testing.assert_allclose(seq["success_matrix"], [[0.9, 0.1], [0.4, 0.7]])
    # forward transfer, ratio of seed means: sequential AUC means (0.7, 0.4), single (0.6, 0.3)
    # -> ((0.7 - 0.6) / 0.4 + (0.4 - 0.3) / 0.7) / 2 = (0.25 + 0.142857) / 2 = 0.196429
    ft = seq["forward_transfer"]
    assert ft["mean"] == pytest.approx(0.196429, abs=1e-6)
    assert ft["n"] == 2 and ft["n_reference"] == 2
    lo, hi = ft["ci90"]
    assert lo <= ft["mean"] <= hi and lo < hi
    # the old per-seed ratios against the same seed's reference:
    # seed 0 ((0.6-0.5)/0.5 + (0.3-0.2)/0.8) / 2 = 0.1625, seed 1 ((0.8-0.7)/0.3 +
    # (0.5-0.4)/0.6) / 2 = 0.25; mean 0.20625
    assert seq["variants"]["forward_transfer_mean_of_ratios"]["mean"] == pytest.approx(0.20625)
    # AUC column: Continual World's rule from the curve, not the record's trapezoid value;
    # single lora per-seed means (0.5 + 0.2) / 2 = 0.35 and (0.7 + 0.4) / 2 = 0.55
    assert lora["auc"]["mean"] == pytest.approx(0.45)
    # single runs from another pretrained model are no reference
    other = {**results, "runs": [{**r, "pretrained": "other"} if r["protocol"] == "single"
                                 else r for r in results["runs"]]}
    assert reports.summarize(other, bootstrap_reps=REPS)["sequential"]["lora"][
        "forward_transfer"] is None
    # eva has no single reference in these results
    assert s["sequential"]["eva"]["forward_transfer"] is None
    assert s["sequential"]["eva"]["eva_share"] == pytest.approx(0.05)


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
    """One full report (plots are the slow part), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("report")
    return out, reports.write_report(results, out, bootstrap_reps=REPS)


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
    assert [float(r["auc"]) for r in seq_lora0] == [0.6, 0.3]  # Continual World's rule
    md = paths["report"].read_text()
    # the paper's CW10 averages are shown only beside CW10 runs
    assert "| method | hammer | push-wall | avg | seeds |" in md and "paper avg" not in md
    assert "| lora | 0.90 ± 0.10 | 0.50 ± 0.10 | 0.70 ± 0.10 | 2 |" in md
    assert "Success matrix — eva" in md
    assert "| 1: push-wall | 0.50 | 0.70 |" in md
    # rliable's comparison; eva has one seed, so no interval is printed for it
    assert ("| method | seeds × tasks | mean success [95% CI] | IQM [95% CI] | "
            "P(improvement over lora) [95% CI] | success AUC (mean ± s.e.) |") in md
    assert "| eva | 1 × 2 | 0.60 [n/a (1 seed)] | 0.60 [n/a (1 seed)] |" in md
    assert "`n/a (1 seed)`: with one seed per task" in md
    lora_row = next(line for line in md.splitlines() if line.startswith("| lora | 2 × 2 |"))
    assert "(reference)" in lora_row and "n/a" not in lora_row
    # Continual World's metrics, named as such; the definitions are spelled out
    assert "| eva | 0.60 [n/a (1 seed)] | 0.20 [n/a (1 seed)] | – |" in md
    assert "forgetting (over all T tasks)" in md and "## Definitions" in md
    assert "averaged over all T tasks" in md
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == sorted([
        "success_per_task_single.png", "success_per_task_sequential.png",
        "comparison_single.png", "comparison_sequential.png", "success_curves_single.png",
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
    reports.write_tensorboard(results, reports.summarize(results, bootstrap_reps=REPS), {},
                              tmp_path / "tb")
    run_dir = tmp_path / "tb" / "sequential_lora_seed0"
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/hammer-v3/success", "eval/push-wall-v3/success", "cl/average_success",
            "cl/forgetting", "cl/forward_transfer", "finetune/hammer-v3/loss",
            "finetune/push-wall-v3/success", "finetune/hammer-v3/first_grad_norm"} <= tags
    hammer = [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/hammer-v3/success")]
    assert hammer == [(0, 0.8), (1, 0.2)]
    # Continual World's forgetting over the tasks so far: 0, then ((0.8 - 0.2) + 0) / 2
    assert [round(e.value, 4) for e in acc.Scalars("cl/forgetting")] == [0.0, 0.3]
    # this seed's AUC (0.6, 0.3) against the reference seed means (0.6, 0.3): 0 on both
    assert [round(e.value, 4) for e in acc.Scalars("cl/forward_transfer")] == [0.0, 0.0]
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


def test_terminal_table(summary):
    text = reports.format_table(summary)
    assert "lora" in text and "0.86" in text and "forgetting" in text
    assert "IQM [95% CI]" in text and "P(> lora) [95% CI]" in text
    assert "0.60 [n/a (1 seed)]" in text and "(n/a: with one seed per task" in text


@pytest.mark.slow
def test_report_script_combines_runs(results, tmp_path):
    from helpers import run_main

    single, seq = reports.empty_results(), reports.empty_results()
    single["runs"] = [r for r in results["runs"] if r["protocol"] == "single"]
    seq["runs"] = [r for r in results["runs"] if r["protocol"] == "sequential"]
    reports.write_json(tmp_path / "a" / "results.json", single)
    reports.write_json(tmp_path / "b" / "results.json", seq)
    done = run_main("report", [str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                               str(tmp_path / "c"), "--no-tensorboard", "--bootstrap-reps",
                               str(REPS)])
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "c" / "report.md").read_text()
    assert "`single` protocol" in md and "`sequential` protocol" in md
    # forward transfer is computed once the single runs sit next to the sequential ones
    merged = reports.load_results(tmp_path / "c")
    assert reports.summarize(merged, bootstrap_reps=REPS)["sequential"]["lora"][
        "forward_transfer"] is not None
    assert "IQM [95% CI]" in done.stdout
    missing = run_main("report", [str(tmp_path / "missing"), "--out", str(tmp_path / "d")])
    assert missing.returncode == 2 and "no results.json" in missing.stderr
    zero = run_main("report", [str(tmp_path / "a"), "--out", str(tmp_path / "e"),
                               "--bootstrap-reps", "0"])
    assert zero.returncode == 2 and "--bootstrap-reps must be positive" in zero.stderr


def test_comparison_in_summary_by_hand():
    """rliable's numbers on a tiny results dict: 3 seeds x 2 tasks of lora and eva."""
    lora = [[0.2, 0.4], [0.6, 0.4], [0.8, 1.0]]
    eva = [[0.6, 0.8], [1.0, 0.8], [0.4, 1.0]]
    res = reports.empty_results()
    res["runs"] = ([single_run("lora", s, row, row) for s, row in enumerate(lora)]
                   + [single_run("eva", s, row, row) for s, row in enumerate(eva)])
    s = reports.summarize(res, bootstrap_reps=REPS)["single"]
    c = s["eva"]["comparison"]
    # IQM: the 6 runs sorted 0.4 0.6 0.8 0.8 1.0 1.0, one cut at each end (25% of 6,
    # rounded down as scipy's trim_mean does): (0.6 + 0.8 + 0.8 + 1.0) / 4 = 0.8
    assert c["iqm"]["value"] == pytest.approx(0.8)
    assert c["mean"]["value"] == pytest.approx(4.6 / 6)
    # P(eva > lora): task 0 (0.6, 1.0, 0.4) vs (0.2, 0.6, 0.8): 1.5 + 3 + 1 = 5.5 of 9 pairs;
    # task 1 (0.8, 0.8, 1.0) vs (0.4, 0.4, 1.0): 2 + 2 + 2.5 = 6.5 of 9; (5.5 + 6.5) / 18
    assert c["p_improvement"]["value"] == pytest.approx(2 / 3)
    low, high = c["p_improvement"]["ci"]
    assert low < 2 / 3 < high
    assert s["lora"]["comparison"]["p_improvement"] is None  # the reference itself
    # the 95% intervals of the report are rliable's, reproducible run to run
    again = reports.summarize(res, bootstrap_reps=REPS)["single"]["eva"]["comparison"]
    assert again == c
    assert c["iqm"]["ci"][0] <= 0.8 <= c["iqm"]["ci"][1]
    md = reports.render_markdown(res, {"single": s})
    assert "| eva | 3 × 2 | 0.77 [" in md and "n/a" not in md
    assert "| lora | 3 × 2 |" in md and "(reference)" in md


def test_auc_needs_an_evaluation_after_step_0():
    rec = {**record("hammer-v3", 0, 0.5, 0.5), "success_curve": {"steps": [0],
                                                                 "success": [0.2]}}
    with pytest.raises(ValueError, match="hammer-v3 .*no evaluation after step 0"):
        reports.task_auc(rec)


def test_mean_success_curves_average_tasks_and_seeds_at_shared_steps():
    def rec(task, steps, success):
        return {"task": task, "success_curve": {"steps": steps, "success": success}}

    runs = [{"protocol": "single", "method": "lora", "seed": s, "per_task": [
        rec("a", [0, 5, 10], [0.0, 0.5, 1.0]), rec("b", [0, 5, 10], [0.0, 0.1 * s, 0.2])]}
        for s in (0, 1)]
    runs.append({"protocol": "sequential", "method": "lora", "seed": 0,
                 "per_task": [rec("a", [0, 10], [1.0, 1.0])]})
    runs.append({"protocol": "single", "method": "eva", "seed": 0,
                 "per_task": [rec("a", [0, 5, 10], [0.0, 1.0, 1.0]), rec("b", [0, 10], [0, 1])]})
    curves = reports.mean_success_curves({"runs": runs})
    assert curves["lora"]["steps"] == [0, 5, 10] and curves["lora"]["n"] == 4
    assert curves["lora"]["mean"] == pytest.approx([0.0, (0.5 + 0.5 + 0.0 + 0.1) / 4, 0.6])
    assert curves["lora"]["stderr"][0] == 0.0
    assert curves["eva"]["steps"] == [0, 10]  # only the updates every record has
    assert curves["eva"]["mean"] == [0.0, 1.0]


# ---------------------------------------------------------------------------- plots


def _entry(avg, per_task=(0.5, 0.5), stderr=0.1):
    est = {"value": avg, "ci": [avg - 0.05, avg + 0.05]}
    return {"tasks": TASKS, "average": {"mean": avg},
            "per_task": {t: {"mean": m, "stderr": stderr}
                         for t, m in zip(TASKS, per_task, strict=True)},
            "comparison": {"mean": est, "iqm": est, "p_improvement": est, "runs": 3}}


def test_plots_give_each_method_its_colour_and_order_methods_by_score():
    from matplotlib.colors import to_hex

    from agents.reports.plots import (
        METHOD_COLORS,
        SE_BAND_LABEL,
        figure_comparison,
        figure_success_curves,
        figure_success_per_task,
        method_color,
    )

    named = {to_hex(c) for c in METHOD_COLORS.values()}
    assert len(named) == len(METHOD_COLORS)  # every named method is told apart
    assert {"lora", "eva", "eva_dora", "fft", "dora", "pissa", "olora", "adalora",
            "eva_reverse"} <= set(METHOD_COLORS)
    other = method_color("my_method")
    assert other == method_color("my_method") and to_hex(other) not in named
    methods = {"lora": _entry(0.4), "eva": _entry(0.7), "fft": _entry(0.5)}
    for order in (methods, dict(reversed(methods.items()))):  # the input order does not matter
        bars = figure_success_per_task(order, "single").axes[0]
        legend = [t.get_text() for t in bars.get_legend().get_texts()]
        assert legend == ["eva (0.70)", "fft (0.50)", "lora (0.40)"]
        bar_sets = [c for c in bars.containers if hasattr(c, "patches")]
        patches = {label: to_hex(c.patches[0].get_facecolor())
                   for label, c in zip(legend, bar_sets, strict=True)}
        assert patches["lora (0.40)"] == to_hex(method_color("lora"))
        assert patches["eva (0.70)"] == to_hex(method_color("eva"))
        rows = figure_comparison(order, "single").axes[0]
        assert [t.get_text() for t in rows.get_yticklabels()] == ["eva", "fft", "lora"]
    curves = {m: {"steps": [0, 5, 10], "mean": [0.1, 0.3, e["average"]["mean"]],
                  "stderr": [0.0, 0.05, 0.05]} for m, e in methods.items()}
    ax = figure_success_curves(curves, "single").axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["eva (0.70)", "fft (0.50)", "lora (0.40)", SE_BAND_LABEL]
    assert "one standard error" in SE_BAND_LABEL
    lines = {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()}
    assert lines["fft (0.50)"] == to_hex(method_color("fft"))


def test_report_definitions_state_the_forward_transfer_rule_for_solved_references(written):
    md = written[1]["report"].read_text()
    definition = next(line for line in md.splitlines()
                      if line.startswith("- **forward transfer**"))
    assert "AUC_ref is 1" in definition and "mean AUC - 1" in definition


def test_the_terminal_table_reads_the_written_summary(written, summary):
    """What `scripts/finetune.py` prints after a run: the table of the report's
    ``summary.json`` (no second bootstrap), the same as the in-memory summary's; a missing
    summary is named."""
    out, _ = written
    assert reports.format_table(reports.read_summary(out)) == reports.format_table(summary)
    with pytest.raises(ValueError, match="summary.json: corrupt report summary"):
        reports.read_summary(out / "nowhere")
