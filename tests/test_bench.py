"""Smoke runs of every benchmark script on tiny sizes: each prints its tables and numbers.

Nothing here checks the speed; it checks that a refactor cannot silently break a benchmark.
"""

import re

import bench_adapters
import bench_collect
import bench_data
import bench_dt
import bench_eva
import bench_eval
import bench_pipeline
import bench_pretrained
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NUMBER = r"\d+\.\d+"


def test_bench_adapters(capsys):
    bench_adapters.main(["--presets", "tiny", "--repeats", "1", "--iters", "1"])
    out = capsys.readouterr().out
    assert "## preset tiny" in out and "ours/peft" in out
    for name in ("frozen base", "fft", "ours lora", "peft dora", "ours pissa"):
        assert re.search(rf"^{name} +[\d,]+ +{NUMBER}", out, re.MULTILINE), name
    assert re.search(rf"DoRA over LoRA, ours: x{NUMBER}", out)


def test_bench_dt(capsys):
    bench_dt.main(["--presets", "tiny", "--repeats", "1", "--no-memory"])
    out = capsys.readouterr().out
    assert "tiny: " in out and "hf/this" in out
    for impl in bench_dt.IMPLS:
        assert re.search(rf"^{impl} +\d+ +[\d,]+ +\d+", out, re.MULTILINE), impl
    assert re.search(rf"wall ratios: hf/ours-3tok {NUMBER}", out)


def test_bench_data(capsys, tmp_path):
    bench_data.main(["--transitions", "2000", "--tasks", "2", "--per-task", "1000", "--batch",
                     "8", "--contexts", "5", "--repeats", "1", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(rf"size per 100k transitions: ours {NUMBER} MiB", out)
    assert re.search(rf"open_dataset \(full validation\) +{NUMBER} ms +ratio +{NUMBER}", out)
    assert re.search(r"batch 8, context 5: ours .* -> ours \d+\.\dx faster", out)
    assert list(tmp_path.iterdir()) == []  # its scratch directory is removed


def test_bench_eva(capsys):
    bench_eva.main(["--preset", "tiny", "--device", "cpu", "--solver-dims", "16",
                    "--solver-rows", "64", "--batch-size", "4", "--n-batches", "4",
                    "--repeats", "1", "--steps", "1", "--k-steps", "2", "--theorem-seeds", "1",
                    "--skip-paper"])
    out = capsys.readouterr().out
    for section in ("## solvers", "## EVA init vs PEFT", "## EVA vs one full SVD",
                    "## EVA init as a share", "## Theorem 3.2"):
        assert section in out, section
    assert re.search(r"^\| 16 \| 64 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \w+ \|", out, re.MULTILINE)
    assert re.search(rf"ours is {NUMBER}x faster", out)
    assert re.search(rf"EVA share {NUMBER}%", out)
    for init in ("eva", "lora", "lora-unit-rows"):
        assert re.search(rf"{init}: grad norm at step 1 {NUMBER}e[-+]\d+", out), init


def test_bench_eval(capsys):
    bench_eval.main(["--preset", "tiny", "--tasks", "reach", "--episodes", "2",
                     "--loop-episodes", "1", "--max-steps", "10", "--repeats", "1",
                     "--forward-threads", "1", "--forward-reps", "2"])
    out = capsys.readouterr().out
    assert re.search(r"repeat 0: fresh envs \d+ steps/s \(.* s\), pooled \d+", out)
    assert re.search(rf"pooled / raw env +{NUMBER} +\(goal >= 0.7\)", out)
    assert re.search(rf"pooled / fresh +{NUMBER}x", out)
    assert re.search(rf"1 thread\(s\): full window \(\d+ steps\) {NUMBER} ms", out)


def test_bench_collect(capsys):
    bench_collect.main(["--sections", "throughput,scaling,quality,sac", "--tasks", "reach",
                        "--scaling-tasks", "reach,push", "--repeats", "1", "--episodes", "1",
                        "--throughput-episodes", "1", "--scaling-episodes", "1",
                        "--sac-steps", "40", "--max-episode-steps", "20"])
    out = capsys.readouterr().out
    assert "### Throughput per worker (1 episodes of 20 steps" in out
    assert re.search(r"^\| reach-v3 \| \d+ \| \d+ \| \d+ \| \d+ \| [\d.]+ \| [\d.]+ \|$", out,
                     re.MULTILINE)
    assert re.search(rf"^\| 2 \| {NUMBER} \| \d+ \| {NUMBER} \|", out, re.MULTILINE)
    assert "### Scripted experts" in out and "| **mean** |" in out
    assert re.search(rf"Dataset size on disk: {NUMBER} MiB per 100k", out)
    assert "### SAC (40 training steps per task" in out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Scripted data for one task and a tiny DT pretrained on it for 2 updates."""
    from agents.collection import collect_datasets
    from agents.experts import ScriptedCollector
    from eva_rl.training import PretrainConfig, pretrain, pretrain_train_config

    root = tmp_path_factory.mktemp("bench")
    collect_datasets(["reach"], ScriptedCollector(max_episode_steps=10), 2, root / "data",
                     progress=False)
    pretrain(root / "data", ["reach-v3"], root / "pre", PretrainConfig(
        preset="tiny", train=pretrain_train_config(2, batch_size=4, progress=False)))
    return root / "data", root / "pre"


def test_bench_pretrained(tiny_run, capsys):
    _, pre = tiny_run
    bench_pretrained.main(["--run", str(pre), "--tasks", "reach", "--episodes", "1",
                           "--max-episode-steps", "10"])
    out = capsys.readouterr().out
    assert re.search(r"^reach-v3 +\d\.\d\d +\d\.\d\d$", out, re.MULTILINE)
    assert re.search(r"^mean over 1 tasks +\d\.\d{3} +\d\.\d{3}$", out, re.MULTILINE)


def test_bench_pipeline(tiny_run, capsys, tmp_path):
    data, pre = tiny_run
    assert bench_pipeline.main([
        "cw10", "--pretrained", str(pre), "--data", str(data), "--tasks", "reach",
        "--methods", "lora", "--config", "quick", "--steps", "2", "--eval-episodes", "1",
        "--max-episode-steps", "10", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"lora run 0: \d+ s wall, peak RSS \d+ MiB, avg success \d\.\d\d; "
                     r"train \d+\.\d s", out)
    assert re.search(r"^  lora +\d+ s \(1\.00x lora\), peak RSS \d+ MiB, EVA init 0\.0 s", out,
                     re.MULTILINE)
