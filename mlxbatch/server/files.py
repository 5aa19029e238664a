"""The Batch API's files: uploads kept under DATA/files/, and batch outputs served from job folders.

Owns: file ids, the FileObject shape (as the `openai` package's `FileObject`), where a file's bytes
live (an upload's own `<id>.jsonl`; a batch output's committed part of its job's results.jsonl or
errors.jsonl, never copied), uploads parsed and written by a worker thread (`Upload`: never on the
event loop), listing pages, atomic metadata writes and removing what an upload killed mid-way left.
Does not own: batches (server/batches.py), which may refuse to delete a file they read.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from pathlib import Path

import orjson
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from mlxbatch.output.fs import fsync, write_atomic
from mlxbatch.server.errors import ApiError

PURPOSES = ("batch",)  # what may be uploaded (outputs are "batch_output", made by the server)
_CHUNK = 1 << 20
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # every id this server makes (no NUL, slash or dot)
_PART = ".part"  # an upload still being written: a hidden name, renamed when whole
_MAX_FIELD_BYTES = 64 << 10
_MAX_FIELDS = 8


def boundary_of(content_type: str) -> bytes:
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(400, "upload a file as multipart/form-data with fields 'file' and 'purpose'",
                       param="file", code="invalid_value")
    return params[b"boundary"]


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def is_id(text: str) -> bool:
    return isinstance(text, str) and _ID.fullmatch(text) is not None


def not_found(fid) -> ApiError:
    shown = fid if is_id(fid) else "(not a file id)"
    return ApiError(404, f"no such file: {shown}", param="file_id", code="file_not_found")


class FileStore:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._remove_unfinished()

    def _remove_unfinished(self) -> None:
        """What a killed server left: a partial upload, a whole one whose metadata was never written, a
        metadata temporary."""
        for p in self.folder.iterdir():
            is_orphan = p.name.endswith(".jsonl") and not p.with_suffix(".json").exists()
            if (p.name.startswith(".") and p.name.endswith(_PART)) or p.name.endswith(".json.tmp") or is_orphan:
                p.unlink(missing_ok=True)

    def _meta_path(self, fid: str) -> Path:
        if not is_id(fid):
            raise not_found(fid)
        return self.folder / f"{fid}.json"

    def get(self, fid: str) -> dict:
        try:
            meta = orjson.loads(self._meta_path(fid).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            raise not_found(fid) from None
        return meta

    @staticmethod
    def public(meta: dict) -> dict:
        return {k: meta[k] for k in ("id", "object", "bytes", "created_at", "filename", "purpose", "status",
                                     "expires_at", "status_details")}

    def list(self, purpose: str | None = None) -> list[dict]:
        """Every file (of `purpose`), newest first."""
        metas = []
        for p in self.folder.glob("*.json"):
            try:
                metas.append(orjson.loads(p.read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                continue
        metas = [m for m in metas if purpose is None or m["purpose"] == purpose]
        return sorted(metas, key=_order, reverse=True)

    def page(self, *, purpose: str | None, limit: int, after: str | None, order: str) -> dict:
        """One page of the listing: `limit` files after the file `after`, by creation time `order`."""
        metas = self.list(purpose)
        if order == "asc":
            metas.reverse()
        if after is not None:
            at = next((i for i, m in enumerate(metas) if m["id"] == after), None)
            if at is None:
                raise ApiError(404, f"after: no such file: {after if is_id(after) else '(not a file id)'}",
                               param="after", code="file_not_found")
            metas = metas[at + 1:]
        data = [self.public(m) for m in metas[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(metas) > limit}

    def open_upload(self, boundary: bytes, *, max_bytes: int) -> "Upload":
        return Upload(self, boundary, max_bytes=max_bytes)

    def add_output(self, fid: str, *, filename: str, path: Path, size: int) -> dict:
        """A batch's output or error file: bytes read from the job folder (relative path kept)."""
        return self._register(fid, filename, "batch_output", size, os.path.relpath(path, self.folder))

    def _register(self, fid: str, filename: str, purpose: str, size: int, rel: str) -> dict:
        meta = {"id": fid, "object": "file", "bytes": size, "created_at": int(time.time()), "filename": filename,
                "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None,
                "path": rel, "created_ns": time.time_ns()}
        write_atomic(self._meta_path(fid), orjson.dumps(meta))
        return meta

    def path(self, meta: dict) -> Path:
        return (self.folder / meta["path"]).resolve()

    def read_chunks(self, meta: dict):
        """The file's bytes (only the first `bytes`: a job's results past its commit are not the file's)."""
        left = meta["bytes"]
        with open(self.path(meta), "rb") as f:
            while left > 0 and (chunk := f.read(min(_CHUNK, left))):
                left -= len(chunk)
                yield chunk

    def delete(self, fid: str) -> dict:
        meta = self.get(fid)
        with self._lock:
            self._meta_path(fid).unlink(missing_ok=True)
            own = self.folder / f"{fid}.jsonl"
            if meta["path"] == own.name:
                own.unlink(missing_ok=True)
        return {"id": fid, "object": "file", "deleted": True}


def _order(meta: dict) -> tuple:
    """Creation order: nanoseconds where recorded (files made within one second keep their order)."""
    return meta.get("created_ns", meta["created_at"] * 10**9), meta["id"]


class Upload:
    """One multipart/form-data upload, parsed and written by whichever thread calls `write` (a worker,
    never the event loop): the 'file' part goes straight to a hidden `.part` file, renamed when whole."""

    def __init__(self, store: FileStore, boundary: bytes, *, max_bytes: int):
        self.store, self.max_bytes = store, max_bytes
        self.fid = new_id("file-")
        self.tmp = store.folder / f".{self.fid}{_PART}"
        self.size, self.filename, self.fields = 0, None, {}
        self._file = None
        self._name = self._header = self._value = b""
        self._disposition, self._field, self._is_file, self._num_files = b"", None, False, 0
        self._is_ended = False
        self._data = bytearray()
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end})

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise ApiError(400, f"could not read the multipart body ({exc})", param="file",
                           code="invalid_value") from None

    def finish(self) -> dict:
        """Check the fields, make the file durable under its own name, then its metadata."""
        if not self._is_ended:
            raise ApiError(400, "the multipart body ends before its closing boundary", param="file",
                           code="invalid_value")
        purpose = self.fields.get("purpose")
        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose is {purpose!r}; supported: {', '.join(PURPOSES)}", param="purpose",
                           code="invalid_value")
        if self._file is None or self._num_files != 1:
            raise ApiError(400, "no file: send the JSONL file in the 'file' field", param="file", code="invalid_value")
        self._file.flush()
        fsync(self._file.fileno())
        self._file.close()
        dest = self.store.folder / f"{self.fid}.jsonl"
        os.replace(self.tmp, dest)  # a kill before the metadata leaves an orphan removed at the next start
        return self.store._register(self.fid, self.filename or "upload.jsonl", purpose, self.size, dest.name)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    # -- the parser's callbacks
    def _begin(self) -> None:
        self._disposition, self._field, self._is_file = b"", None, False
        self._data.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header = self._value = b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._field = options.get(b"name", b"").decode("utf-8", "replace")
        self._is_file = self._field == "file"
        if self._is_file:
            self._num_files += 1
            if self._num_files > 1:
                raise ApiError(400, "send one file per upload", param="file", code="invalid_value")
            self.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
            self._file = open(self.tmp, "xb")
        elif len(self.fields) >= _MAX_FIELDS:
            raise ApiError(400, f"more than {_MAX_FIELDS} form fields", param="file", code="invalid_value")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.size += end - start
            if self.size > self.max_bytes:
                raise ApiError(413, f"file is over the upload limit of {self.max_bytes:,} bytes", param="file",
                               code="file_too_large")
            self._file.write(data[start:end])
            return
        self._data += data[start:end]
        if len(self._data) > _MAX_FIELD_BYTES:
            raise ApiError(400, f"form field {self._field!r} is over {_MAX_FIELD_BYTES:,} bytes", param=self._field,
                           code="invalid_value")

    def _end(self) -> None:
        self._is_ended = True

    def _part_end(self) -> None:
        if not self._is_file and self._field:
            self.fields[self._field] = self._data.decode("utf-8", "replace")
