"""Progress bars on a terminal, a few log lines elsewhere: `progress_bar(...)`.

A tqdm bar redraws itself with carriage returns, which fills a log file or a CI log with
thousands of frames. `progress_bar` returns a tqdm bar only when stderr is a terminal (or
when forced); otherwise a `LogProgress` with the same `update` / `set_postfix` /
`set_postfix_str` / `close` / context-manager interface that logs one line, at most every
`interval` seconds, after a unit of work finishes (and one final line on close).

Forcing: `mode=` or the environment variable `EVA_RL_PROGRESS` = `auto` (default) | `bar`
| `log` | `off`; `EVA_RL_PROGRESS_INTERVAL` sets the seconds between log lines (10).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MODES = ("auto", "bar", "log", "off")
MODE_ENV = "EVA_RL_PROGRESS"
INTERVAL_ENV = "EVA_RL_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0


def progress_bar(
    total: int | None = None,
    *,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    mode: str | None = None,
    interval: float | None = None,
    **tqdm_kwargs: Any,
) -> tqdm | LogProgress:
    """A progress display: a tqdm bar on a terminal, a `LogProgress` otherwise.

    `disable` (the caller's "no progress") gives a silent one. `mode` (default: the
    `EVA_RL_PROGRESS` variable, else "auto") forces "bar", "log" or "off"; "off" wins over
    everything. Other keyword arguments go to tqdm (ignored in log mode).
    """
    mode = resolve_mode(mode)
    if mode == "off":
        disable = True
    if mode == "auto":
        mode = "bar" if _stderr_is_tty() else "log"
    if mode == "bar" or disable:
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                    **tqdm_kwargs)
    return LogProgress(total=total, desc=desc, unit=unit, initial=initial,
                       interval=resolve_interval(interval))


def resolve_mode(mode: str | None) -> str:
    """`mode`, else `$EVA_RL_PROGRESS`, else "auto"; an unknown value is a `ValueError`."""
    source = "mode"
    if mode is None:
        mode, source = os.environ.get(MODE_ENV, "auto") or "auto", MODE_ENV
    mode = mode.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r} is not a progress mode; valid: {', '.join(MODES)}")
    return mode


def resolve_interval(interval: float | None) -> float:
    """`interval`, else `$EVA_RL_PROGRESS_INTERVAL`, else 10 seconds (must be >= 0)."""
    if interval is None:
        raw = os.environ.get(INTERVAL_ENV, "")
        try:
            interval = float(raw) if raw.strip() else DEFAULT_INTERVAL
        except ValueError:
            raise ValueError(f"{INTERVAL_ENV}={raw!r} is not a number of seconds") from None
    if not interval >= 0:
        raise ValueError(f"progress interval must be >= 0 seconds, got {interval!r}")
    return float(interval)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class LogProgress:
    """tqdm's counting interface, reported as rate-limited log lines (INFO)."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, interval: float = DEFAULT_INTERVAL,
                 clock=time.monotonic) -> None:
        self.total, self.desc, self.unit = total, desc or "progress", unit
        self.n = initial
        self.interval = interval
        self.postfix = ""
        self._clock = clock
        self._start = clock()
        self._start_n = initial
        self._last_time: float | None = None
        self._last_n = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Count `n` finished units; log a line if `interval` has passed since the last."""
        self.n += n
        now = self._clock()
        if self._last_time is None or now - self._last_time >= self.interval:
            self._log(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        """Extra `key=value` fields shown in the next line."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Extra text shown in the next line."""
        self.postfix = str(s)

    def close(self) -> None:
        """Log the final count (if it changed since the last line); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.n != self._last_n:
            self._log(self._clock())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log(self, now: float) -> None:
        elapsed = now - self._start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        extra = f", {self.postfix}" if self.postfix else ""
        logger.info("%s: %s %s%s, %.1f s, %.3g %s/s%s", self.desc, count, self.unit, pct,
                    elapsed, rate, self.unit, extra)
        self._last_time, self._last_n = now, self.n
