"""The output folder: its file names, its lock, and the commit protocol (durable, resumable, never duplicated).

Owns: every file name in an output folder, the state schema (checkpoint.json),
the folder lock, results.jsonl / errors.jsonl (append-only), the journal
`done.idx` and the manifest. A row is committed when its record bytes are
fsynced and then a journal entry (row index, file, end offset) is fsynced after
them. Recovery keeps the journal entries whose records are wholly on disk (end
on a newline, no NUL bytes before them, the newest ones parse), truncates every
file back to them (dropping torn, garbage or damaged tails) and marks those rows
done. Nothing here follows a symbolic link. Does not own: what a record looks
like (output/records.py).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import time
import zlib
from pathlib import Path

import orjson

from mlxbatch.errors import OutputError, ResumeError

RESULTS_FILE, ERRORS_FILE = "results.jsonl", "errors.jsonl"
FILES = (RESULTS_FILE, ERRORS_FILE)
RESULTS, ERRORS = 0, 1
JOURNAL = "done.idx"
MANIFEST = "manifest.json"
STATE = "checkpoint.json"
METRICS = "metrics.jsonl"
PARQUET = "results.parquet"
LOCK = "lock"
MANIFEST_FORMAT = "mlxbatch-manifest v1"
STATE_FORMAT = "mlxbatch-state v1"
_ENTRY = struct.Struct("<QQI")  # row index, file id << 62 | end offset, crc32 of both
_OFFSET_MASK = (1 << 62) - 1
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _crc(row: int, packed: int) -> int:
    return zlib.crc32(struct.pack("<QQ", row, packed))


def _journal_entries(raw: bytes) -> list[tuple[int, int]]:
    """(row, packed) entries before the first one whose checksum fails (junk after a crash)."""
    out = []
    for i in range(0, len(raw) - len(raw) % _ENTRY.size, _ENTRY.size):
        row, packed, crc = _ENTRY.unpack_from(raw, i)
        if crc != _crc(row, packed):
            break
        out.append((row, packed))
    return out


# ------------------------------------------------------------ files, never through a link
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
    with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as f:
        return f.read() if limit is None else f.read(limit)


def _size(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def _truncate(path: Path, size: int) -> None:
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
def _lock(folder: Path) -> int:
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


# ------------------------------------------------------------ the open folder
class Checkpoint:
    """An open, locked output folder: which rows are done, and buffered records to commit."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._done = bytearray()
        self._handles: list = []
        self._journal = None
        self._lock_fd: int | None = None
        self._pending: list[tuple[int, int, bytes]] = []  # (row, file id, record bytes)
        self._ends = [0, 0]
        self.num_done = 0
        self.num_errors = 0
        self.num_dropped = 0  # journal entries recovery could not keep (those rows run again)
        self.last_commit = time.monotonic()

    @classmethod
    def open(cls, folder: Path, manifest: dict, *, restart: bool = False) -> "Checkpoint":
        folder = Path(folder)
        cp = cls(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            cp._lock_fd = _lock(folder)  # before --restart deletes anything
            if restart:
                _clear(folder)
            _check_manifest(folder, manifest)
            cp._recover()
            cp._open_handles()
        except OSError as exc:
            cp.close()
            raise io_error(f"opening output folder {folder}", exc) from exc
        except BaseException:
            cp.close()
            raise
        return cp

    def _recover(self) -> None:
        journal = self.folder / JOURNAL
        raw = read_bytes(journal) if journal.exists() or journal.is_symlink() else b""
        entries = _journal_entries(raw)
        sizes = [_size(self.folder / f) for f in FILES]
        kept = _valid_entries(self.folder, entries, sizes)
        self.num_dropped = len(entries) - len(kept)
        self._ends = [0, 0]
        for row, packed in kept:
            self._ends[packed >> 62] = packed & _OFFSET_MASK
            self._mark(row)
            self.num_errors += (packed >> 62) == ERRORS
        for fid, name in enumerate(FILES):
            if sizes[fid] != self._ends[fid]:
                _truncate(self.folder / name, self._ends[fid])  # drop torn, uncommitted or damaged tails
        if len(raw) != len(kept) * _ENTRY.size:
            _truncate(journal, len(kept) * _ENTRY.size)

    def _open_handles(self) -> None:
        self._handles = [open_append(self.folder / f) for f in FILES]
        self._journal = open_append(self.folder / JOURNAL)
        fsync_dir(self.folder)

    # ------------------------------------------------------------ rows
    def _mark(self, row: int) -> None:
        byte = row >> 3
        if byte >= len(self._done):
            self._done.extend(bytes(max(byte + 1 - len(self._done), len(self._done))))
        if not self._done[byte] & (1 << (row & 7)):
            self._done[byte] |= 1 << (row & 7)
            self.num_done += 1

    def is_done(self, row: int) -> bool:
        byte = row >> 3
        return byte < len(self._done) and bool(self._done[byte] & (1 << (row & 7)))

    def add(self, row: int, fid: int, record: bytes) -> None:
        """Queue a row's record(s) (whole lines); durable at the next commit."""
        if self.is_done(row):
            raise AssertionError(f"row {row} written twice")  # a bug, never user input
        self._mark(row)
        self.num_errors += fid == ERRORS
        self._pending.append((row, fid, record))

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------ commit
    def commit(self, state: dict | None = None) -> None:
        """Make every queued record durable: data files first, then the journal; then `state`."""
        self._check_files()
        entries, ends = bytearray(), list(self._ends)
        for row, fid, record in self._pending:
            ends[fid] += len(record)
            packed = (fid << 62) | ends[fid]
            entries += _ENTRY.pack(row, packed, _crc(row, packed))
        try:
            for fid, handle in enumerate(self._handles):
                blob = b"".join(r for _, f, r in self._pending if f == fid) if entries else b""
                if blob:
                    append(handle, blob)
            if entries:
                append(self._journal, bytes(entries))
            if state is not None:
                write_atomic(self.folder / STATE, orjson.dumps(state, option=orjson.OPT_INDENT_2))
        except OSError as exc:
            raise io_error(f"writing to {self.folder}", exc) from exc
        self._ends = ends
        self._pending.clear()
        self.last_commit = time.monotonic()

    def _check_files(self) -> None:
        """The open files are still the folder's files (deleted or replaced mid-run would lose commits)."""
        names = [*FILES, JOURNAL]
        for name, handle in zip(names, [*self._handles, self._journal]):
            if handle is None:
                continue
            try:
                st = os.stat(self.folder / name, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            mine = os.fstat(handle.fileno())
            if st is None or (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
                raise OutputError(f"{self.folder / name} was deleted or replaced while this run was writing it; "
                                  "stopped so that no result goes missing. Rerun the same command: rows without "
                                  "a record on disk are generated again.")

    def close(self) -> None:
        for h in [*self._handles, self._journal]:
            if h is not None:
                try:
                    h.close()
                except OSError:
                    pass
        self._handles, self._journal = [], None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _valid_entries(folder: Path, entries: list, sizes: list) -> list:
    """The longest journal prefix whose records lie wholly on disk, intact.

    One forward pass (each record must end on a newline inside its file, after the
    previous one), then cut at the first NUL byte, then drop newest entries while
    a file's newest record does not parse.
    """
    maps = [_map(folder / f, s) for f, s in zip(FILES, sizes)]
    try:
        kept, ends = [], [0, 0]
        for row, packed in entries:
            fid, end = packed >> 62, packed & _OFFSET_MASK
            if fid > 1 or end <= ends[fid] or end > sizes[fid] or maps[fid][end - 1] != 0x0A:
                break
            kept.append((row, packed))
            ends[fid] = end
        for fid in (RESULTS, ERRORS):
            nul = maps[fid].find(b"\0", 0, ends[fid]) if maps[fid] else -1
            if nul >= 0:  # zeros where records should be (a lost page): keep only the records before it
                kept = kept[: next(i for i, (_, p) in enumerate(kept) if p >> 62 == fid and p & _OFFSET_MASK > nul)]
        return _drop_unparsable_tail(kept, maps)
    finally:
        for m in maps:
            if m:
                m.close()


def _map(path: Path, size: int):
    if size == 0:
        return None
    fd = open_nofollow(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def _drop_unparsable_tail(kept: list, maps: list) -> list:
    """Pop newest entries until each file's newest record is complete JSON lines (older ones were fsynced first)."""
    per_file = [[0], [0]]
    for _, packed in kept:
        per_file[packed >> 62].append(packed & _OFFSET_MASK)
    good = set()  # (file id, end) of records already parsed: each record is parsed at most once
    while kept:
        is_bad = False
        for fid, ends in enumerate(per_file):
            if len(ends) > 1 and (fid, ends[-1]) not in good:
                if not _parses(maps[fid][ends[-2]:ends[-1]]):
                    is_bad = True
                else:
                    good.add((fid, ends[-1]))
        if not is_bad:
            break
        _, packed = kept.pop()
        per_file[packed >> 62].pop()
    return kept


def _parses(blob: bytes) -> bool:
    try:
        for line in blob.splitlines():
            orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return blob.endswith(b"\n")


def _clear(folder: Path) -> None:
    """--restart: delete this job's files (never the lock: a waiting run must keep seeing it)."""
    for name in (*FILES, JOURNAL, MANIFEST, STATE, PARQUET, METRICS):
        (folder / name).unlink(missing_ok=True)


def _check_manifest(folder: Path, manifest: dict) -> None:
    path = folder / MANIFEST
    if not os.path.lexists(path):
        if any(os.path.lexists(folder / f) for f in (*FILES, JOURNAL)):
            raise ResumeError(f"{folder} holds results but no manifest; use another folder or --restart")
        write_atomic(path, orjson.dumps({"format": MANIFEST_FORMAT, **manifest}, option=orjson.OPT_INDENT_2))
        return
    old = read_manifest(folder)
    if old.get("format") != MANIFEST_FORMAT:
        raise ResumeError(f"{path}: format {old.get('format')!r} is not {MANIFEST_FORMAT!r}; use --restart")
    changes = describe_changes(old, {"format": MANIFEST_FORMAT, **manifest})
    if changes:
        raise ResumeError(f"{folder} was started by a different job, so resuming would mix results:\n  "
                          + "\n  ".join(changes) + "\nrerun with --restart to start over (deletes its results), "
                          "or choose another --output folder")


def read_manifest(folder: Path) -> dict:
    """The manifest as a dict, or a ResumeError that says how to get out (damaged, not an object, a link)."""
    path = folder / MANIFEST
    try:
        old = orjson.loads(read_bytes(path))
    except orjson.JSONDecodeError as exc:
        raise ResumeError(f"{path} is damaged ({exc}); use --restart to start over") from exc
    if not isinstance(old, dict) or not isinstance(old.get("input"), dict):
        raise ResumeError(f"{path} is damaged (not a manifest object); use --restart to start over")
    return old


def describe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_changes(a, b, f"{prefix}{key}.")
        elif a != b and key not in ("path",):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ------------------------------------------------------------ state and read-only views
def make_state(*, rows_done: int, rows_total: int, errors: int, complete: bool, **counters) -> dict:
    """checkpoint.json: counters for `status` (the journal, not this file, says which rows are done)."""
    return {"format": STATE_FORMAT, "rows_done": rows_done, "rows_total": rows_total, "errors": errors,
            "complete": complete, **counters}


def read_state(folder: Path) -> dict:
    """The last state, or {} when missing or damaged (it holds counters only; a rerun rewrites it)."""
    path = folder / STATE
    try:
        state = orjson.loads(read_bytes(path))
    except (OSError, OutputError, orjson.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) and state.get("format") == STATE_FORMAT else {}


def journal_rows(folder: Path) -> int:
    path = folder / JOURNAL
    return len(_journal_entries(read_bytes(path))) if path.is_file() and not path.is_symlink() else 0


def committed_end(folder: Path, fid: int = RESULTS) -> int:
    """Bytes of FILES[fid] covered by the journal: readers stop there (a running job's tail is not committed)."""
    path = folder / JOURNAL
    raw = read_bytes(path) if path.is_file() and not path.is_symlink() else b""
    end = 0
    for _, packed in _journal_entries(raw):
        if packed >> 62 == fid:
            end = max(end, packed & _OFFSET_MASK)
    return min(end, _size(folder / FILES[fid]))


def committed_lines(folder: Path, fid: int = RESULTS):
    """Yield the committed record lines of FILES[fid] (bytes, newline stripped), streaming."""
    end = committed_end(folder, fid)
    if end == 0:
        return
    with os.fdopen(open_nofollow(folder / FILES[fid], os.O_RDONLY), "rb") as f:
        left = end
        for line in f:
            line = line[:left]
            left -= len(line)
            if line.strip() and line.endswith(b"\n"):
                yield line.rstrip(b"\n")
            if left <= 0:
                return
