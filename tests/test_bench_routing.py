"""Smoke run of scripts/bench/bench_routing.py on tiny sizes (so a refactor cannot break it)."""

import json

import bench_routing
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_bench_routing_prints_its_figures(tmp_path, capsys):
    rc = bench_routing.main([
        "--out", str(tmp_path / "b"), "--pretrain-tasks", "reach",
        "--tasks", "faucet-close,window-close", "--collect-episodes", "2",
        "--collect-steps", "30", "--preset", "tiny", "--pretrain-steps", "5", "--steps", "4",
        "--eval-episodes", "1", "--max-episode-steps", "8", "--ks", "1,3", "--eva-batches", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    for router in ("eva", "obs", "embedding"):
        assert f"\n{router:<10}   1" in out and f"\n{router:<10}   3" in out
    assert "repeats (two adapters per task" in out
    saved = json.loads((tmp_path / "b/bench_routing.json").read_text())
    assert set(saved["routers"]) == {f"{r}@{k}" for r in ("eva", "obs", "embedding")
                                     for k in (1, 3)}
    assert set(saved["repeats"]["per_task"]) == {"faucet-close-v3", "window-close-v3"}
