"""Atomic writes, versioned JSON files and JSON-safe values; standard library only.

Every file and directory eva-rl writes goes to a temporary sibling name
(``.<name>.tmp-<pid>-<hex>``), is fsynced and renamed into place, so an interrupted write
never leaves a complete-looking file. A write that fails for want of disk space raises
``OSError(ENOSPC)`` naming the file, whichever library wrote it (:func:`os_error_of`).
JSON metadata files carry ``"format"`` and a version key and are read back with
:func:`read_versioned_json`, which names the file and the problem in its error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

TMP_MARKER = ".tmp-"
OLD_MARKER = ".old-"


# ----------------------------------------------------------------------------- values


def to_json_safe(value: Any) -> Any:
    """``value`` as plain JSON types: what :func:`json.dumps` writes as standard JSON.

    Dataclasses become dicts (their ``to_dict()`` if they have one), mappings dicts with
    ``str`` keys, tuples lists, numpy/torch arrays and scalars (anything with ``tolist``)
    Python lists and numbers, and NaN or infinite floats ``None`` (JSON has no NaN).
    Other values are returned as they are, so an unknown type still fails in ``json.dumps``.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return to_json_safe(to_dict() if callable(to_dict) else dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- writing

LOW_SPACE_BYTES = 1 << 20
"""Free space below which a failed write is taken for a full disk (`os_error_of`)."""
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # safetensors: "... (os error 28)"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes this process may still write on the filesystem of ``path`` (its nearest
    existing ancestor), or None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return None
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def os_error_of(err: BaseException, path: str | os.PathLike) -> OSError | None:
    """The ``OSError`` (naming ``path``) behind a failed write of ``path``, or None.

    Libraries report a full disk in their own ways: safetensors as ``SafetensorError``
    "... No space left on device (os error 28)", ``torch.save`` as a ``RuntimeError``
    ("unexpected pos ...") and ``numpy.save`` as an ``OSError`` without errno ("N requested
    and M written"). Besides an ``OSError`` with an errno and the Rust error code, a
    filesystem with less than `LOW_SPACE_BYTES` left (checked while the partial file still
    exists) is taken to be the cause."""
    if isinstance(err, OSError) and err.errno is not None:
        if err.filename is None:  # OSError(errno, ...) is the errno's subclass
            return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))
        return err
    found = _RUST_OS_ERROR.search(str(err))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), str(path))
    free = free_bytes(Path(path).parent)
    if free is not None and free < LOW_SPACE_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def _raise_as_os_error(err: Exception, path: str | os.PathLike) -> None:
    """Raise `os_error_of` ``err`` (chained to it) if there is one; else return."""
    cause = os_error_of(err, path)
    if cause is not None and cause is not err:
        raise cause from err


def temp_sibling(path: str | os.PathLike, marker: str = TMP_MARKER) -> Path:
    """A fresh hidden name beside ``path``: ``.<name><marker><pid>-<hex>``."""
    path = Path(path)
    return path.with_name(f".{path.name}{marker}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (new or renamed files in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(file: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Open ``file`` for binary writing, call ``write(f)``, then flush and fsync it."""
    try:
        with open(file, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as err:
        _raise_as_os_error(err, file)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a sibling temporary name, fsync it, rename it to ``path``.

    The parent directory is created if needed; the temporary file is removed on error. A
    library's failure for want of space becomes ``OSError`` naming ``path`` (`os_error_of`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except Exception as err:
        _raise_as_os_error(err, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def replace_dir(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename directory ``new`` to ``dest``; an existing ``dest`` is swapped out, then removed.

    POSIX cannot swap two directories atomically: the old one is first renamed to an
    ``.old-`` sibling (and renamed back if the second rename fails), so a crash in between
    leaves it intact under that name.
    """
    new, dest = Path(new), Path(dest)
    old = None
    if dest.exists():
        old = temp_sibling(dest, OLD_MARKER)
        os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling name, then rename it to ``path``.

    ``with atomic_dir(path) as tmp:`` yields the new, empty temporary directory; when the
    block ends without error it is fsynced and renamed into place (an existing ``path`` is
    replaced only with ``overwrite``, see :func:`replace_dir`); on error it is deleted (a
    library's failure for want of space then becomes ``OSError`` naming ``path``).
    """
    path = Path(path)
    tmp = temp_sibling(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_dir(tmp)
        if overwrite:
            replace_dir(tmp, path)
        else:
            os.rename(tmp, path)
    except BaseException as err:
        cause = os_error_of(err, path) if isinstance(err, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is not None:
            cause = _named_after(cause, tmp, path)
        if cause is not None and cause is not err:
            raise cause from err
        raise


def _named_after(err: OSError, tmp: Path, path: Path) -> OSError:
    """A full-disk ``err`` about a file in the temporary directory ``tmp`` (removed by now)
    as one about that file's place in ``path``."""
    name = str(err.filename or "")
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and name.startswith(f"{tmp}{os.sep}"):
        return OSError(err.errno, err.strerror, str(path) + name[len(str(tmp)):])
    return err


def move_aside(path: str | os.PathLike) -> Path:
    """Rename ``path`` to ``<path>.old-<UTC time>`` (nothing is deleted); returns the new name."""
    path = Path(path)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    moved = path.with_name(f"{path.name}{OLD_MARKER}{stamp}")
    n = 1
    while moved.exists():
        n += 1
        moved = path.with_name(f"{path.name}{OLD_MARKER}{stamp}-{n}")
    os.rename(path, moved)
    return moved


def check_writable(directory: str | os.PathLike) -> None:
    """Raise ``OSError`` (naming the path) unless a file can be created in ``directory``.

    The directory (and its parents) must exist or be creatable; the check creates and
    removes a temporary file, which also catches read-only mounts and full quotas that
    permission bits do not show."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(directory))
    probe_dir = directory
    while not probe_dir.exists():  # the nearest existing ancestor must accept a new entry
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(probe_dir))
    probe = temp_sibling(probe_dir / "write-check")
    try:
        with open(probe, "xb") as f:
            f.write(b"x")
    except OSError as err:
        raise type(err)(err.errno, f"cannot write here ({err.strerror})", str(probe_dir)
                        ) from None
    finally:
        probe.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- checksums


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


CHECKSUM_KEY = "sha256"


def content_sha256(obj: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON object's content without its ``"sha256"`` key (canonical JSON:
    sorted keys, no spaces): what :func:`write_checked_json` stores under that key."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_checked_json(path: str | os.PathLike, obj: Mapping[str, Any],
                       indent: int | None = 2) -> Path:
    """Write the JSON object ``obj`` atomically with the SHA-256 of its content under
    ``"sha256"``, so :func:`read_checked_json` refuses a file edited or damaged since.
    Values are made JSON-safe first (:func:`to_json_safe`: NaN is written as null)."""
    obj = to_json_safe(dict(obj))
    obj[CHECKSUM_KEY] = content_sha256(obj)
    return write_json_atomic(path, obj, indent=indent)


def verify_checked_json(path: str | os.PathLike, obj: Mapping[str, Any], what: str,
                        error_cls: type[Exception] = ValueError) -> None:
    """Raise ``error_cls`` naming ``path`` unless ``obj`` (read from it) carries the right
    content checksum of :func:`write_checked_json`."""
    saved = obj.get(CHECKSUM_KEY)
    if saved is None:
        raise error_cls(f"{path}: {what} has no checksum (written by an older eva-rl, or by "
                        "hand); it cannot be trusted")
    try:
        ok = saved == content_sha256(obj)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise error_cls(f"{path}: {what} was modified after it was written (checksum differs)")


def read_checked_json(path: str | os.PathLike, fmt: str, version: int, what: str, *,
                      error_cls: type[Exception] = ValueError) -> dict[str, Any]:
    """:func:`read_versioned_json` plus the content checksum of :func:`write_checked_json`."""
    obj = read_versioned_json(path, fmt, version, what, error_cls=error_cls)
    verify_checked_json(path, obj, what, error_cls)
    return obj


# ----------------------------------------------------------------------------- reading


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; unreadable, empty, not JSON or not an object ->
    ``ValueError`` naming the file and ``what`` it should hold."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupt {what}, cannot read it ({err})") from None
    if not isinstance(obj, dict):
        kind = "null" if obj is None else type(obj).__name__
        raise ValueError(f"{path}: corrupt {what}: expected a JSON object, got {kind}")
    return obj


def read_versioned_json(
    path: str | os.PathLike,
    fmt: str,
    version: int,
    what: str,
    *,
    version_key: str = "version",
    error_cls: type[Exception] = ValueError,
) -> dict[str, Any]:
    """Read a JSON object whose ``"format"`` is ``fmt`` and ``version_key`` is ``version``.

    ``what`` names the file's role in messages (``"run config"``). A missing file, text
    that is not JSON, another format or another version raises ``error_cls`` (a
    ``ValueError`` subclass by default) naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise error_cls(f"{path}: no {what} (file is missing)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error_cls(f"{path}: corrupt {what}, cannot read it: not valid JSON ({err})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise error_cls(f"{path}: corrupt {what}, cannot read it: {err}") from err
    found = obj.get("format") if isinstance(obj, dict) else None
    if found != fmt:
        raise error_cls(f"{path}: not an eva-rl {what} (format {found!r}, expected {fmt!r})")
    if obj.get(version_key) != version:
        raise error_cls(
            f"{path}: {what} has unknown format version {obj.get(version_key)!r} "
            f"(this code reads version {version})"
        )
    return obj
