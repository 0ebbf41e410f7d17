"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny tensors, restored afterwards.

    On a shared 2-core machine OpenMP hand-offs cost milliseconds each, far more than the
    work. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """Scripted-expert data for `helpers.TASKS` and a tiny DT pretrained on it:
    ``(root, data_dir, pretrained_dir)``, made once per test session."""
    from helpers import TASKS, load_script

    from agents.collection import collect_datasets
    from agents.experts import ScriptedCollector

    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    collect_datasets(TASKS, ScriptedCollector(noise=(0.0, 0.3), max_episode_steps=30), 2, data,
                     progress=False)
    pre = root / "pre"
    load_script("pretrain").main(["--data", str(data), "--tasks", ",".join(TASKS), "--preset",
                                  "tiny", "--steps", "6", "--batch-size", "8", "--out",
                                  str(pre), "--no-progress", "--checkpoint-every", "0"])
    return root, data, pre
