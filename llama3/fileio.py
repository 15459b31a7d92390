"""Durable file writes, output-path checks, locks and content hashes (no torch: the data pipeline
uses them too).

Every artefact a command writes goes through :func:`staged_file` (or :func:`staged_directory`):
it is written under a temporary name beside its final one and renamed once complete, so readers
see the old content or the new one, never a part; on any failure the temporary file is removed
and a write error (a full disk, a read-only folder) becomes one :class:`UsageError` line naming the
file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llama3.errors import UsageError

STAGING_SUFFIX = ".tmp"  # a file or directory under this suffix is incomplete

_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: str | os.PathLike, err: OSError, what: str = "") -> UsageError:
    """The one-line error for a failed write of ``path``, saying what to do about it."""
    if err.errno in _FULL:
        hint = "free some disk space there, or write elsewhere"
    elif err.errno is None:  # a library's short write
        hint = "the disk may be full: free some space there, or write elsewhere"
    elif err.errno in _DENIED:
        hint = "choose a writable location"
    elif err.errno == errno.EISDIR:
        hint = "it is a directory: give a file name"
    else:
        hint = "check the path"
    return UsageError(
        f"cannot write {what or ''}{path}: {err.strerror or err} ({hint}); nothing "
        "was left half-written"
    )


def remove(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def staging_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + STAGING_SUFFIX)


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, path: Path, what: str) -> Iterator[None]:
    """Remove ``tmp`` if the block raises; an OSError becomes :func:`write_error` for ``path``."""
    try:
        yield
    except BaseException as err:
        remove(tmp)
        if isinstance(err, OSError):
            raise write_error(path, err, what) from err
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, *companions: str, what: str = "") -> Iterator[Path]:
    """Yields where to write ``path``: a file of the same name in a temporary directory beside it.
    When the block ends normally the file is renamed into place; when it raises, the temporary
    directory is removed (an OSError becomes :func:`write_error`).

    ``companions`` are names of files written beside it that it refers to by name (an ONNX graph's
    external weights): they keep their names, are moved into place before ``path``, and those the
    new file no longer has are removed after it.
    """
    path = Path(path)
    tmp = staging_path(path)
    with _removed_on_failure(tmp, path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove(tmp)  # left over from an interrupted run
        tmp.mkdir()
        yield tmp / path.name
        written = [name for name in companions if (tmp / name).exists()]
        for name in (*written, path.name):  # the file that names the others last
            _fsync_file(tmp / name)
            os.replace(tmp / name, path.parent / name)
        for name in set(companions) - set(written):
            (path.parent / name).unlink(missing_ok=True)
        fsync_dir(path.parent)
        tmp.rmdir()


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, *, what: str = "") -> Iterator[Path]:
    """:func:`staged_file` for a directory: ``path`` must not exist or be empty; the temporary
    directory is renamed to it once complete, or removed on failure.

    The temporary directory (``NAME.XXXXXXXX.tmp`` beside ``path``) is this call's own, so two
    processes writing the same ``path`` never touch each other's files and a file of the user's
    named ``NAME.tmp`` is left alone; the first to finish publishes, the other is refused.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}{STAGING_SUFFIX}")
    with _removed_on_failure(tmp, path, what):
        tmp.mkdir(parents=True)
        yield tmp
        for file in tmp.rglob("*"):  # durable before the rename commits them
            if file.is_file():
                _fsync_file(file)
        _publish_directory(tmp, path, what)
        fsync_dir(path.parent)


def _publish_directory(tmp: Path, path: Path, what: str) -> None:
    """Rename ``tmp`` to ``path`` (absent or an empty directory) in one step; UsageError when
    another process filled ``path`` meanwhile."""
    try:
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise UsageError(
            f"{what}{path} was written by another process meanwhile; it is kept and "
            "nothing of this run was: choose a new directory"
        ) from err


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a part."""
    with staged_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Atomically write ``payload`` as indented JSON, creating parent directories."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
    return path


# ------------------------------------------------------------------------------ output paths


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a file a command may write: not a directory, in a directory (or where one can
    be made). Commands check their outputs first, so nothing is computed for a path that fails."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory: give a file name")
    _check_parent(path.parent, flag, path)
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a directory a command may write into: made if missing, and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a directory: give a directory")
    _check_parent(path, flag, path)
    return path


def check_new_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a directory a command writes whole (:func:`staged_directory`): absent or
    empty, in a directory where it can be made."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(
            f"{flag} {path} already exists and is not an empty directory; choose a new one"
        )
    _check_parent(path.parent, flag, path)
    return path


def _check_parent(directory: Path, flag: str, path: Path) -> None:
    """Make ``directory`` if missing and check that a file can be created in it."""
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    probe = directory / f".probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"{flag} {path}: cannot write in {directory} ({err.strerror or err}): "
            "choose a writable location"
        ) from err


# ------------------------------------------------------------------------------------ locks


@contextlib.contextmanager
def locked(path: str | os.PathLike, *, wait: bool = True) -> Iterator[IO[str] | None]:
    """An exclusive lock on the file ``path`` (created if missing) while the block runs.

    The operating system releases it when the holder exits, however it exits, so a lock left by a
    killed process never blocks anyone. ``wait=False``: raise :class:`BlockingIOError` at once if
    another process holds it. Yields the open lock file (None where ``fcntl`` does not exist).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: one process at a time is the user's job
        yield None
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
