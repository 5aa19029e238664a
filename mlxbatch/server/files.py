"""The Batch API's files: uploads kept under DATA/files/, and batch outputs served from job folders.

Owns: file ids, the FileObject shape (as the `openai` package's `FileObject`), where a file's bytes
live (an upload's own `<id>.jsonl`; a batch output's committed part of its job's results.jsonl or
errors.jsonl, never copied) and atomic metadata writes. Does not own: batches (server/batches.py).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import orjson

from mlxbatch.output.fs import write_atomic
from mlxbatch.server.errors import ApiError

PURPOSES = ("batch",)  # what may be uploaded (outputs are "batch_output", made by the server)
_CHUNK = 1 << 20


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


class FileStore:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _meta_path(self, fid: str) -> Path:
        if not fid or "/" in fid or fid.startswith("."):
            raise ApiError(404, f"no such file: {fid!r}", param="file_id", code="file_not_found")
        return self.folder / f"{fid}.json"

    def get(self, fid: str) -> dict:
        try:
            meta = orjson.loads(self._meta_path(fid).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            raise ApiError(404, f"no such file: {fid!r}", param="file_id", code="file_not_found") from None
        return meta

    @staticmethod
    def public(meta: dict) -> dict:
        return {k: meta[k] for k in ("id", "object", "bytes", "created_at", "filename", "purpose", "status",
                                     "expires_at", "status_details")}

    def list(self, purpose: str | None = None) -> list[dict]:
        metas = []
        for p in self.folder.glob("*.json"):
            try:
                metas.append(orjson.loads(p.read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                continue
        metas = [m for m in metas if purpose is None or m["purpose"] == purpose]
        return sorted(metas, key=lambda m: (m["created_at"], m["id"]), reverse=True)

    async def upload(self, upload, *, filename: str, purpose: str, max_bytes: int) -> dict:
        """Copy an uploaded file (Starlette's UploadFile) in; 413 past `max_bytes`."""
        fid = new_id("file-")
        dest = self.folder / f"{fid}.jsonl"
        size = 0
        try:
            with open(dest, "wb") as f:
                while chunk := await upload.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise ApiError(413, f"file is over the upload limit of {max_bytes:,} bytes",
                                       param="file", code="file_too_large")
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return self._register(fid, filename, purpose, size, dest.name)

    def add_output(self, fid: str, *, filename: str, path: Path, size: int) -> dict:
        """A batch's output or error file: bytes read from the job folder (relative path kept)."""
        return self._register(fid, filename, "batch_output", size, os.path.relpath(path, self.folder))

    def _register(self, fid: str, filename: str, purpose: str, size: int, rel: str) -> dict:
        meta = {"id": fid, "object": "file", "bytes": size, "created_at": int(time.time()), "filename": filename,
                "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None,
                "path": rel}
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
