"""Ownership of an output directory: one writer at a time, taken over after it died.

    with RunLock("runs/pretrain-small"):   # creates the directory if needed
        ...                                # this process alone writes there

The lock is the file ``DIR/.eva-rl.lock``: JSON with the holder's pid, host, process start
time and command. It is created complete (written to a temporary name, then hard-linked
into place, which fails if it exists), so a lock file is never half-written. A second
writer gets `RunLocked` naming the holder; the holder itself may take it again (nested:
the outer ``with`` releases it). A lock whose holder is gone (same host, and no
process with that pid and start time) is taken over with a warning. A lock held on
another host cannot be checked from here: it is refused unless ``force=True``
(``--force-unlock`` in the scripts), because a shared filesystem may really be in use there.
Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from eva_rl.io import move_aside, temp_sibling

logger = logging.getLogger(__name__)

LOCK_FILE = ".eva-rl.lock"


class RunLocked(ValueError):
    """The directory is being written by another process (or its lock file is unusable)."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux ``/proc``), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, after the command's parentheses


def _alive(pid: int, start_time: str | None) -> bool:
    """Whether the process that wrote a lock still runs (pid reuse detected via /proc)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _start_time(pid)
    return start_time is None or now is None or now == start_time


def owner_record() -> dict[str, Any]:
    """What this process writes into a lock file."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start_time": _start_time(pid),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}


def is_empty_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding nothing but (maybe) a lock file."""
    return all(p.name == LOCK_FILE for p in Path(path).iterdir())


class RunLock:
    """Exclusive ownership of ``directory`` while the ``with`` block (or `acquire` ..
    `release`) runs; see the module docstring. ``directory`` is created if missing, and
    removed again on release if this lock created it and nothing was written in it."""

    def __init__(self, directory: str | os.PathLike, force: bool = False) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.force = force
        self.held = False
        self._created_dir = False

    def acquire(self) -> RunLock:
        """Take the lock; `RunLocked` if another live process holds it."""
        d = self.directory
        if d.exists() and not d.is_dir():
            raise FileExistsError(f"{d} exists and is not a directory")
        if not d.exists():
            d.mkdir(parents=True)
            self._created_dir = True
        record = owner_record()
        tmp = temp_sibling(self.path)
        try:
            tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    if self._held_by_this_process():
                        return self  # nested: the outer holder releases it
                    self._break_stale()
            raise RunLocked(f"{d}: could not take the lock {self.path}; another process keeps "
                            "taking it")
        except BaseException:
            self._remove_created_dir()
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def _held_by_this_process(self) -> bool:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return (isinstance(holder, dict) and holder.get("pid") == os.getpid()
                and holder.get("host") == socket.gethostname()
                and holder.get("start_time") == _start_time(os.getpid()))

    def _break_stale(self) -> None:
        """Remove the existing lock if its holder is dead (or ``force``); else refuse."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError) as err:
            if not self.force:
                raise RunLocked(f"{self.path}: unreadable lock file ({err}); remove it if no "
                                "other process writes here, or pass --force-unlock") from None
            holder, pid, host = {}, -1, "?"
        who = f"pid {pid} on {host} since {holder.get('since', '?')}"
        if self.force:
            logger.warning("%s: breaking the lock of %s (forced)", self.path, who)
        elif host == socket.gethostname():
            if _alive(pid, holder.get("start_time")):
                raise RunLocked(f"{self.directory} is in use by {who} "
                                f"({holder.get('command', '')!s}); lock file {self.path}")
            logger.warning("%s: taking over the lock of %s (that process is gone)",
                           self.path, who)
        else:
            raise RunLocked(
                f"{self.directory} is locked by {who}, another host, which this one cannot "
                "check; if that run is dead pass --force-unlock (lock file "
                f"{self.path})")
        stale = temp_sibling(self.path, ".stale-")
        try:  # rename first: only one of several racing processes removes it
            os.rename(self.path, stale)
        except FileNotFoundError:
            return
        stale.unlink(missing_ok=True)

    def release(self) -> None:
        """Give the lock up (only if this process still holds it)."""
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            holder = {}
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        if self._created_dir and self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()
        self._created_dir = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def replace_dir(directory: str | os.PathLike) -> Path:
    """Move ``directory`` aside to ``<directory>.old-<UTC time>`` (nothing is deleted) and
    make it again, empty but for this process's lock on it (`carry_lock`); returns where
    the old contents went."""
    directory = Path(directory)
    moved = move_aside(directory)
    directory.mkdir(parents=True)
    carry_lock(moved, directory)
    logger.warning("moved %s aside to %s", directory, moved)
    return moved


def carry_lock(old_dir: str | os.PathLike, new_dir: str | os.PathLike) -> bool:
    """After a directory this process has locked was renamed to ``old_dir`` (moved aside)
    and ``new_dir`` created in its place, move the lock file back into ``new_dir`` so the
    `RunLock` keeps owning that name. Returns whether a lock of this process was moved."""
    src, dst = Path(old_dir) / LOCK_FILE, Path(new_dir) / LOCK_FILE
    try:
        holder = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if holder.get("pid") != os.getpid() or holder.get("host") != socket.gethostname():
        return False
    os.replace(src, dst)
    return True
