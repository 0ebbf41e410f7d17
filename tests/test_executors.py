"""Cells on a real local Ray (this machine's cores) against the local executor: the same
results, a worker killed with SIGKILL mid-cell, a resume across executors, bad input."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TASKS, Interrupt, comparable, experiment

from agents.executors import RayExecutor
from agents.protocols import Cell, RunDirNotVisible, run_cell, run_experiment

ray = pytest.importorskip("ray")
# one Ray cluster at a time under `pytest -n` (Ray takes every core it sees)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.xdist_group("ray")]
ROOT = Path(__file__).resolve().parents[1]


class KillOnce:
    """A step hook that SIGKILLs its own process at (task, step) the first time only."""

    def __init__(self, task: str, step: int, marker: Path) -> None:
        self.task, self.step, self.marker = task, step, marker

    def __call__(self, task: str, step: int) -> None:
        if (task, step) == (self.task, self.step) and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


# Ray's workers cannot import this test module: ship the hook's class by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_ray_matches_local_and_survives_a_killed_worker(setup, tmp_path):
    exp = experiment(setup, protocol="single", methods=("lora", "eva"), eval_every=3,
                     eval_at_start=True)
    local = run_experiment(exp, tmp_path / "local", report=False)
    marker = tmp_path / "killed"
    hook = KillOnce(TASKS[1], 3, marker)  # checkpoint at 2: the retry resumes from it
    on_ray = run_experiment(exp, tmp_path / "ray", report=False, hook=hook,
                            executor=RayExecutor())
    assert marker.is_file()  # a worker really died mid-cell ...
    assert int(marker.read_text()) != os.getpid()  # ... a Ray worker, not this process
    assert comparable(on_ray) == comparable(local)
    for run in on_ray["runs"]:
        assert [r["task"] for r in run["per_task"]] == list(TASKS)
    assert (tmp_path / "ray/results.json").is_file()


def test_resume_with_the_other_executor(setup, tmp_path):
    exp = experiment(setup, protocol="sequential", methods=("lora",))
    full = run_experiment(exp, tmp_path / "full", report=False)

    def stop(task, step):
        if task == TASKS[1] and step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(exp, tmp_path / "cut", hook=stop, report=False)
    resumed = run_experiment(exp, tmp_path / "cut", resume=True, report=False,
                             executor=RayExecutor())
    assert comparable(resumed) == comparable(full)


def test_a_cell_that_cannot_see_the_run_directory_says_so(setup, tmp_path):
    exp = experiment(setup, protocol="single", methods=("lora",))
    with pytest.raises(RunDirNotVisible, match="shared|mounts"):
        run_cell(exp, tmp_path / "elsewhere", Cell("lora", 0, 0))
    assert not (tmp_path / "elsewhere").exists()  # nothing written


def _finetune(setup, tmp_path, *extra):
    _, data, pre = setup
    cmd = [sys.executable, str(ROOT / "scripts/finetune.py"), "--pretrained", str(pre),
           "--data", str(data), "--methods", "lora", "--tasks", ",".join(TASKS),
           "--config", "quick", "--steps", "2", "--out", str(tmp_path / "out"),
           "--no-progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return proc, time.perf_counter() - t0


def test_unreachable_ray_address_is_one_line_within_30_s(setup, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, seconds = _finetune(setup, tmp_path, "--executor", "ray", "--ray-address",
                              f"127.0.0.1:{port}")
    assert proc.returncode == 2 and seconds < 30
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot reach a Ray cluster at 127.0.0.1:{port}: Connection refused"]
    assert not (tmp_path / "out").exists()


def test_gpus_no_node_has_is_an_error_not_a_wait(setup, tmp_path):
    proc, seconds = _finetune(setup, tmp_path, "--executor", "ray", "--gpus-per-cell", "1")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no node of the Ray cluster can hold one cell" in lines[0]
    assert "1 GPU per cell" in lines[0]
    assert not (tmp_path / "out").exists()


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ValueError, match=r'pip install -e "\.\[ray\]"'):
        RayExecutor().check()
