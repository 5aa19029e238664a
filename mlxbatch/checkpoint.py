"""The output folder's commit protocol: durable, resumable, never duplicated.

Owns: results.jsonl / errors.jsonl (append-only), the journal `done.idx` and
the manifest. A row is committed when its record bytes are fsynced and then a
journal entry (row index, file, end offset) is fsynced after them. Recovery
keeps the journal entries whose records are wholly on disk and parse,
truncates every file back to them (dropping torn or garbage tails) and marks
those rows done. Does not own: what a record looks like (sink.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
import zlib
from pathlib import Path

import orjson

from .errors import OutputError, ResumeError

FILES = ("results.jsonl", "errors.jsonl")
RESULTS, ERRORS = 0, 1
JOURNAL = "done.idx"
MANIFEST = "manifest.json"
STATE = "checkpoint.json"
MANIFEST_FORMAT = "mlxbatch-manifest v1"
_ENTRY = struct.Struct("<QQI")  # row index, file id << 62 | end offset, crc32 of both
_OFFSET_MASK = (1 << 62) - 1


def _crc(row: int, packed: int) -> int:
    return zlib.crc32(struct.pack("<QQ", row, packed))


def _until_bad_crc(entries: list) -> list:
    """Entries before the first one whose checksum fails (junk after a crash)."""
    out = []
    for row, packed, crc in entries:
        if crc != _crc(row, packed):
            break
        out.append((row, packed))
    return out


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


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _io_error(what: str, exc: OSError) -> OutputError:
    hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
    return OutputError(f"{what} failed: {exc.strerror or exc}{hint}. Results committed so far are safe; "
                       "rerun the same command to resume once the problem is fixed.")


class Checkpoint:
    """An open output folder: which rows are done, and buffered records to commit."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._done = bytearray()
        self._handles: list = []
        self._journal = None
        self._pending: list[tuple[int, int, bytes]] = []  # (row, file id, record bytes)
        self._ends = [0, 0]
        self.num_done = 0
        self.num_errors = 0
        self.last_commit = time.monotonic()

    # ------------------------------------------------------------ opening
    @classmethod
    def open(cls, folder: Path, manifest: dict, *, restart: bool = False) -> "Checkpoint":
        folder = Path(folder)
        if restart and folder.exists():
            _clear(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _check_manifest(folder, manifest)
            cp = cls(folder)
            cp._recover()
            cp._open_handles()
        except OSError as exc:
            raise _io_error(f"opening output folder {folder}", exc) from exc
        return cp

    def _recover(self) -> None:
        journal = self.folder / JOURNAL
        raw = journal.read_bytes() if journal.exists() else b""
        sizes = [(self.folder / f).stat().st_size if (self.folder / f).exists() else 0 for f in FILES]
        entries = [_ENTRY.unpack_from(raw, i) for i in range(0, len(raw) - len(raw) % _ENTRY.size, _ENTRY.size)]
        entries = _until_bad_crc(entries)
        kept = self._valid_prefix(entries, sizes)
        for fid, name in enumerate(FILES):
            path = self.folder / name
            if path.exists() and sizes[fid] != self._ends[fid]:
                os.truncate(path, self._ends[fid])  # drop torn or uncommitted tails
        if len(raw) != len(kept) * _ENTRY.size:
            os.truncate(journal, len(kept) * _ENTRY.size)
        for row, packed in kept:
            self._mark(row)
            self.num_errors += (packed >> 62) == ERRORS

    def _valid_prefix(self, entries: list, sizes: list) -> list:
        """Entries in order while each record lies wholly inside its file; last ones parse."""
        kept, ends = [], [0, 0]
        for row, packed in entries:
            fid, end = packed >> 62, packed & _OFFSET_MASK
            if fid > 1 or end > sizes[fid] or end < ends[fid]:
                break
            kept.append((row, packed))
            ends[fid] = end
        while kept and not self._tail_parses(kept):
            kept.pop()
        self._ends = [0, 0]
        for _, packed in kept:
            self._ends[packed >> 62] = packed & _OFFSET_MASK
        return kept

    def _tail_parses(self, kept: list) -> bool:
        """The newest record of each file is complete JSON lines (older ones were fsynced before it)."""
        for fid in (RESULTS, ERRORS):
            ends = [p & _OFFSET_MASK for _, p in kept if p >> 62 == fid]
            if not ends:
                continue
            start = ends[-2] if len(ends) > 1 else 0
            with open(self.folder / FILES[fid], "rb") as f:
                f.seek(start)
                blob = f.read(ends[-1] - start)
            if not blob.endswith(b"\n"):
                return False
            try:
                for line in blob.splitlines():
                    orjson.loads(line)
            except orjson.JSONDecodeError:
                return False
        return True

    def _open_handles(self) -> None:
        self._handles = [open(self.folder / f, "ab") for f in FILES]
        self._journal = open(self.folder / JOURNAL, "ab")
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

    # ------------------------------------------------------------ commit
    def commit(self, state: dict | None = None) -> None:
        """Make every queued record durable: data files first, then the journal; then `state`."""
        entries = bytearray()
        for row, fid, record in self._pending:
            self._ends[fid] += len(record)
            packed = (fid << 62) | self._ends[fid]
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
            raise _io_error(f"writing to {self.folder}", exc) from exc
        self._pending.clear()
        self.last_commit = time.monotonic()

    def close(self) -> None:
        for h in [*self._handles, self._journal]:
            if h is not None:
                try:
                    h.close()
                except OSError:
                    pass
        self._handles, self._journal = [], None


def _clear(folder: Path) -> None:
    for name in (*FILES, JOURNAL, MANIFEST, STATE, "results.parquet", "metrics.jsonl"):
        (folder / name).unlink(missing_ok=True)


def _check_manifest(folder: Path, manifest: dict) -> None:
    path = folder / MANIFEST
    if not path.exists():
        if any((folder / f).exists() for f in (*FILES, JOURNAL)):
            raise ResumeError(f"{folder} holds results but no manifest; use another folder or --restart")
        write_atomic(path, orjson.dumps({"format": MANIFEST_FORMAT, **manifest}, option=orjson.OPT_INDENT_2))
        return
    try:
        old = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ResumeError(f"{path} is damaged ({exc}); use --restart to start over") from exc
    if old.get("format") != MANIFEST_FORMAT:
        raise ResumeError(f"{path}: format {old.get('format')!r} is not {MANIFEST_FORMAT!r}; use --restart")
    changes = describe_changes(old, {"format": MANIFEST_FORMAT, **manifest})
    if changes:
        raise ResumeError(f"{folder} was started by a different job, so resuming would mix results:\n  "
                          + "\n  ".join(changes) + "\nrerun with --restart to start over (deletes its results), "
                          "or choose another --output folder")


def describe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_changes(a, b, f"{prefix}{key}.")
        elif a != b and key not in ("path",):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def read_state(folder: Path) -> dict:
    path = folder / STATE
    return orjson.loads(path.read_bytes()) if path.exists() else {}


def journal_rows(folder: Path) -> int:
    path = folder / JOURNAL
    return path.stat().st_size // _ENTRY.size if path.exists() else 0

