"""Smoke run of scripts/bench/bench_executors.py on tiny sizes (so a refactor cannot break it)."""

import bench_executors
import pytest

pytest.importorskip("ray")
# one Ray cluster at a time under `pytest -n` (Ray takes every core it sees)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


def test_bench_executors_prints_its_figures(setup, capsys):
    _, data, pre = setup
    rc = bench_executors.main(
        ["--data", str(data), "--pretrained", str(pre), "--steps", "2", "--eval-episodes", "1",
         "--max-episode-steps", "15", "--dispatch-tasks", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "8-cell experiment" in out and "speed-up with Ray" in out
    assert "overhead per cell" in out and "driver peak" in out
