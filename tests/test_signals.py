"""SIGINT and SIGTERM stop a script cleanly (scripts/script_cli.py): its cells, workers and
Ray stopped, the run lock released, one ``interrupted:`` line naming the command that
continues it, exit 130 / 143; that command continues to the uninterrupted results. A Ray
driver killed with ``kill -9`` leaves no Ray process behind (agents/reaper.py)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import ROOT, TASKS, comparable, run_main
from test_reliability import _processes_with

from eva_rl.runlock import LOCK_FILE

from script_cli import InputError, ScriptParser, script_main

pytestmark = pytest.mark.usefixtures("one_thread")
# one Ray cluster at a time under `pytest -n` (Ray takes every core it sees)
ON_RAY_WORKER = pytest.mark.xdist_group("ray")

PREFIX = "interrupted: "


def test_script_main_turns_a_signal_into_one_line(capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cleaned = []

    @script_main
    def run(argv=None):
        p = ScriptParser()
        p.add_argument("--out")
        p.add_argument("--resume", action="store_true")
        p.add_argument("--overwrite", action="store_true")
        p.parse_args(argv)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts the sleep
            return 0
        finally:
            cleaned.append(True)

    assert run(["--out", "a b", "--overwrite"]) == 143 and cleaned == [True]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(PREFIX)
    assert "stopped by SIGTERM" in err
    # the same run continues: --resume added, --overwrite (a new run) dropped
    assert err.rstrip().endswith("--out 'a b' --resume"), err
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored

    @script_main
    def no_resume(argv=None):
        ScriptParser().parse_args(argv)
        raise KeyboardInterrupt  # Ctrl-C before any handler of ours (or from a library)

    assert no_resume([]) == 130
    err = capsys.readouterr().err
    assert err.startswith(PREFIX) and "SIGINT" in err and "--resume" not in err

    @script_main
    def bad(argv=None):
        raise InputError("still one error line")

    assert bad([]) == 2 and capsys.readouterr().err == "error: still one error line\n"


# ------------------------------------------------------------------ a real script


def _finetune_cmd(setup, out: Path, *extra: str) -> list[str]:
    """A tiny fine-tuning run of two cells with a checkpoint in the middle of each."""
    _, data, pre = setup
    return [sys.executable, str(ROOT / "scripts/finetune.py"), "--pretrained", str(pre),
            "--data", str(data), "--tasks", ",".join(TASKS), "--methods", "lora",
            "--config", "quick", "--steps", "120", "--eval-every", "0",
            "--eval-episodes", "1", "--max-episode-steps", "15", "--batch-size", "8",
            "--no-progress", "--out", str(out), *extra]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _results(out: Path):
    return comparable(json.loads((out / "results.json").read_text()))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """The results of `_finetune_cmd`'s run, made in this process (as the script makes it)."""
    from agents.finetune_config import get_config
    from agents.protocols import Experiment, run_experiment

    _, data, pre = setup
    config = get_config("quick").replace(steps=120, eval_every=0, eval_episodes=1,
                                         max_episode_steps=15, batch_size=8, progress=False)
    exp = Experiment(pretrained=str(pre), data=str(data), tasks=",".join(TASKS),
                     methods=["lora"], seeds=(0,), protocol="single", config=config)
    out = tmp_path_factory.mktemp("straight") / "run"
    return comparable(run_experiment(exp, out, report=False))


def _first_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until a cell has written a training checkpoint (the run is mid-way)."""
    deadline = time.monotonic() + timeout
    while not any(p for p in out.glob("runs/*/*/*/train/checkpoints/*")
                  if not p.name.startswith(".")):
        assert proc.poll() is None, "the run ended before it was interrupted"
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("executor, sig", [
    ("local", signal.SIGINT), ("local", signal.SIGTERM),
    pytest.param("ray", signal.SIGTERM, marks=ON_RAY_WORKER)])
def test_a_signal_stops_finetune_and_its_command_continues(setup, tmp_path, uninterrupted,
                                                           executor, sig):
    """Interrupted mid-cell; the lock released; the command of its line continues the run
    (after SIGTERM: the same handling as SIGINT but for the signal's name and status; a
    Ray run continues here with the local executor, to spare a second Ray start)."""
    if executor == "ray":
        pytest.importorskip("ray")
    out = tmp_path / "run"
    token = f"EVA_RL_TEST_{uuid.uuid4().hex}"  # in the environment of every process it starts
    proc = subprocess.Popen(_finetune_cmd(setup, out, "--executor", executor),
                            env=_env(**{token: "1"}), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _first_checkpoint(out, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    if executor == "ray" and "You have likely discovered a bug in Ray" in err:
        # seen twice in ~5 runs on a loaded 2-core machine: Ray's core worker aborts in
        # task_manager.cc ("Tried to complete task that was not pending") when a cell's
        # reply lands during ray.shutdown(); upstream, not this handler. RayExecutor now
        # waits for its cancellations before shutting down, which should close the window
        pytest.xfail("Ray's core worker aborted during shutdown (task_manager.cc check)")
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    stops = [line for line in lines if line.startswith(PREFIX)]
    assert len(stops) == 1 and lines[-1] == stops[0], err[-3000:]
    assert f"stopped by {signal.Signals(sig).name}" in stops[0]
    assert not (out / LOCK_FILE).exists()
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]  # nothing half-written
    deadline = time.monotonic() + 10  # Ray's processes are stopped, not left behind
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _processes_with(token)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the driver: {left}"
    # the command it names continues the run to the uninterrupted results
    cmd = shlex.split(stops[0].split("continue with: ", 1)[1])
    assert cmd[0] == "python" and cmd[-1] == "--resume"
    assert Path(cmd[1]) == ROOT / "scripts" / "finetune.py"
    if sig == signal.SIGINT:
        return
    # the continuation needs no process of its own: the script's main, in this one
    again = run_main("finetune", [*cmd[2:], "--executor", "local"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert _results(out) == uninterrupted


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_collect_workers_stop_with_a_signal(tmp_path):
    out = tmp_path / "d"
    token = f"EVA_RL_TEST_{uuid.uuid4().hex}"
    cmd = [sys.executable, str(ROOT / "scripts/collect.py"), "--tasks", "reach,window-close,push",
           "--episodes", "30", "--max-episode-steps", "50", "--workers", "2", "--quiet",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(**{token: "1"}), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_processes_with(token)) < 3:  # the parent and its two workers
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(PREFIX) and "Traceback" not in err
    assert not _processes_with(token)  # the workers were stopped before the parent left
    if out.exists():  # the lock released, no temporary dataset left
        assert not (out / LOCK_FILE).exists()
        assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@ON_RAY_WORKER
def test_no_ray_process_outlives_a_killed_driver(setup, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "run"
    token = f"EVA_RL_TEST_{uuid.uuid4().hex}"
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen(_finetune_cmd(setup, out, "--executor", "ray"),
                                env=_env(**{token: "1"}), cwd=ROOT, stdout=log, stderr=log)
        try:
            _first_checkpoint(out, proc)
            assert len(_processes_with(token)) > 3  # driver, GCS, raylet, agents, workers
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            proc.kill()
    t0 = time.monotonic()
    while _processes_with(token) and time.monotonic() - t0 < 5:
        time.sleep(0.1)
    left = _processes_with(token)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"Ray processes outlived the driver by 5 s: {left}"
