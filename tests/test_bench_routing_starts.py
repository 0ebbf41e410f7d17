"""Smoke run of scripts/bench/bench_routing_starts.py on the tiny end-to-end setup."""

import json

import bench_routing_starts
import pytest
from helpers import TASKS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_bench_routing_starts_prints_every_setting(setup, tmp_path, capsys):
    _, data, pre = setup
    out = tmp_path / "starts.json"
    rc = bench_routing_starts.main([
        "--pretrained", str(pre), "--data", str(data), "--tasks", ",".join(TASKS),
        "--config", "quick", "--ranks", "1,2", "--ks", "1,3", "--episodes", "2",
        "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {(r["score"], r["rank"], r["k"]) for r in rows} == {
        (s, r, k) for s in ("ppca", "residual") for r in (1, 2) for k in (1, 3)}
    for r in rows:
        assert set(r["per_task"]) == set(TASKS) and 0 <= r["accuracy"] <= 1
        assert f"{r['score']:<9} {r['rank']:>4} {r['k']:>3}  {r['accuracy']:8.2f}" in printed
