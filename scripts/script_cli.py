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
Anything else is a bug and keeps its traceback. Standard library only.
"""

from __future__ import annotations

import argparse
import errno
import functools
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_BAD_INPUT = 2

# OSErrors that describe the user's files or disk, not a bug in the code
_ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
    errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG,
})


class InputError(ValueError):
    """Bad input a script reports in one line (an argument, a file, the device)."""


class ScriptParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are `InputError`s (one ``error:`` line
    through `script_main`, instead of argparse's usage block)."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message} (see --help)")


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
    else:
        return None
    return " ".join(text.split()) or type(err).__name__


def script_main(main: Callable[..., int | None] | None = None, *,
                known: tuple[type[BaseException], ...] = ()) -> Callable:
    """Wrap a script's ``main(argv)``: known errors (`error_line`, plus the types in
    ``known``) become one ``error:`` line on stderr and the return value
    `EXIT_BAD_INPUT`; unexpected ones propagate with their traceback.

    ``@script_main`` or ``@script_main(known=(RuntimeError,))``."""

    def decorate(fn: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs) -> int:
            try:
                return int(fn(*args, **kwargs) or 0)
            except Exception as err:
                line = error_line(err)
                if line is None and isinstance(err, known):
                    line = " ".join(str(err).split()) or type(err).__name__
                if line is None:
                    raise
                print(f"error: {line}", file=sys.stderr)
                return EXIT_BAD_INPUT

        return wrapper

    return decorate if main is None else decorate(main)
