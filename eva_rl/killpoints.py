"""Deterministic interruptions for tests: SIGKILL this process at a named point.

    kill_point("pretrain.config_written")   # in the library, where an interruption matters

does nothing unless the environment variable ``EVA_RL_KILL_AT`` names the point:
``EVA_RL_KILL_AT=trainer.checkpoint_saved@2`` kills the process the second time it reaches
``trainer.checkpoint_saved`` (``@1`` is the default). A killed run is then continued (the
same command again, or ``--resume``) and compared with an uninterrupted one, without
racing a timer. The points: ``collect.dataset_written``, ``collect.workers_running``
(the parent, once a worker finished an episode), ``pretrain.config_written``,
``trainer.step`` (after each update), ``trainer.checkpoint_saved``,
``finetune.config_written``, ``finetune.eva_saved``, ``finetune.record_written``.
"""

from __future__ import annotations

import os
import signal

KILL_ENV = "EVA_RL_KILL_AT"
_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process if ``EVA_RL_KILL_AT`` asks for this visit of point ``name``."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
