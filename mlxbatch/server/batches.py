"""The Batch API's batches: each one a durable mlxbatch job in DATA/batches/<id>/job/.

Owns: batch ids, the Batch object (as the `openai` package's `Batch`) kept in
DATA/batches/<id>/batch.json (replaced atomically at each status change), the status moves
(validating -> in_progress -> finalizing -> completed; cancelling -> cancelled; failed), one
thread per running batch that runs `runner.run_job` over the uploaded file with the shared
engine's `BatchFeed` as its engine (so rows are committed by the job commit protocol, and a
restarted server resumes every unfinished batch where its journal ends), and request counts.
Does not own: the engine or its priority policy (server/engine_loop.py), files (server/files.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import orjson

from mlxbatch.engine.config import EngineConfig
from mlxbatch.errors import Interrupted, MlxbatchError, ResumeError
from mlxbatch.job import source
from mlxbatch.job.spec import JobSpec
from mlxbatch.output import journal
from mlxbatch.output.checkpoint import read_state
from mlxbatch.output.fs import write_atomic
from mlxbatch.output.journal import ERRORS, FILES, RESULTS
from mlxbatch.runner import run_job
from mlxbatch.server.errors import ApiError
from mlxbatch.server.files import FileStore, is_id, new_id

log = logging.getLogger("mlxbatch.server")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
WINDOWS = ("24h",)
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "cancelled", "expired")
_WINDOW_SECONDS = 24 * 3600


def _resume_message(exc: ResumeError) -> str:
    """The job's refusal to resume, said for the server (its settings, not a command line, changed)."""
    changes = [x.strip() for x in str(exc).splitlines() if x.startswith("  ")]
    if not changes:
        return str(exc)
    return (f"this batch cannot resume: what it runs with changed since it started ({'; '.join(changes)}). "
            "Its committed rows are in its output and error files; start the server "
            "with the earlier settings to finish the rest.")


def _not_found(bid) -> ApiError:
    return ApiError(404, f"no such batch: {bid if is_id(bid) else '(not a batch id)'}", param="batch_id",
                    code="batch_not_found")


class _Running:
    """A batch's thread and, once its job loop exists, the loop (its counts, its stop flag)."""

    def __init__(self, grammars):
        self.grammars = grammars
        self.loop = None
        self.stop = False  # cancel, or the server stopping
        self.thread: threading.Thread | None = None

    def attach(self, loop) -> None:
        self.loop = loop
        loop.grammars = self.grammars  # the server's one grammar cache: the engine masks all guided rows at once
        if self.stop:
            loop.stop.is_set = True

    def request_stop(self) -> None:
        self.stop = True
        if self.loop is not None:
            self.loop.stop.is_set = True


class BatchStore:
    def __init__(self, folder: Path, files: FileStore, *, lm, engine_loop, spec: JobSpec, grammars):
        self.folder, self.files, self.lm, self.engine_loop = folder, files, lm, engine_loop
        self.grammars = grammars
        self.spec = spec  # the job settings every batch runs with (the server's defaults)
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._running: dict[str, _Running] = {}
        self._is_stopping = False

    # ------------------------------------------------------------ objects
    def _path(self, bid: str) -> Path:
        if not is_id(bid):
            raise _not_found(bid)
        return self.folder / bid / "batch.json"

    def _load(self, bid: str) -> dict:
        try:
            return orjson.loads(self._path(bid).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            raise _not_found(bid) from None

    def _save(self, b: dict) -> None:
        write_atomic(self._path(b["id"]), orjson.dumps(b))

    def _update(self, bid: str, **changes) -> dict:
        with self._lock:
            b = {**self._load(bid), **changes}
            self._save(b)
            return b

    def get(self, bid: str) -> dict:
        with self._lock:
            b = self._load(bid)
        if b["status"] in UNFINISHED and bid in self._running:  # live counts: rows committed so far
            state = read_state(self.folder / bid / "job")  # written at each commit, after the journal
            done, errors = state.get("rows_done", 0), state.get("errors", 0)
            b["request_counts"] = {**b["request_counts"], "completed": done - errors, "failed": errors}
        return b

    def list(self, *, limit: int, after: str | None) -> dict:
        ids = sorted((p.parent.name for p in self.folder.glob("*/batch.json")), key=self._created, reverse=True)
        if after is not None:
            if after not in ids:
                raise ApiError(404, _not_found(after).message, param="after", code="batch_not_found")
            ids = ids[ids.index(after) + 1:]
        page = [self.get(i) for i in ids[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit}

    def _created(self, bid: str) -> tuple:
        try:
            return self._load(bid)["created_at"], bid
        except ApiError:
            return 0, bid

    # ------------------------------------------------------------ lifecycle
    def create(self, body: dict) -> dict:
        fid, endpoint, window = body.get("input_file_id"), body.get("endpoint"), body.get("completion_window", "24h")
        metadata = body.get("metadata")
        if not isinstance(fid, str) or not fid:
            raise ApiError(400, "input_file_id must be a file id (a string)", param="input_file_id",
                           code="invalid_value")
        if endpoint not in ENDPOINTS:
            raise ApiError(400, f"endpoint is {endpoint!r}; supported: {', '.join(ENDPOINTS)}", param="endpoint",
                           code="invalid_value")
        if window not in WINDOWS:
            raise ApiError(400, f"completion_window is {window!r}; supported: {', '.join(WINDOWS)}",
                           param="completion_window", code="invalid_value")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise ApiError(400, "metadata must be an object of at most 16 string values", param="metadata",
                           code="invalid_value")
        with self._lock:  # with delete_file's check: a file is never deleted under a new batch
            b = self._new(fid, endpoint, window, metadata)
        self._start(b["id"])
        return b

    def _new(self, fid: str, endpoint: str, window: str, metadata) -> dict:
        meta = self.files.get(fid)
        if meta["purpose"] != "batch":
            raise ApiError(400, f"file {fid} has purpose {meta['purpose']!r}; a batch reads a purpose 'batch' "
                           "file", param="input_file_id", code="invalid_value")
        now = int(time.time())
        b = {"id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
             "input_file_id": fid, "completion_window": window, "status": "validating", "output_file_id": None,
             "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + _WINDOW_SECONDS,
             "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
             "cancelling_at": None, "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
             "metadata": metadata, "model": self.lm.name, "input_path": str(self.files.path(meta))}
        self._path(b["id"]).parent.mkdir(parents=True)
        self._save(b)
        return b

    def delete_file(self, fid: str) -> dict:
        """Delete a file, unless an unfinished batch reads it (409: its rows are read as it runs)."""
        with self._lock:
            user = next((b for b in self._all() if b.get("input_file_id") == fid and b.get("status") in UNFINISHED),
                        None)
            if user is not None:
                raise ApiError(409, f"file {fid} is the input of batch {user['id']}, which is {user['status']}; "
                               "cancel it or wait for it to end first", param="file_id", code="file_in_use")
            return self.files.delete(fid)

    def _all(self):
        for p in self.folder.glob("*/batch.json"):
            try:
                yield orjson.loads(p.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue

    def cancel(self, bid: str) -> dict:
        with self._lock:
            b = self._load(bid)
            if b["status"] in TERMINAL:
                raise ApiError(409, f"batch {bid} is {b['status']}; only an unfinished batch can be cancelled",
                               param="batch_id", code="batch_not_cancellable")
            if b["status"] != "cancelling":
                b = self._update(bid, status="cancelling", cancelling_at=int(time.time()))
            run = self._running.get(bid)
        if run is not None:
            run.request_stop()
        return self.get(bid)

    def resume_all(self) -> list[str]:
        """Start every batch a previous server left unfinished (its job resumes from its journal)."""
        out = []
        for b in sorted(self._all(), key=lambda b: b["id"]):
            if b.get("status") in UNFINISHED:
                self._start(b["id"])
                out.append(b["id"])
        return out

    def stop_all(self) -> None:
        """Stop every batch thread (each commits what finished); they resume at the next start."""
        self._is_stopping = True
        runs = list(self._running.values())
        for run in runs:
            run.request_stop()
        for run in runs:
            if run.thread is not None:
                run.thread.join(timeout=60)

    def _start(self, bid: str) -> None:
        run = _Running(self.grammars)
        with self._lock:
            self._running[bid] = run
            if self._load(bid)["status"] == "cancelling":
                run.stop = True
        run.thread = threading.Thread(target=self._run, args=(bid, run), name=f"batch-{bid}", daemon=True)
        run.thread.start()

    # ------------------------------------------------------------ the batch's thread
    def _run(self, bid: str, run: _Running) -> None:
        try:
            self._run_job(bid, run)
        except Interrupted:
            if self._load(bid)["status"] == "cancelling":
                self._finish(bid, "cancelled", cancelled_at=int(time.time()))
        except ResumeError as exc:
            self._fail(bid, "cannot_resume", _resume_message(exc))
        except MlxbatchError as exc:
            self._fail(bid, "job_failed", str(exc))
        except Exception as exc:  # a bug: the batch fails, the server stays up
            log.exception("batch %s failed", bid)
            self._fail(bid, "internal_error", repr(exc))
        finally:
            with self._lock:
                self._running.pop(bid, None)

    def _run_job(self, bid: str, run: _Running) -> None:
        b = self._load(bid)
        spec = replace(self.spec, input=Path(b["input_path"]), output=self.folder / bid / "job").validate()
        if b["status"] in ("validating", "cancelling") and not b["request_counts"]["total"]:
            self._validated(bid, source.count_rows(spec.input))  # the file is readable and its rows are counted
        feed = self.engine_loop.open_feed()
        try:
            run_job(spec, lm=self.lm, engine_factory=lambda lm, config: self._shared(feed, config),
                    on_loop=run.attach)
        finally:
            feed.close()
        self._update(bid, status="finalizing", finalizing_at=b.get("finalizing_at") or int(time.time()))
        self._finish(bid, "completed", completed_at=int(time.time()))

    def _validated(self, bid: str, total: int) -> None:
        """Validating -> in_progress; a cancel that came meanwhile stays (the job then stops at once)."""
        with self._lock:
            b = self._load(bid)
            moved = {"status": "in_progress", "in_progress_at": int(time.time())} if b["status"] == "validating" else {}
            self._update(bid, request_counts={"total": total, "completed": 0, "failed": 0}, **moved)

    def _shared(self, feed, config: EngineConfig):
        """The server's engine (through `feed`) for a batch job, whose engine settings are the server's:
        a batch's own would be dropped, so a difference is a bug caught here, not a silent change."""
        if replace(config, is_interactive=True) != self.engine_loop.config:  # the server's steps are interactive
            raise RuntimeError(f"a batch job's engine settings {config} differ from the server's "
                               f"{self.engine_loop.config}")
        return feed

    def _finish(self, bid: str, status: str, **changes) -> None:
        """Publish the output and error files (the job's committed records) and the final counts."""
        folder = self.folder / bid / "job"
        view = journal.read(folder) if (folder / journal.JOURNAL).exists() else None
        ends, done, errors = (view.ends, view.num_rows, view.num_errors) if view else ([0, 0], 0, 0)
        ids = {}
        for fid, key, name in ((RESULTS, "output_file_id", "output"), (ERRORS, "error_file_id", "errors")):
            size = ends[fid]
            if size:
                ids[key] = self.files.add_output(f"file-{bid}-{name}", filename=f"{bid}_{name}.jsonl",
                                                 path=folder / FILES[fid], size=size)["id"]
        b = self._load(bid)
        counts = {"total": max(b["request_counts"]["total"], read_state(folder).get("rows_total", 0)),
                  "completed": done - errors, "failed": errors}
        self._update(bid, status=status, request_counts=counts, **ids, **changes)

    def _fail(self, bid: str, code: str, message: str) -> None:
        """Failed, with every committed row published all the same (a batch that cannot resume keeps them)."""
        if self._is_stopping:
            return
        error = {"code": code, "message": self._public(bid, message), "param": None, "line": None}
        try:
            self._finish(bid, "failed", failed_at=int(time.time()), errors={"object": "list", "data": [error]})
        except (OSError, MlxbatchError):  # a job folder too damaged to read: failed without its rows
            log.exception("batch %s: its committed rows could not be published", bid)
            self._update(bid, status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [error]})

    def _public(self, bid: str, message: str) -> str:
        """A message for API clients: the server's own paths replaced by what the client knows them as."""
        b = self._load(bid)
        data = self.folder.parent
        for path, name in ((b.get("input_path"), f"input file {b['input_file_id']}"),
                           (self.folder / bid / "job", f"batch {bid}"), (data.resolve(), "the server's data folder"),
                           (data, "the server's data folder")):
            if path:
                message = message.replace(str(path), name)
        return message

    @staticmethod
    def public(b: dict) -> dict:
        return {k: v for k, v in b.items() if k != "input_path"}
