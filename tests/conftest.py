"""Fixtures shared by the test modules."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# the benchmark scripts import their shared helpers as `common` (tests/test_bench.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))


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
