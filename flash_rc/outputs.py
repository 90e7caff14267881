"""Every file and directory flash_rc writes is checked and written here (stdlib only).

Why one module: a run that fails on its output should fail before the work starts, name the path and say what is
wrong in words a user can act on ("disk full", not the "No such file or directory" of a failed clean-up), and never
leave a half-written file that a later run would read as complete. So:

* :func:`prepare_output_file` / :func:`prepare_output_dir` resolve a path, create the missing parent directories and
  refuse -- with :class:`~flash_rc.errors.OutputError` (exit status 3) -- a file path that is a directory, a path
  below a regular file, or a directory that is not writable;
* :func:`atomic_write` writes into a temporary file beside the target and renames it into place after an fsync, so
  the target is either the old file or the complete new one; the temporary file is removed on any exception
  (including the ``SystemExit`` the CLI raises on SIGTERM) and an ``OSError`` becomes an ``OutputError``;
* a write killed by SIGKILL cannot clean up, so its temporary file stays; temporary names carry the host and the pid
  of their writer (``.<target>.flash_rc-tmp-<host>-<pid>-<random>.tmp``), and the next :func:`atomic_write` into that
  directory removes those of this host whose writer no longer runs (:func:`sweep_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from flash_rc.errors import OutputError

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
_TEMP_NAME = re.compile(r"^\..+\.flash_rc-tmp-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]+\.tmp$")
# Errors a write into an open file can raise (and a read cannot): an OSError with one of these from inside an
# atomic_write block is about the output; any other OSError there (reading an input, say) passes through unchanged.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_REASONS = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a parent path is not a directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large for this file system",
    errno.EIO: "input/output error (failing disk or network file system)",
}


def describe_os_error(error: OSError) -> str:
    """The reason for an OSError in words: "disk full", "permission denied", ... (the OS's text when not listed)."""
    return _REASONS.get(error.errno) or (error.strerror or str(error)).lower()


def output_error(path: str | os.PathLike, error: OSError) -> OutputError:
    """An OutputError naming ``path`` and the reason for ``error``; ``errno`` is kept for callers that branch on it."""
    exc = OutputError(f"cannot write {path}: {describe_os_error(error)}")
    exc.errno = error.errno
    return exc


def _refuse(path: Path, reason: str) -> OutputError:
    return OutputError(f"cannot write {path}: {reason}")


def _ensure_dir(directory: Path) -> None:
    """Create ``directory`` and its parents; OutputError naming the culprit if a component is not a directory."""
    for ancestor in (directory, *directory.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise _refuse(directory, f"{ancestor} is a file, not a directory")
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(directory, error) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
        raise _refuse(directory, "read-only file system" if read_only else "permission denied")


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """``path`` resolved and created (with its parents), after checking it can hold new files; OutputError if not."""
    directory = Path(path).expanduser().resolve()
    _ensure_dir(directory)
    return directory


def prepare_output_file(path: str | os.PathLike) -> Path:
    """``path`` resolved, its directory created and checked; OutputError if the file could not be written there."""
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise _refuse(target, "it is a directory")
    _ensure_dir(target.parent)
    return target


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def sweep_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files in ``directory`` left by killed writers on this host; returns what was removed."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            match = _TEMP_NAME.match(entry.name)
            if match is None or match["host"] != _HOST or int(match["pid"]) <= 0 or _pid_running(int(match["pid"])):
                continue
            with contextlib.suppress(FileNotFoundError):  # another sweeper was first
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _open_temp(target: Path, mode: str) -> tuple[Path, IO]:
    """A new temporary file beside ``target``, created with the permissions (umask) a plain ``open`` would give."""
    while True:
        temp = target.with_name(f".{target.name}.flash_rc-tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as error:
            raise output_error(target, error) from error
        return temp, os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; some file systems cannot open or fsync a directory, which only loses durability."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(handle: IO, temp: Path, target: Path) -> None:
    """Flush, fsync and close ``handle``, then rename ``temp`` over ``target``; any OSError becomes OutputError."""
    try:
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(temp, target)
    except OSError as error:
        raise output_error(target, error) from error
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file object (``mode`` "wb", or "w" for UTF-8 text) whose content replaces ``path`` only on success.

    The target is checked first (:func:`prepare_output_file`) and stale temporary files of killed writers in its
    directory are swept. On success the data is fsynced and renamed over the target; on any exception the temporary
    file is removed and the target is untouched. OSErrors of the write itself (disk full, quota, read-only file
    system) become :class:`OutputError`; other exceptions of the block pass through unchanged.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    target = prepare_output_file(path)
    sweep_stale_temps(target.parent)
    temp, handle = _open_temp(target, mode)
    try:
        try:
            yield handle
        except OSError as error:  # a write raised it, or the block did something else (read an input, say)
            if isinstance(error, OutputError) or error.errno not in _WRITE_ERRNOS:
                raise
            raise output_error(target, error) from error
        _commit(handle, temp, target)
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes what is buffered, which fails again on a full disk
            handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
