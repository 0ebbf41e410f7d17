"""Tensorboard helpers: scalars under namespaced keys and hyperparameters as a table.

``torch.utils.tensorboard`` is imported only when a ``RunLogger`` is first written to,
so importing eva_rl stays cheap and a disabled logger needs no tensorboard at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a/b": v}`` with values tensorboard accepts (int/float/str/bool)."""
    flat: dict[str, Any] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, prefix=f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # None, tuples, lists: shown as text
            flat[name] = str(value)
    return flat


def hparams_table(hparams: Mapping[str, Any]) -> str:
    """A markdown table of (flattened) hyperparameters, one row each."""
    rows = [f"| {k} | {v} |" for k, v in flatten_hparams(hparams).items()]
    return "\n".join(["| parameter | value |", "|---|---|", *rows])


class RunLogger:
    """A thin tensorboard writer; with ``enabled=False`` (e.g. on ranks > 0) it does nothing.

    Args:
        log_dir: directory of the event files.
        enabled: write anything at all.
        purge_step: on resume, drop events at or after this step left by the interrupted run.
    """

    def __init__(
        self, log_dir: str | os.PathLike, enabled: bool = True, purge_step: int | None = None
    ) -> None:
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self.purge_step = purge_step
        self._writer = None

    @property
    def writer(self):
        """The ``SummaryWriter``, created on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar (non-finite values are logged too: they are worth seeing)."""
        if self.enabled:
            self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log several scalars at one step, each under its own tag."""
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Log markdown text."""
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float] | None = None
                ) -> None:
        """Hyperparameters as a text table and, with ``metrics``, in the HPARAMS tab."""
        if not self.enabled:
            return
        self.text("hparams", hparams_table(hparams))
        if metrics:
            finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
            self.writer.add_hparams(flatten_hparams(hparams), finite, run_name=".")

    def flush(self) -> None:
        """Write pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
