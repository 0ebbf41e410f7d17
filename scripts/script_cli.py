"""How every script fails: bad input is one ``error:`` line and exit status 2 (the scripts' shared
error path; it prints, so it lives in scripts/, not in a package).

    @script_main
    def main(argv: list[str] | None = None) -> int:
        args = ScriptParser(description=...).parse_args(argv)
        ...  # validate everything, then write

Known errors are the library's "bad input" exceptions: ``ValueError`` (and its
subclasses `InputError`, ``DatasetError``, ``CheckpointError``, `RunLocked`), a path that
exists or is missing where it should not be, and the environment refusing a write (no
space, read-only, no permission). They are printed as ``error: <message>`` on one line.
Anything else is a bug and keeps its traceback. A full disk is such a known error whichever
library met it (an ``OSError`` ENOSPC, or a library's own exception saying "No space left
on device", e.g. safetensors' ``SafetensorError``).

Signals: SIGINT (Ctrl-C) and SIGTERM (what ``timeout``, schedulers and container runtimes
send) raise `Interrupted` in the main thread while the script runs, so ``with`` blocks and
``finally`` clauses clean up (a `RunLock` is released, temporary files removed, Ray tasks
cancelled and a local Ray stopped); the script then prints one line on stderr,
``interrupted: <script> stopped by SIG...; continue with: <command>``, and exits with
128 + the signal number, the shell's convention: 130 for SIGINT, 143 for SIGTERM. The
command is the same command line, with ``--resume`` added (and ``--overwrite`` dropped)
for a script that has that option. A second signal while cleaning up is ignored; ``kill
-9`` stops at once (every write is atomic, and the next run takes over the lock).
Standard library only.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

EXIT_BAD_INPUT = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESUME_FLAG, OVERWRITE_FLAG = "--resume", "--overwrite"
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"

# OSErrors that describe the user's files or disk, not a bug in the code
_ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
    errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG,
})


class InputError(ValueError):
    """Bad input a script reports in one line (an argument, a file, the device)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a script ran (a ``KeyboardInterrupt``, so code that
    handles Ctrl-C handles both)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_script_options: set[str] = set()  # the options of the script running (`ScriptParser`)


class ScriptParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are `InputError`s (one ``error:`` line
    through `script_main`, instead of argparse's usage block)."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message} (see --help)")

    def parse_known_args(self, args=None, namespace=None):
        # remembered for the interrupted line: does this script have --resume?
        _script_options.update(self._option_string_actions)
        return super().parse_known_args(args, namespace)


def error_line(err: BaseException) -> str | None:
    """The one-line message of a known error, or None for an unexpected one."""
    if isinstance(err, (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError,
                        IsADirectoryError, PermissionError)):
        text = str(err)
        if isinstance(err, OSError) and err.strerror:  # "[Errno 28] ..." -> "path: reason"
            where = err.filename if err.filename is not None else ""
            text = f"{where}: {err.strerror}" if where else err.strerror
    elif isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
        text = f"{err.filename}: {err.strerror}" if err.filename else str(err.strerror or err)
    elif (full := _no_space(err)) is not None:
        if full is not err:  # a wrapper of the full-disk error: say that one
            return error_line(full)
        text = str(err)
    else:
        return None
    return " ".join(text.split()) or type(err).__name__


def _no_space(err: BaseException) -> BaseException | None:
    """``err``, or the exception it was raised from, that reports a full disk, whatever
    library raised it (safetensors' ``SafetensorError`` carries only a message)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if getattr(cur, "errno", None) == errno.ENOSPC or NO_SPACE in str(cur):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


@contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """While the block runs (in the main thread), SIGINT and SIGTERM raise `Interrupted`;
    yields a list that receives the signal. The previous handlers are restored after."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    pid = os.getpid()

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != pid:  # a forked child inherited this handler: act as the default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if received:  # already stopping: let the cleanup finish
            return
        received.append(signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def continue_command(script: str, argv: Sequence[str]) -> str:
    """The command line that continues an interrupted run of ``script`` with ``argv``."""
    args = list(argv)
    if RESUME_FLAG in _script_options:  # the same run, not a new one
        args = [a for a in args if a != OVERWRITE_FLAG]
        if RESUME_FLAG not in args:
            args.append(RESUME_FLAG)
    return shlex.join(["python", script, *args])


def interrupted_line(signum: int, script: str, argv: Sequence[str]) -> str:
    """The one line an interrupted script prints."""
    return (f"interrupted: {os.path.basename(script)} stopped by "
            f"{signal.Signals(signum).name}; continue with: {continue_command(script, argv)}")


def script_main(main: Callable[..., int | None] | None = None, *,
                known: tuple[type[BaseException], ...] = ()) -> Callable:
    """Wrap a script's ``main(argv)``: known errors (`error_line`, plus the types in
    ``known``) become one ``error:`` line on stderr and the return value
    `EXIT_BAD_INPUT`; unexpected ones propagate with their traceback. SIGINT and SIGTERM
    stop it cleanly (the module docstring): one ``interrupted:`` line, 130 or 143.

    ``@script_main`` or ``@script_main(known=(RuntimeError,))``."""

    def decorate(fn: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs) -> int:
            _script_options.clear()
            argv = args[0] if args and args[0] is not None else kwargs.get("argv")
            with stop_on_signals() as received:
                try:
                    return int(fn(*args, **kwargs) or 0)
                except KeyboardInterrupt as err:  # also raised by Ray for our `Interrupted`
                    signum = getattr(err, "signum", received[0] if received else signal.SIGINT)
                    script = sys.modules[fn.__module__].__file__ or sys.argv[0]
                    argv = sys.argv[1:] if argv is None else argv
                    print(interrupted_line(signum, script, argv), file=sys.stderr)
                    return 128 + signum
                except Exception as err:
                    return _report(err, known)

        return wrapper

    return decorate if main is None else decorate(main)


def _report(err: Exception, known: tuple[type[BaseException], ...]) -> int:
    """Print a known error's line and return `EXIT_BAD_INPUT`; re-raise an unexpected one."""
    line = error_line(err)
    if line is None and isinstance(err, known):
        line = " ".join(str(err).split()) or type(err).__name__
    if line is None:
        raise err
    print(f"error: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT
