"""Streaming input readers: JSONL (.jsonl, .jsonl.gz) and Parquet.

Owns: opening the input, counting rows cheaply, and yielding one `Row` per
input row in order (a parsed dict, or the reason it could not be parsed), in
constant memory whatever the file size. Does not own: what the fields mean
(job/render.py).
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Iterator

import orjson

from mlxbatch.errors import InputFileError, RowError
from mlxbatch.types import Row

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
MAX_LINE_BYTES = 8 << 20  # a longer line is a row error, read past in blocks (never held whole)
_BOM = b"\xef\xbb\xbf"
_PARQUET_BATCH = 1024


def kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
        return "jsonl"
    raise InputFileError(f"{path}: unknown input format (expected one of {', '.join(SUFFIXES)})")


def check_readable(path: Path) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: no such input file")
    if not path.is_file():
        raise InputFileError(f"{path}: not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror})") from exc


def _open_jsonl(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def fingerprint(path: Path) -> dict:
    """Identity of the input for resume checks: size and sha256 of the bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path), "size": path.stat().st_size, "sha256": h.hexdigest()}


def count_rows(path: Path) -> int:
    """Rows the reader will yield, counted without parsing (blank lines excluded)."""
    check_readable(path)
    if kind_of(path) == "parquet":
        return _parquet_file(path).metadata.num_rows
    try:
        with _open_jsonl(path) as f:
            return sum(1 for _, raw in _lines(f) if raw is None or raw.strip())
    except (OSError, EOFError) as exc:
        raise InputFileError(f"{path}: cannot read ({exc})") from exc


def read_rows(path: Path) -> Iterator[Row]:
    check_readable(path)
    if kind_of(path) == "parquet":
        yield from _read_parquet(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[Row]:
    index = 0
    try:
        with _open_jsonl(path) as f:
            for line_no, raw in _lines(f):
                if raw is None:
                    yield Row(index, line_no, None, RowError(
                        "line_too_long", f"line {line_no}: longer than {MAX_LINE_BYTES >> 20} MiB; not read"))
                elif not raw.strip():
                    continue
                else:
                    yield _parse_line(raw, index, line_no)
                index += 1
    except (OSError, EOFError) as exc:  # gzip truncated or unreadable mid-way
        raise InputFileError(f"{path}: read failed after {index} rows ({exc})") from exc


def _lines(f) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line; None for a line over MAX_LINE_BYTES, skipped in bounded reads.

    The BOM of line 1 is dropped here, so counting and reading agree on which lines are blank.
    """
    line_no = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        line_no += 1
        if line_no == 1 and raw.startswith(_BOM):
            raw = raw[3:]  # a UTF-8 byte order mark is not part of the JSON
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            raw = None
        yield line_no, raw


def _parse_line(raw: bytes, index: int, line_no: int) -> Row:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
        code = "invalid_utf8" if "utf-8" in msg.lower() else "invalid_json"
        what = "not valid UTF-8" if code == "invalid_utf8" else f"not valid JSON ({msg})"
        return Row(index, line_no, None, RowError(code, f"line {line_no}: {what}"))
    if not isinstance(data, dict):
        kind = type(data).__name__
        return Row(index, line_no, None, RowError("invalid_row", f"line {line_no}: expected a JSON object, got {kind}"))
    return Row(index, line_no, data)


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise InputFileError(f"{path}: not a readable Parquet file ({exc})") from exc


def parquet_columns(path: Path) -> list[str]:
    return list(_parquet_file(path).schema_arrow.names)


def _read_parquet(path: Path) -> Iterator[Row]:
    pf = _parquet_file(path)
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
            for data in batch.to_pylist():
                yield Row(index, index + 1, data)
                index += 1
    except Exception as exc:
        raise InputFileError(f"{path}: read failed after {index} rows ({exc})") from exc
