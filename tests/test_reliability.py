"""Every script refuses bad input before it writes (one `error:` line, exit 2,
every existing file byte-identical), survives `kill -9` at chosen points (`EVA_RL_KILL_AT`,
`eva_rl.killpoints`), and never writes into a directory another run owns (`RunLock`)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TASKS, comparable, experiment, run_main, run_script

from eva_rl.io import atomic_write, check_writable, read_checked_json, write_checked_json
from eva_rl.killpoints import KILL_ENV
from eva_rl.runlock import LOCK_FILE, RunLock, RunLocked

from script_cli import InputError, script_main

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ helpers


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def run_env(name: str, argv: list[str], env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`run_script` with extra environment variables (e.g. a kill point)."""
    if not env:
        return run_script(name, argv, timeout=timeout)
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *argv],
                          cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(done: subprocess.CompletedProcess, *needles: str) -> None:
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def a_dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(directory: Path, pid: int, host: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                "start_time": None, "since": "then", "command": "x"}))
    return path


# ------------------------------------------------------------------- the cli module


def test_script_main_prints_known_errors_in_one_line(capsys):
    @script_main
    def full_disk(argv=None):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/config.json")

    assert full_disk() == 2
    assert capsys.readouterr().err == "error: /data/run/config.json: No space left on device\n"

    @script_main
    def bad(argv=None):
        raise InputError("--steps must be >= 1,\n got 0")

    assert bad() == 2 and capsys.readouterr().err == "error: --steps must be >= 1, got 0\n"

    @script_main
    def bug(argv=None):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        bug()


def test_devices_and_non_finite_settings_are_refused_up_front():
    from agents.finetune_config import FinetuneConfig
    from eva_rl.training import TrainConfig, resolve_device

    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        TrainConfig(device="gpu0")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lr"):
            TrainConfig(lr=bad)
    with pytest.raises(ValueError, match="rho must be >= 1"):
        FinetuneConfig().replace(rho=0.5)  # was clamped to 1 at run time but recorded as given
    with pytest.raises(ValueError, match="tau must be in"):
        FinetuneConfig().replace(tau=5)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        FinetuneConfig().replace(alpha=-1)
    with pytest.raises(ValueError, match="fft_lr must be a finite"):
        FinetuneConfig(fft_lr=float("inf"))


# ------------------------------------------------------------------------- run locks


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    out = tmp_path / "run"
    # a live holder on this host (this very test process, seen from a child's lock)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, child.pid)
        with pytest.raises(RunLocked, match=f"in use by pid {child.pid} on"):
            RunLock(out).acquire()
    finally:
        child.kill()
        child.wait()
    # the holder died: taken over, and released afterwards
    with RunLock(out) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with RunLock(out):  # nested in the same process
            pass
        assert lock.path.is_file()
    assert not (out / LOCK_FILE).exists()
    # another host cannot be checked from here: refused unless forced
    write_lock(out, 1, host="elsewhere")
    with pytest.raises(RunLocked, match="another host.*--force-unlock"):
        RunLock(out).acquire()
    with RunLock(out, force=True):
        pass
    (out / LOCK_FILE).write_text("{garbage")
    with pytest.raises(RunLocked, match=f"{LOCK_FILE}: unreadable lock file"):
        RunLock(out).acquire()
    # a directory the lock created is removed again when nothing was written in it
    new = tmp_path / "new"
    with RunLock(new):
        assert new.is_dir()
    assert not new.exists()


def test_two_writers_at_once_are_refused_by_the_lock(setup, tmp_path):
    from agents.collection import collect_datasets
    from agents.experts import ScriptedCollector
    from agents.protocols import run_experiment

    out = tmp_path / "busy"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, child.pid)
        before = snapshot(tmp_path)
        with pytest.raises(RunLocked, match=f"pid {child.pid}"):
            collect_datasets(["reach"], ScriptedCollector(max_episode_steps=5), 1, out,
                             progress=False)
        with pytest.raises(RunLocked, match=f"pid {child.pid}"):
            run_experiment(experiment(setup), out, resume=True)
        assert snapshot(tmp_path) == before
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------ checked files on resume


def test_checked_json_refuses_edits_and_garbage(tmp_path):
    path = write_checked_json(tmp_path / "x.json", {"format": "f", "version": 1, "a": 1.5})
    assert read_checked_json(path, "f", 1, "thing")["a"] == 1.5
    path.write_text(path.read_text().replace("1.5", "2.5"))
    with pytest.raises(ValueError, match="x.json: thing was modified"):
        read_checked_json(path, "f", 1, "thing")


def test_task_records_are_checksummed(tmp_path):
    from helpers import a_task_record

    from agents.runs import RECORD_FILE, read_record, write_record
    from eva_rl.io import write_checked_json

    record = a_task_record(success=0.5)
    write_record(tmp_path, record)
    assert read_record(tmp_path) == record
    path = tmp_path / RECORD_FILE
    path.write_text(path.read_text().replace("0.5", "1.0"))  # a hand-edited record
    with pytest.raises(ValueError, match=f"{path}: task record was modified"):
        read_record(tmp_path)
    path.write_text("not json{")
    with pytest.raises(ValueError, match=f"{path}: corrupt task record"):
        read_record(tmp_path)
    # checksummed, but not a record: refused by the schema, naming the file
    write_checked_json(path, {"task": "reach-v3", "success": 0.5, "curve": [1, 2]})
    with pytest.raises(ValueError, match=f"{path}: not a task record .missing: adalora_ranks"):
        read_record(tmp_path)
    write_checked_json(path, {**record.to_dict(), "success": float("nan")})
    with pytest.raises(ValueError, match="success must be a finite number in"):
        read_record(tmp_path)


def test_eva_results_are_checksummed(tmp_path):
    from eva_rl.eva import EvaConfig, EvaResult
    from eva_rl.eva.result import META_FILE, TENSORS_FILE

    comps = torch.eye(3)[:2]
    result = EvaResult(config=EvaConfig(rank=2, rho=1.0), components={"l": comps},
                       singular_values={"l": torch.tensor([2.0, 1.0])},
                       explained_variance_ratio={"l": torch.tensor([0.6, 0.3])},
                       ranks={"l": 2}, alphas={"l": 8.0}, shared={"l": "l"}, batches_used=3,
                       convergence_step={"l": 2}, n_samples={"l": 10}, seconds=0.1,
                       stop_reason="converged")
    result.save(tmp_path)
    torch.testing.assert_close(EvaResult.load(tmp_path).components["l"], comps)
    tensors = tmp_path / TENSORS_FILE
    good = tensors.read_bytes()
    tensors.write_bytes(good[:-4] + bytes(4))  # same size, other values
    with pytest.raises(ValueError, match=f"{tensors} does not match"):
        EvaResult.load(tmp_path)
    tensors.write_bytes(good)
    meta = tmp_path / META_FILE
    meta.write_text(meta.read_text().replace('"batches_used": 3', '"batches_used": 4'))
    with pytest.raises(ValueError, match=f"{meta}: EVA result was modified"):
        EvaResult.load(tmp_path)


def _tiny_dataset(path: Path, task: str = "reach-v3"):
    from eva_rl.data import write_dataset

    rng = np.random.default_rng(0)
    n = 12
    return write_dataset(path, task=task, observations=rng.normal(size=(n, 3)),
                         actions=rng.normal(size=(n, 2)), rewards=rng.normal(size=n),
                         successes=np.arange(n) % 5 == 0, episode_offsets=[0, 4, 9, 12])


@pytest.mark.parametrize("key, value", [("success_rate", 0.1), ("return_stats.max", 99.0),
                                        ("return_stats.mean", -3.0), ("task", "push-v3")])
def test_manifest_disagreeing_with_the_arrays_is_refused(tmp_path, key, value):
    from eva_rl.data import DatasetError, open_dataset, open_datasets

    _tiny_dataset(tmp_path / "reach-v3")
    file = tmp_path / "reach-v3" / "manifest.json"
    manifest = json.loads(file.read_text())
    if "." in key:
        outer, inner = key.split(".")
        manifest[outer][inner] = value
    else:
        manifest[key] = value
    file.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=f"{file}: .*{key.split('.')[0]}"):
        open_datasets(tmp_path, ["reach-v3"])
    if key != "task":
        with pytest.raises(DatasetError, match=key):
            open_dataset(tmp_path / "reach-v3")


def test_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    from eva_rl.data import format as fmt

    def no_space(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fmt, "_write_file", no_space)
    with pytest.raises(OSError, match="No space"):
        _tiny_dataset(tmp_path / "reach-v3")
    assert list(tmp_path.iterdir()) == []

    def fills_the_disk(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    (tmp_path / "results.json").write_text("old")
    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "results.json", fills_the_disk)
    assert snapshot(tmp_path) == {"results.json": b"old"}


# safetensors 0.8's own words for ENOSPC (no errno, no file name)
SAFETENSORS_NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"


def _safetensors_no_space(tensors, filename, metadata=None):
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"half")
    raise SafetensorError(SAFETENSORS_NO_SPACE)


def test_a_full_disk_is_one_os_error_whichever_library_writes(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from eva_rl import io as eva_io
    from eva_rl.io import atomic_dir

    from script_cli import error_line

    target = tmp_path / "model.safetensors"
    with pytest.raises(OSError) as info:
        atomic_write(target, lambda tmp: _safetensors_no_space({}, tmp))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert isinstance(info.value.__cause__, SafetensorError)
    assert error_line(info.value) == f"{target}: No space left on device"

    # torch.save and numpy.save do not say why a write failed: the free space does
    def torch_save_fails(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(eva_io, "free_bytes", lambda path: 4096)
    with pytest.raises(OSError, match="No space left on device") as info:
        atomic_write(tmp_path / "state.pt", torch_save_fails)
    assert info.value.filename == str(tmp_path / "state.pt")
    with pytest.raises(OSError, match="No space left on device") as info:
        with atomic_dir(tmp_path / "step_4") as tmp:
            torch_save_fails(tmp / "state.pt")
    assert info.value.filename == str(tmp_path / "step_4")
    def numpy_save_fails(f) -> None:
        raise OSError("1000000 requested and 32752 written")  # no errno

    with pytest.raises(OSError, match="No space left on device"):
        eva_io.write_synced(tmp_path / "a.npy", numpy_save_fails)
    (tmp_path / "a.npy").unlink()
    assert snapshot(tmp_path) == {}  # nothing half-written
    # with space left, a failure keeps its own exception (a bug is not a full disk)
    monkeypatch.setattr(eva_io, "free_bytes", lambda path: 1 << 30)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(tmp_path / "state.pt", torch_save_fails)
    # the scripts' fallback: the message, wherever it was raised from
    assert error_line(SafetensorError(SAFETENSORS_NO_SPACE)) == SAFETENSORS_NO_SPACE
    assert error_line(RuntimeError("unexpected pos 576 vs 534")) is None


@pytest.mark.slow
def test_scripts_report_a_full_disk_in_one_line(setup, tmp_path, monkeypatch, capsys):
    """Trainer checkpoints (pretrain.py), signatures.py and export_peft.py, each writing
    safetensors onto a full disk: one error line naming the file, nothing half-written."""
    import export_peft
    import pretrain as pretrain_script
    import signatures
    from safetensors import torch as safetensors_torch

    def one_error_line(code: int, *needles: str) -> None:
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and err[-1] == errors[0], err
        for needle in (*needles, ": No space left on device"):
            assert needle in errors[0], errors[0]

    run = _report_input(setup, tmp_path)  # a finished tiny run (lora)
    capsys.readouterr()
    before = snapshot(tmp_path)
    patched = [name for name, module in list(sys.modules.items())  # every writer of ours
               if name.split(".")[0] in ("eva_rl", "agents")
               and getattr(module, "save_file", None) is safetensors_torch.save_file]
    assert patched
    for name in patched:
        monkeypatch.setattr(sys.modules[name], "save_file", _safetensors_no_space)
    one_error_line(signatures.main(["--run", str(run), "--method", "lora", "--seed", "0",
                                    "--overwrite"]), "signature.safetensors")
    one_error_line(export_peft.main(["--run", str(run), "--method", "lora", "--out",
                                     str(tmp_path / "peft")]), str(tmp_path / "peft"))
    assert snapshot(tmp_path) == before  # the signatures kept, no export
    pre = tmp_path / "pre"
    one_error_line(pretrain_script.main(_pretrain_args(setup, pre, "--checkpoint-every", "1")),
                   str(pre / "checkpoints" / "step_1" / "model.safetensors"))
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert not (pre / LOCK_FILE).exists()


def test_unwritable_output_is_refused_before_collecting(tmp_path):
    from agents.collection import collect_datasets
    from agents.experts import ScriptedCollector

    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        check_writable(tmp_path / "file" / "data")
    t0 = time.perf_counter()
    with pytest.raises(NotADirectoryError):
        collect_datasets(["reach"], ScriptedCollector(max_episode_steps=50), 20,
                         tmp_path / "file" / "data", progress=False)
    assert time.perf_counter() - t0 < 5  # refused, not after collecting a task
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(PermissionError, match="cannot write here"):
            check_writable(ro / "data")


# ------------------------------------------------------------------ pretraining resume


def _pretrain_config(steps):
    from eva_rl.training import PretrainConfig, pretrain_train_config

    return PretrainConfig(preset="tiny", train=pretrain_train_config(
        steps, batch_size=8, checkpoint_every=2, progress=False, device="cpu"))


def test_pretrain_resume_checks_before_writing(setup, tmp_path):
    from eva_rl.training import list_checkpoints, pretrain

    _, data, _ = setup
    out = tmp_path / "pre"
    pretrain(data, TASKS, out, _pretrain_config(4))
    before = snapshot(out)
    with pytest.raises(ValueError, match="done 4 updates; --steps 2 asks for fewer"):
        pretrain(data, TASKS, out, _pretrain_config(2), resume=True)
    assert snapshot(out) == before
    state = dict(list_checkpoints(out))[4] / "state.pt"
    state.write_bytes(state.read_bytes()[:-8] + bytes(8))
    with pytest.raises(ValueError, match="state.pt: corrupt or modified"):
        pretrain(data, TASKS, out, _pretrain_config(6), resume=True)
    changed = snapshot(out)
    assert {k: v for k, v in changed.items() if not k.endswith("state.pt")} == {
        k: v for k, v in before.items() if not k.endswith("state.pt")}  # config.json kept


# ------------------------------------------------------------- one error line, per script


def _finetune_args(setup, out, *extra):
    _, data, pre = setup
    return ["--pretrained", str(pre), "--data", str(data), "--tasks", ",".join(TASKS),
            "--methods", "lora", "--config", "quick", "--steps", "2", "--no-progress",
            "--out", str(out), *extra]


def _pretrain_args(setup, out, *extra, tasks=None, steps="2"):
    _, data, _ = setup
    tasks = tasks or ",".join(TASKS)
    return ["--data", str(data), "--tasks", tasks, "--preset", "tiny", "--steps", steps,
            "--batch-size", "8", "--no-progress", "--out", str(out), *extra]


def _damaged_pretrained(setup, tmp_path, how):
    """A copy of the pretrained run, damaged in one way."""
    _, _, pre = setup
    bad = tmp_path / f"pre-{how}"
    bad.mkdir()
    cfg = json.loads((pre / "config.json").read_text())
    weights = (pre / "model.safetensors").read_bytes()
    if how == "truncated":
        weights = weights[: len(weights) // 2]
    elif how == "unknown_key":
        cfg["model"]["n_experts"] = 4
    elif how == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(pre / "model.safetensors"))
        key = next(iter(tensors))
        tensors[key][0] = float("nan")
        save_file(tensors, str(bad / "model.safetensors"))
        weights = (bad / "model.safetensors").read_bytes()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(weights)
    return bad


@pytest.mark.parametrize("how, needle", [
    ("truncated", "model.safetensors: corrupt"), ("unknown_key", "n_experts"),
    ("nan", "holds NaN or inf")])
def test_a_damaged_pretrained_run_is_refused_before_writing(setup, tmp_path, how, needle):
    from helpers import tiny_config

    from agents.protocols import Experiment, run_experiment

    bad = _damaged_pretrained(setup, tmp_path, how)
    _, data, _ = setup
    exp = Experiment(pretrained=str(bad), data=str(data), tasks=TASKS, methods=("lora",),
                     config=tiny_config())
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=needle):
        run_experiment(exp, tmp_path / "out")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def _finetune_run(setup, tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "config.json").write_text('{"format": "eva-rl-finetune"}')
    (out / "results.json").write_text('{"runs": []}')
    return out


def _report_input(setup, tmp_path):
    """A finished tiny fine-tuning run, made once per test (a few seconds)."""
    from agents.protocols import run_experiment

    run = tmp_path / "done"
    run_experiment(experiment(setup, methods=("lora",), steps=2), run)
    return run


BAD_INPUT = [  # (id, script, argv(setup, tmp_path), needles)
    ("collect --out is a file", "collect",
     lambda s, t: ["--tasks", "reach", "--episodes", "1", "--out", str(t / "afile")],
     ["afile", "not a directory"]),
    ("collect --episodes 0", "collect",
     lambda s, t: ["--tasks", "reach", "--episodes", "0", "--out", str(t / "d")],
     ["n_episodes must be >= 1"]),
    ("collect unknown task", "collect",
     lambda s, t: ["--tasks", "hamer", "--episodes", "1", "--out", str(t / "d")], ["hamer"]),
    ("collect --out locked", "collect",
     lambda s, t: ["--tasks", "reach", "--episodes", "1", "--out", str(t / "locked")],
     ["locked is in use by pid"]),
    ("pretrain unknown task", "pretrain",
     lambda s, t: _pretrain_args(s, t / "p", tasks="hamer"), ["hamer"]),
    ("pretrain --steps 0", "pretrain", lambda s, t: _pretrain_args(s, t / "p", steps="0"),
     ["steps must be >= 1"]),
    ("pretrain missing dataset", "pretrain",
     lambda s, t: _pretrain_args(s, t / "p", tasks="reach"), ["reach-v3", "missing"]),
    ("pretrain --device gpu0", "pretrain",
     lambda s, t: _pretrain_args(s, t / "p", "--device", "gpu0"), ["unknown device 'gpu0'"]),
    ("pretrain --lr inf", "pretrain",
     lambda s, t: _pretrain_args(s, t / "p", "--lr", "inf"), ["lr"]),
    ("pretrain --steps not a number", "pretrain",
     lambda s, t: _pretrain_args(s, t / "p", steps="x"), ["--steps", "invalid int"]),
    ("finetune --tau 5", "finetune", lambda s, t: _finetune_args(s, t / "o", "--tau", "5"),
     ["tau must be in"]),
    ("finetune --alpha -1", "finetune",
     lambda s, t: _finetune_args(s, t / "o", "--alpha", "-1"), ["alpha must be > 0"]),
    ("finetune --rho 0", "finetune", lambda s, t: _finetune_args(s, t / "o", "--rho", "0"),
     ["rho must be >= 1"]),
    ("finetune --device gpu0", "finetune",
     lambda s, t: _finetune_args(s, t / "o", "--device", "gpu0"), ["unknown device"]),
    ("finetune truncated weights", "finetune",
     lambda s, t: _finetune_args(s, t / "o")[:1] + [str(_damaged_pretrained(s, t, "truncated"))]
     + _finetune_args(s, t / "o")[2:], ["model.safetensors: corrupt"]),
    ("report --out at a fine-tuning run", "report",
     lambda s, t: [str(_report_input(s, t)), "--out", str(_finetune_run(s, t))],
     ["holds a run", "--overwrite"]),
    ("report --out is a file", "report",
     lambda s, t: [str(_report_input(s, t)), "--out", str(t / "afile")], ["not a directory"]),
    ("tier unknown tier", "tier", lambda s, t: ["--tier", "nope", "--out", str(t / "o")],
     ["unknown tier 'nope'", "bench"]),
    ("tier unknown stage", "tier",
     lambda s, t: ["--tier", "bench", "--out", str(t / "o"), "--stages", "train"],
     ["unknown stages train"]),
    ("tier --out is a file", "tier", lambda s, t: ["--tier", "bench", "--out", str(t / "afile")],
     ["afile"]),
    ("reproduce without a published tier", "reproduce",
     lambda s, t: ["--results", str(t / "none"), "--method", "lora", "--task", "hammer",
                   "--seed", "0"], ["tier.json", "missing"]),
    ("quickstart --episodes 0", "quickstart",
     lambda s, t: ["--episodes", "0", "--out", str(t / "q")], ["--episodes must be >= 1"]),
]
if not torch.cuda.is_available():
    BAD_INPUT.append(("finetune --device cuda without CUDA", "finetune",
                      lambda s, t: _finetune_args(s, t / "o", "--device", "cuda"),
                      ["CUDA is not available"]))


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_script_refuses_bad_input_in_one_line_and_writes_nothing(setup, tmp_path, case):
    _, script, argv, needles = case
    (tmp_path / "afile").write_text("a file, not a directory")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path / "locked", holder.pid)
        args = argv(setup, tmp_path)
        root, _, _ = setup
        before, before_setup = snapshot(tmp_path), snapshot(root)
        done = run_main(script, args)  # refused before any work: no process needed
        assert_one_error_line(done, *needles)
        assert snapshot(tmp_path) == before and snapshot(root) == before_setup
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_pretrain_script_refuses_fewer_steps_and_a_corrupt_checkpoint(setup, tmp_path):
    out = tmp_path / "p"
    assert run_main("pretrain", _pretrain_args(setup, out, steps="4")).returncode == 0
    before = snapshot(tmp_path)
    done = run_main("pretrain", _pretrain_args(setup, out, "--resume", steps="2"))
    assert_one_error_line(done, "done 4 updates", "asks for fewer")
    assert snapshot(tmp_path) == before
    ckpt = next((out / "checkpoints").iterdir()) / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = snapshot(tmp_path)
    done = run_main("pretrain", _pretrain_args(setup, out, "--resume", steps="6"))
    assert_one_error_line(done, "model.safetensors", "corrupt")
    assert snapshot(tmp_path) == before  # config.json not rewritten by a failed resume


@pytest.mark.slow
def test_report_refuses_another_report_and_overwrite_moves_it_aside(setup, tmp_path):
    from agents.protocols import run_experiment

    run = _report_input(setup, tmp_path)
    other = tmp_path / "other"
    run_experiment(experiment(setup, methods=("lora",), steps=2), other)
    out = tmp_path / "rep"
    assert run_main("report", [str(run), "--out", str(out), "--no-tensorboard",
                               "--bootstrap-reps", "20"]).returncode == 0
    first = snapshot(out)
    again = run_main("report", [str(run), "--out", str(out), "--no-tensorboard",
                                "--bootstrap-reps", "20"])
    assert again.returncode == 0  # the same report again: allowed
    done = run_main("report", [str(other), "--out", str(out), "--bootstrap-reps", "20"])
    assert_one_error_line(done, "holds another report", "--overwrite")
    assert snapshot(out).keys() == first.keys()
    done = run_main("report", [str(other), "--out", str(out), "--overwrite",
                               "--no-tensorboard", "--bootstrap-reps", "20"])
    assert done.returncode == 0, done.stderr[-2000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("rep.old-")]
    assert len(aside) == 1 and snapshot(aside[0]).keys() == first.keys()
    assert not (aside[0] / LOCK_FILE).exists() and not (out / LOCK_FILE).exists()


# ------------------------------------------------------------ kill -9 at chosen points


def _killed_then(script, argv, point, resume_argv=None):
    """Run ``script`` killed at ``point`` (a real process), then run it again in this
    process (``resume_argv`` or the same); returns the second run."""
    killed = run_env(script, argv, {KILL_ENV: point})
    assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
    again = run_main(script, resume_argv or argv)
    assert again.returncode == 0, (point, again.stderr[-3000:])
    return again


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.mark.slow
def test_pretrain_killed_anywhere_resumes_to_the_uninterrupted_model(setup, tmp_path):
    straight = tmp_path / "straight"
    assert run_main("pretrain", _pretrain_args(setup, straight, steps="5")).returncode == 0
    # before the first checkpoint (nothing to resume from yet), after one, and between two
    for point in ("pretrain.config_written", "trainer.checkpoint_saved@1", "trainer.step@3"):
        out = tmp_path / point.replace("@", "-")
        argv = _pretrain_args(setup, out, steps="5")
        _killed_then("pretrain", argv, point, argv + ["--resume"])
        for key, value in _weights(straight).items():
            torch.testing.assert_close(_weights(out)[key], value, rtol=0, atol=0)
        assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_finetune_killed_anywhere_resumes_to_the_uninterrupted_results(setup, tmp_path):
    def args(out):
        return _finetune_args(setup, out, "--protocol", "sequential", "--methods", "eva",
                              "--eval-episodes", "1", "--max-episode-steps", "15",
                              "--batch-size", "8", "--steps", "4", "--eval-every", "0")

    straight = tmp_path / "straight"
    assert run_main("finetune", args(straight)).returncode == 0
    expected = comparable(json.loads((straight / "results.json").read_text()))
    for point in ("finetune.config_written", "finetune.eva_saved@2", "trainer.step@6",
                  "finetune.record_written@1"):
        out = tmp_path / point.replace("@", "-")
        _killed_then("finetune", args(out), point, args(out) + ["--resume"])
        assert comparable(json.loads((out / "results.json").read_text())) == expected, point


@pytest.mark.slow
def test_collect_killed_anywhere_resumes_to_the_uninterrupted_datasets(tmp_path):
    from eva_rl.data import open_dataset

    def args(out):
        return ["--tasks", "reach,window-close", "--episodes", "2", "--noise", "0,0.3",
                "--max-episode-steps", "20", "--quiet", "--out", str(out)]

    straight = tmp_path / "straight"
    assert run_main("collect", args(straight)).returncode == 0
    for point in ("collect.dataset_written@1",):
        out = tmp_path / "killed"
        again = _killed_then("collect", args(out), point)
        assert "existing" in again.stdout and "collected" in again.stdout
        for task in ("reach-v3", "window-close-v3"):
            a, b = open_dataset(out / task), open_dataset(straight / task)
            np.testing.assert_array_equal(a.observations, b.observations)
            np.testing.assert_array_equal(a.actions, b.actions)


@pytest.mark.slow
def test_quickstart_killed_before_the_first_checkpoint_continues(tmp_path):
    out = tmp_path / "q"
    argv = ["--out", str(out), "--episodes", "1", "--pretrain-steps", "4", "--steps", "2",
            "--eval-episodes", "1", "--no-progress"]
    again = _killed_then("quickstart", argv, "pretrain.config_written")
    assert (out / "pretrain/model.safetensors").is_file()
    assert (out / "finetune/report.md").is_file() and "done in" in again.stdout


def _processes_with(token: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if token.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_collect_workers_die_with_their_parent(tmp_path):
    token = f"EVA_RL_TEST_{uuid.uuid4().hex}"
    argv = ["--tasks", "reach,window-close,push", "--episodes", "30",
            "--max-episode-steps", "50", "--workers", "2", "--quiet",
            "--out", str(tmp_path / "d")]
    # the parent SIGKILLs itself once a worker has finished an episode; the workers are busy
    # (output to a file: orphans holding a pipe would block the wait without the fix)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           KILL_ENV: "collect.workers_running", token: "1"}
    with open(tmp_path / "log.txt", "wb") as log:
        parent = subprocess.Popen([sys.executable, str(ROOT / "scripts/collect.py"), *argv],
                                  cwd=ROOT, env=env, stdout=log, stderr=log)
        assert parent.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "log.txt").read_text()
    deadline = time.monotonic() + 10
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _processes_with(token)
    for pid in left:  # do not leave them running if the assertion fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"orphaned workers {left}"
