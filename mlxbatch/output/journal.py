"""The journal `done.idx`: which rows are committed, and where their records end.

Owns: the data files' names and ids, the entry format (row index, file id << 62 | end offset,
crc32 of both), and the one reader, `read(folder)`, that decodes the journal and checks it
against the data files. Resume (which then truncates the files to it), `status`, `export` and
Parquet all use that view, so they agree on which rows are committed even in a damaged folder.
An entry is kept when its checksum holds, its record ends on a newline inside its file after the
previous one, no NUL byte lies before it, and each file's newest records parse. Does not own:
writing records (output/checkpoint.py), the file rules (output/fs.py).
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

import orjson

from mlxbatch.output import fs

RESULTS_FILE, ERRORS_FILE = "results.jsonl", "errors.jsonl"
FILES = (RESULTS_FILE, ERRORS_FILE)
RESULTS, ERRORS = 0, 1
JOURNAL = "done.idx"
_ENTRY = struct.Struct("<QQI")
ENTRY_SIZE = _ENTRY.size
_OFFSET_MASK = (1 << 62) - 1


def _crc(row: int, packed: int) -> int:
    return zlib.crc32(struct.pack("<QQ", row, packed))


def encode(row: int, fid: int, end: int) -> bytes:
    """One entry: `row`'s records are in FILES[fid] and end at byte `end`."""
    packed = (fid << 62) | end
    return _ENTRY.pack(row, packed, _crc(row, packed))


def _decode(raw: bytes) -> list[tuple[int, int]]:
    """(row, packed) entries before the first one whose checksum fails (junk after a crash)."""
    out = []
    for i in range(0, len(raw) - len(raw) % _ENTRY.size, _ENTRY.size):
        row, packed, crc = _ENTRY.unpack_from(raw, i)
        if crc != _crc(row, packed):
            break
        out.append((row, packed))
    return out


@dataclass
class Journal:
    """The committed view of an output folder (what `read` keeps), in journal order."""

    folder: Path
    kept: list  # (row, file id << 62 | end offset), the entries whose records are wholly on disk
    ends: list  # committed bytes of each of FILES
    sizes: list  # bytes of each of FILES on disk (more than `ends` after a torn or damaged tail)
    num_decoded: int  # entries whose checksum held
    num_bytes: int  # size of the journal file

    @property
    def num_rows(self) -> int:
        return len(self.kept)

    @property
    def num_dropped(self) -> int:
        """Entries recovery cannot keep: those rows are generated again."""
        return self.num_decoded - len(self.kept)

    @property
    def num_errors(self) -> int:
        return sum(1 for _, packed in self.kept if packed >> 62 == ERRORS)

    def rows(self):
        """(row, file id) of each committed row, in journal order."""
        for row, packed in self.kept:
            yield row, packed >> 62

    def spans(self):
        """(file id, start, end) of each committed row's records, in input-row order.

        Memory: three small arrays of one entry per row (the index), never the records themselves.
        """
        num_rows = 1 + max((row for row, _ in self.kept), default=-1)
        starts, ends, fids = array("q", [-1]) * num_rows, array("q", [0]) * num_rows, bytearray(num_rows)
        last_end = [0] * len(FILES)  # a file's records are in journal order: a row starts where the last ended
        for row, packed in self.kept:
            fid, end = packed >> 62, packed & _OFFSET_MASK
            starts[row], ends[row], fids[row], last_end[fid] = last_end[fid], end, fid, end
        for row in range(num_rows):
            if starts[row] >= 0:
                yield fids[row], starts[row], ends[row]

    def lines(self, fid: int = RESULTS):
        """The committed record lines of FILES[fid] (bytes, newline stripped), streaming."""
        left = self.ends[fid]
        if left == 0:
            return
        with fs.open_read(self.folder / FILES[fid]) as f:
            for line in f:
                line = line[:left]
                left -= len(line)
                if line.strip() and line.endswith(b"\n"):
                    yield line.rstrip(b"\n")
                if left <= 0:
                    return


def read(folder: Path) -> Journal:
    """The journal of `folder` checked against its data files (an OutputError if any is a link)."""
    folder = Path(folder)
    path = folder / JOURNAL
    raw = fs.read_bytes(path) if os.path.lexists(path) else b""
    entries = _decode(raw)
    sizes = [fs.size(folder / f) for f in FILES]
    kept = _valid_entries(folder, entries, sizes)
    ends = [0, 0]
    for _, packed in kept:
        ends[packed >> 62] = packed & _OFFSET_MASK
    return Journal(folder, kept, ends, sizes, len(entries), len(raw))


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
    fd = fs.open_nofollow(path, os.O_RDONLY)
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
