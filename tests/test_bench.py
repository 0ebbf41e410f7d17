"""Smoke runs of every benchmark script on tiny sizes: each prints its tables and numbers.

Nothing here checks the speed; it checks that a refactor cannot silently break a benchmark.
"""

import re

import bench_adapters
import bench_dt
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
