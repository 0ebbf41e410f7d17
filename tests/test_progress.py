"""`progress_bar`: tqdm on a terminal, rate-limited log lines elsewhere."""

from __future__ import annotations

import io
import logging

import pytest
from tqdm.auto import tqdm

from eva_rl import progress
from eva_rl.progress import LogProgress, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_picks_a_bar_on_a_terminal_and_log_lines_elsewhere(monkeypatch):
    monkeypatch.delenv(progress.MODE_ENV, raising=False)
    monkeypatch.setattr("sys.stderr", Terminal())
    bar = progress_bar(total=3, desc="t")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a file or CI log
    assert isinstance(progress_bar(total=3, desc="t"), LogProgress)
    assert progress_bar(total=3, mode="bar").disable is False  # forced on
    assert progress_bar(total=3, disable=True).disable  # the caller said no progress


def test_environment_forces_modes(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setenv(progress.MODE_ENV, "bar")
    assert isinstance(progress_bar(total=2), tqdm)
    monkeypatch.setenv(progress.MODE_ENV, "off")
    off = progress_bar(total=2, mode=None)
    assert isinstance(off, tqdm) and off.disable
    monkeypatch.setattr("sys.stderr", Terminal())
    monkeypatch.setenv(progress.MODE_ENV, "log")
    assert isinstance(progress_bar(total=2), LogProgress)
    monkeypatch.setenv(progress.MODE_ENV, "loud")
    with pytest.raises(ValueError, match="EVA_RL_PROGRESS='loud' is not a progress mode"):
        progress_bar(total=2)
    monkeypatch.setenv(progress.MODE_ENV, "log")
    monkeypatch.setenv(progress.INTERVAL_ENV, "2.5")
    assert progress_bar(total=2).interval == 2.5
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="EVA_RL_PROGRESS_INTERVAL='soon'"):
        progress_bar(total=2)


def test_log_mode_writes_at_most_one_line_per_interval(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="eva_rl.progress")
    with LogProgress(total=100, desc="train", unit="step", interval=50.0, clock=clock) as bar:
        for _ in range(100):
            clock.t += 1.0  # 100 s in all: lines at 1 s, 51 s, then the final one
            bar.update(1)
            bar.set_postfix(loss="0.5")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("train: 1/100 step (1%)")
    assert lines[1].startswith("train: 51/100 step (51%)") and "loss=0.5" in lines[1]
    assert lines[2].startswith("train: 100/100 step (100%), 100.0 s, 1 step/s")
    bar.close()  # idempotent: no fourth line
    assert len(caplog.records) == 3


def test_log_mode_resumes_from_initial_and_without_total(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="eva_rl.progress")
    bar = LogProgress(total=None, desc="EVA", initial=40, interval=0.0, clock=clock)
    clock.t = 2.0
    bar.update(4)
    bar.set_postfix_str("3/6 converged")
    bar.update(0)
    bar.close()  # nothing new since the last line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["EVA: 44 it, 2.0 s, 2 it/s", "EVA: 44 it, 2.0 s, 2 it/s, 3/6 converged"]
