"""Fixtures shared by the test modules."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# scripts' `main(argv)` are tested in-process as `import export_peft`, `import bench_peft`
# (the benchmark scripts import their shared helpers as `common`)
_SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path[:0] = [str(_SCRIPTS), str(_SCRIPTS / "bench")]


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
    from helpers import TASKS

    from agents.collection import collect_datasets
    from agents.experts import ScriptedCollector
    from eva_rl.training import PretrainConfig, pretrain, pretrain_train_config

    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    collect_datasets(TASKS, ScriptedCollector(noise=(0.0, 0.3), max_episode_steps=30), 2, data,
                     progress=False)
    pre = root / "pre"
    pretrain(data, TASKS, pre, PretrainConfig(preset="tiny", train=pretrain_train_config(
        6, batch_size=8, checkpoint_every=0, progress=False)))
    return root, data, pre


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with end-to-end (``slow``) tests first, each module kept in one piece (its
    module fixtures made once). Under ``pytest -n`` the longest tests then start while
    every worker is busy, instead of one of them running alone at the end."""
    modules = list(dict.fromkeys(item.module for item in items))
    has_slow = {m for m in modules if any(item.module is m and item.get_closest_marker("slow")
                                          for item in items)}
    rank = {m: (m not in has_slow, i) for i, m in enumerate(modules)}
    items.sort(key=lambda item: rank[item.module])
