"""The open output folder and its commit protocol (durable, resumable, never duplicated).

A row is committed when its record bytes are fsynced and then its journal entry
(output/journal.py) is fsynced after them. On open, recovery keeps the rows the journal's
reader keeps, truncates every file back to them (dropping torn, garbage or damaged tails) and
marks those rows done. Owns: the Checkpoint (lock, recovery, queued records, commit),
checkpoint.json (counters for `status`) and the other file names of a folder. Nothing here
follows a symbolic link (output/fs.py). Does not own: what a record looks like (output/records.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson

from mlxbatch.errors import OutputError
from mlxbatch.output import fs, journal
from mlxbatch.output import manifest as manifest_file
from mlxbatch.output.journal import ERRORS, FILES, JOURNAL, RESULTS, RESULTS_FILE  # noqa: F401  (the folder's names)
from mlxbatch.output.manifest import MANIFEST

STATE = "checkpoint.json"
METRICS = "metrics.jsonl"
PARQUET = "results.parquet"
STATE_FORMAT = "mlxbatch-state v1"


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
            cp._lock_fd = fs.lock(folder)  # before --restart deletes anything
            if restart:
                _clear(folder)
            manifest_file.check(folder, manifest, data_files=(*FILES, JOURNAL))
            cp._recover()
            cp._open_handles()
        except OSError as exc:
            cp.close()
            raise fs.io_error(f"opening output folder {folder}", exc) from exc
        except BaseException:
            cp.close()
            raise
        return cp

    def _recover(self) -> None:
        view = journal.read(self.folder)
        self.num_dropped = view.num_dropped
        self._ends = list(view.ends)
        for row, fid in view.rows():
            self._mark(row)
            self.num_errors += fid == ERRORS
        for fid, name in enumerate(FILES):
            if view.sizes[fid] != view.ends[fid]:
                fs.truncate(self.folder / name, view.ends[fid])  # drop torn, uncommitted or damaged tails
        if view.num_bytes != view.num_rows * journal.ENTRY_SIZE:
            fs.truncate(self.folder / JOURNAL, view.num_rows * journal.ENTRY_SIZE)

    def _open_handles(self) -> None:
        self._handles = [fs.open_append(self.folder / f) for f in FILES]
        self._journal = fs.open_append(self.folder / JOURNAL)
        fs.fsync_dir(self.folder)

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
            entries += journal.encode(row, fid, ends[fid])
        try:
            for fid, handle in enumerate(self._handles):
                blob = b"".join(r for _, f, r in self._pending if f == fid) if entries else b""
                if blob:
                    fs.append(handle, blob)
            if entries:
                fs.append(self._journal, bytes(entries))
            if state is not None:
                fs.write_atomic(self.folder / STATE, orjson.dumps(state, option=orjson.OPT_INDENT_2))
        except OSError as exc:
            raise fs.io_error(f"writing to {self.folder}", exc) from exc
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


def _clear(folder: Path) -> None:
    """--restart: delete this job's files (never the lock: a waiting run must keep seeing it)."""
    for name in (*FILES, JOURNAL, MANIFEST, STATE, PARQUET, METRICS):
        (folder / name).unlink(missing_ok=True)


# ------------------------------------------------------------ state and read-only views
def make_state(*, rows_done: int, rows_total: int, errors: int, complete: bool, **counters) -> dict:
    """checkpoint.json: counters for `status` (the journal, not this file, says which rows are done)."""
    return {"format": STATE_FORMAT, "rows_done": rows_done, "rows_total": rows_total, "errors": errors,
            "complete": complete, **counters}


def read_state(folder: Path) -> dict:
    """The last state, or {} when missing or damaged (it holds counters only; a rerun rewrites it)."""
    path = folder / STATE
    try:
        state = orjson.loads(fs.read_bytes(path))
    except (OSError, OutputError, orjson.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) and state.get("format") == STATE_FORMAT else {}
