"""Smoke test of scripts/bench/bench_peft.py on the tiny DT."""

from __future__ import annotations

import re

import bench_peft
import pytest

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_peft_prints_times_and_per_kind_differences(capsys):
    assert bench_peft.main(["--preset", "tiny", "--rank", "2",
                                                 "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"10 CW10 dora adapters: export \d+\.\d+ s .* PEFT load \d+\.\d+ s", text)
    rows = {line.split("|")[1].strip(): line.split("|")[3:7] for line in text.splitlines()
            if line.startswith("| ") and "e" in line.split("|")[3]}
    assert set(rows) == {"lora", "dora", "eva", "pissa", "olora", "adalora", "peft_lora",
                         "peft_dora", "peft_adalora"}
    for kind, (act, hid, trip, effect) in rows.items():
        assert float(act) < 1e-6 and float(trip) < 1e-6 and float(hid) < 1e-5, kind
        assert float(effect) > 1e-4, kind  # the adapter does change the output
