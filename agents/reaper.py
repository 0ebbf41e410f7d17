"""Kill what a process started once it dies, even by ``kill -9`` (Linux; standard library).

    reaper = Reaper.start()   # after ray.init: watches this process and its descendants
    ...
    reaper.stop()             # after ray.shutdown: ends the watch, kills nothing

A local Ray's GCS and raylet die with their driver (Ray sets PR_SET_PDEATHSIG on them),
but the raylet's own children do not: after the driver is killed, Ray's DashboardAgent
and RuntimeEnvAgent notice the raylet is gone within ~2 s, then wait up to 60 s for an
error report to the dead GCS before they exit (`ray._private.process_watcher`), and idle
workers linger for seconds. The reaper is a small child process that notes the driver's
descendants every `INTERVAL_S` (with their start times, so a reused pid is never hit) and
reads a pipe from the driver: end of file without the stop word means the driver died,
and every noted process that still runs is killed at once. Processes started less than
`INTERVAL_S` before the driver died may be missed (Ray's workers then exit on their own
within a few seconds).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

INTERVAL_S = 0.5
STOP = b"stop\n"


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, kernel start time) of ``pid`` from ``/proc``, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command's parentheses
    return int(fields[1]), fields[19]


def descendants(root: int) -> dict[int, str]:
    """Every living descendant of ``root``: pid -> start time."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append((int(entry.name), st[1]))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), ()):
            if pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def kill_all(known: dict[int, str]) -> int:
    """SIGKILL each noted process that still runs (same pid, same start time)."""
    killed = 0
    for pid, start in known.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def watch(driver: int, pipe: int) -> None:
    """Note ``driver``'s descendants until ``pipe`` ends; kill them unless told `STOP`."""
    me = os.getpid()
    known: dict[int, str] = {}
    got = b""
    while True:
        known.update({p: s for p, s in descendants(driver).items() if p != me})
        ready, _, _ = select.select([pipe], [], [], INTERVAL_S)
        if ready:
            data = os.read(pipe, 64)
            if not data:
                break
            got += data
    if got != STOP:
        kill_all(known)


class Reaper:
    """Handle of a running reaper (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    @classmethod
    def start(cls) -> Reaper | None:
        """Start a reaper for this process (None where there is no ``/proc``)."""
        if not Path("/proc/self/stat").exists():
            return None
        proc = subprocess.Popen([sys.executable, "-I", __file__, str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        return cls(proc)

    def stop(self) -> None:
        """End the watch without killing anything (the driver stopped its processes)."""
        try:
            self.proc.stdin.write(STOP)
            self.proc.stdin.close()
        except OSError:  # it died already
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    watch(int(sys.argv[1]), sys.stdin.fileno())
