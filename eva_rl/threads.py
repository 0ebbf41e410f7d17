"""The number of torch CPU threads every entry point uses unless told otherwise.

The models of this suite are small (60k to 13M parameters): one forward or update is a
few milliseconds of work, and with more than one intra-op thread much of that goes to
handing work between threads, or to waiting for a core when other processes share the
machine. Measured side by side on the 2-core development machine (docs/benchmarks.md,
"Torch threads"), a `tiny` 300-update pretraining took longer with 2 threads than with 1,
several times longer while other jobs were running. So every script's ``--threads`` and
`agents.dt_agent.DTAgent.load` default to `DEFAULT_THREADS`; pass more for the `paper`
preset on an idle many-core machine.
"""

from __future__ import annotations

DEFAULT_THREADS = 1
"""torch intra-op CPU threads of every script and of `DTAgent.load` by default."""

THREADS_HELP = (f"torch CPU threads (default {DEFAULT_THREADS}: for these small models one "
                "thread was as fast or faster than two on 2 cores, several times faster "
                "under load; docs/benchmarks.md)")
"""The help text of every script's ``--threads`` flag."""


def set_threads(threads: int | None) -> None:
    """Use ``threads`` torch intra-op CPU threads from now on (None: leave torch's setting).

    Raises ``ValueError`` for a count below 1."""
    if threads is None:
        return
    if int(threads) != threads or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {threads}")
    import torch  # here, so that a script without torch work can read the constants

    torch.set_num_threads(int(threads))
