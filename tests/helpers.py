"""Helpers shared by the test modules (``from helpers import ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, argv: Sequence[str], timeout: float = 300
               ) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>.py argv...`` as a user would (a fresh interpreter, one torch
    thread), from the repository root; returns the finished process with its text output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
