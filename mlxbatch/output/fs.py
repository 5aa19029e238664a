"""Files in an output folder: opened never through a link, made durable, replaced atomically, locked.

Owns: the file rules every writer and reader of an output folder follows (O_NOFOLLOW, fsync
or macOS's F_FULLFSYNC, write-temp-then-rename, the folder's flock) and the message for an I/O
failure. Does not own: what the files hold (output/journal.py, output/checkpoint.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from mlxbatch.errors import OutputError, ResumeError

LOCK = "lock"
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symbolic link at `path` (a link's target is never ours to write)."""
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symbolic link; mlxbatch never writes through links in its "
                              "output folder (remove it, or use another folder)") from None
        raise


def open_append(path: Path):
    return os.fdopen(open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    with open_read(path) as f:
        return f.read() if limit is None else f.read(limit)


def open_read(path: Path):
    return os.fdopen(open_nofollow(path, os.O_RDONLY), "rb")


def size(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def truncate(path: Path, size: int) -> None:
    fd = open_nofollow(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def fsync(fd: int) -> None:
    """fsync, or F_FULLFSYNC on macOS where plain fsync stops at the drive cache."""
    if hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def append(handle, blob: bytes) -> None:
    """Write, flush and fsync: one durable append (a seam the fault-injection tests patch)."""
    handle.write(blob)
    handle.flush()
    fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def create_temp(path: Path):
    """A fresh temporary next to `path`, created exclusively (a stale one, or a link, is removed first)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # unlink removes a link itself, never its target
    return tmp, os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb")


def publish(tmp: Path, path: Path, handle) -> None:
    """fsync a temporary made by `create_temp` and rename it over `path` (a link there is replaced, not followed)."""
    handle.flush()
    fsync(handle.fileno())
    handle.close()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    tmp, f = create_temp(path)
    try:
        f.write(data)
        publish(tmp, path, f)
    finally:
        f.close()


def io_error(what: str, exc: OSError) -> OutputError:
    hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
    return OutputError(f"{what} failed: {exc.strerror or exc}{hint}. Results committed so far are safe; "
                       "rerun the same command to resume once the problem is fixed.")


# ------------------------------------------------------------ the folder lock
def lock(folder: Path) -> int:
    """An exclusive flock on folder/lock, held until the process ends (the kernel drops it, even after kill -9)."""
    fd = open_nofollow(folder / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ResumeError(f"{folder} is in use by another mlxbatch run (pid {holder}); wait for it to "
                          "finish or stop it, or choose another --output folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message above; the flock is the lock
    return fd


def lock_holder(folder: Path) -> int | None:
    """The pid of the run holding `folder`, or None when it is free (`status` uses this)."""
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
