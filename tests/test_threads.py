"""One torch thread by default in every script that runs torch and in `DTAgent.load`
(eva_rl.threads; the measurement behind the default is in docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import importlib
import io

import pytest
import torch

from eva_rl.threads import DEFAULT_THREADS, set_threads

SCRIPTS = ("collect", "pretrain", "finetune", "evaluate", "quickstart", "signatures",
           "export_peft")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_the_same_threads_flag(name):
    main = importlib.import_module(name).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(out.getvalue().split())
    assert "--threads THREADS torch CPU threads (default 1:" in text


def test_set_threads(restore_threads):
    assert DEFAULT_THREADS == 1
    set_threads(2)
    assert torch.get_num_threads() == 2
    set_threads(None)  # leaves torch's setting
    assert torch.get_num_threads() == 2
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
            set_threads(bad)


def test_dt_agent_load_uses_one_thread_unless_told(setup, restore_threads):
    from agents.dt_agent import DTAgent

    _, _, pretrained = setup
    torch.set_num_threads(2)
    DTAgent.load(pretrained, device="cpu", threads=None)
    assert torch.get_num_threads() == 2
    DTAgent.load(pretrained, device="cpu")
    assert torch.get_num_threads() == 1
    DTAgent.load(pretrained, device="cpu", threads=2)
    assert torch.get_num_threads() == 2
