"""`mlxbatch serve`'s API defects of issue 30: one test per defect (batches, files, hosts, ids, counts).

Two harnesses: a real `mlxbatch serve` process without an API key (as tests/test_server.py), and the
server in this process (uvicorn in a thread) where a test must hold a batch at a given point or
slow the disk down.
"""

import asyncio
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import cli, read_jsonl
from tests.test_server import ServerProc, _batch_line, _chat, _free_port, _upload, _wait_batch

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """A served process with no API key (the case the Host and Origin checks protect)."""
    srv = ServerProc(tmp_path_factory.mktemp("serve-open") / "data", key=None).start()
    yield srv
    assert srv.stop() in (0, 130), srv.read_log()


class InProc:
    """`mlxbatch serve` in this process: uvicorn in a thread, so a test can patch what the server calls."""

    def __init__(self, data: Path, lm, *, spec_options: dict | None = None, **options):
        import uvicorn

        from mlxbatch.server import ServeOptions, build, serve_spec

        self.key, self.port, self.data = None, _free_port(), data
        spec = serve_spec(None, {"model": "random:tiny", **(spec_options or {})})
        self.srv, app = build(spec, ServeOptions(data=data, port=self.port, **options), lm=lm)
        self.uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                lifespan="on"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)

    def __enter__(self) -> "InProc":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uv.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the in-process server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.uv.should_exit = True
        self.thread.join(90)

    def request(self, *args, **kwargs):
        return ServerProc.request(self, *args, **kwargs)

    def client(self):
        return ServerProc.client(self)


def _batch(c, lines: list[str]):
    return c.batches.create(input_file_id=_upload(c, lines).id, endpoint="/v1/chat/completions",
                            completion_window="24h")


def _wait(what, timeout: float = 120, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)
    return got


def _committed(job: Path) -> tuple[int, int]:
    """(results, errors) rows the job folder's journal holds."""
    from mlxbatch.output import journal

    if not (job / "done.idx").exists():
        return 0, 0
    view = journal.read(job)
    return view.num_rows - view.num_errors, view.num_errors


def _deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _deep_line(cid: str, depth: int = 200) -> str:
    rf = {"type": "json_schema", "json_schema": {"name": "deep", "schema": _deep_schema(depth)}}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": _chat("x"), "max_tokens": 4, "response_format": rf}})


# ------------------------------------------------------------ 1: a cancel while validating
def test_cancel_while_validating_ends_cancelled(tiny, tmp_path, monkeypatch):
    from mlxbatch.server import batches

    release, counting = threading.Event(), threading.Event()
    real = batches.source.count_rows

    def slow_count(path):
        counting.set()
        release.wait(60)
        return real(path)

    monkeypatch.setattr(batches.source, "count_rows", slow_count)
    with InProc(tmp_path / "data", tiny) as srv:
        c = srv.client()
        b = _batch(c, [_batch_line(f"r{i}", f"row {i}") for i in range(5)])
        assert counting.wait(60) and c.batches.retrieve(b.id).status == "validating"
        assert c.batches.cancel(b.id).status == "cancelling"
        release.set()
        done = _wait_batch(c, b.id, timeout=60)
    assert done.status == "cancelled" and done.cancelled_at
    on_disk = json.loads((tmp_path / "data" / "batches" / b.id / "batch.json").read_text())
    assert on_disk["status"] == "cancelled"  # a restart has nothing to resume


# ------------------------------------------------------------ 2: committed rows are published whatever happens
@pytest.mark.parametrize("how", ["changed setting", "input deleted"])
def test_a_batch_that_cannot_resume_publishes_its_committed_rows(tiny, tmp_path, how):
    data = tmp_path / "data"
    lines = [_batch_line(f"k{i}", f"resume {i} " + "y " * (i % 5), max_tokens=32) for i in range(400)]
    lines.insert(3, "garbage")
    with InProc(data, tiny) as srv:
        c = srv.client()
        b = _batch(c, lines)
        job = data / "batches" / b.id / "job"
        _wait(lambda: sum(_committed(job)) >= 20)
    stopped = json.loads((data / "batches" / b.id / "batch.json").read_text())
    assert stopped["status"] == "in_progress"  # stopped mid-batch: the next start resumes it
    if how == "input deleted":
        next((data / "files").glob(f"{b.input_file_id}.jsonl")).unlink()
    with InProc(data, tiny, spec_options={"max_tokens": 99} if how == "changed setting" else {}) as srv:
        c = srv.client()
        done = _wait_batch(c, b.id, timeout=60)
        results, errors = _committed(job)
        assert done.status == "failed" and results >= 19 and errors == 1
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == \
            (401, results, errors)
        out = c.files.content(done.output_file_id).text.splitlines()
        assert len(out) == results and len({json.loads(x)["custom_id"] for x in out}) == results
        assert [json.loads(x)["line"] for x in c.files.content(done.error_file_id).text.splitlines()] == [4]
        message = done.errors.data[0].message
        assert done.errors.data[0].code == ("cannot_resume" if how == "changed setting" else "job_failed")
        assert ("max_tokens: 256 -> 99" in message) == (how == "changed setting"), message
        assert str(tmp_path) not in message and "/" not in message.replace("/v1", ""), message  # no server paths


# ------------------------------------------------------------ 3: a schema nested too deeply
def test_deeply_nested_schema_is_that_lines_error_and_a_400(open_server):
    c = open_server.client()
    b = _wait_batch(c, _batch(c, [_batch_line("ok1", "hi"), _deep_line("deep"), _batch_line("ok2", "yo")]).id)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (3, 2, 1)
    (err,) = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    assert err["custom_id"] == "deep" and err["error"]["code"] == "invalid_schema", err
    body = json.loads(_deep_line("x"))["body"]
    status, got = open_server.request("POST", "/v1/chat/completions", body)
    assert status == 400 and got["error"]["param"] == "response_format", got


def test_run_writes_a_deeply_nested_schema_line_as_its_error_record(tiny, tmp_path):
    from mlxbatch.job.spec import build_spec
    from mlxbatch.runner import run_job

    rows = tmp_path / "in.jsonl"
    rows.write_text(_batch_line("ok", "hi") + "\n" + _deep_line("deep") + "\n")  # orjson cannot write it
    run_job(build_spec(None, {"input": rows, "model": "random:tiny", "max_tokens": 4}), lm=tiny)
    assert [r["custom_id"] for r in read_jsonl(tmp_path / "in.mlxbatch" / "results.jsonl")] == ["ok"]
    (err,) = read_jsonl(tmp_path / "in.mlxbatch" / "errors.jsonl")
    assert err["custom_id"] == "deep" and err["error"]["code"] == "invalid_schema"


# ------------------------------------------------------------ 4: Host and Origin
def test_foreign_host_and_cross_origin_requests_are_refused(open_server):
    srv = open_server
    for host in ("attacker.example", "attacker.example:" + str(srv.port), "127.0.0.1.attacker.example"):
        status, got = srv.request("GET", "/v1/files", headers={"Host": host})
        assert status == 400 and got["error"]["code"] == "invalid_host", (host, got)
    metrics = srv.request("GET", "/metrics")[1]
    before = next(x for x in metrics.splitlines() if x.startswith("mlxbatch_requests_total"))
    body = json.dumps({"messages": _chat("hi"), "max_tokens": 2})
    status, got = srv.request("POST", "/v1/chat/completions", body.encode(),
                              headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status == 403 and got["error"]["code"] == "origin_not_allowed", got
    after = next(x for x in srv.request("GET", "/metrics")[1].splitlines() if x.startswith("mlxbatch_requests_total"))
    assert after == before  # nothing ran
    for host in ("localhost", "127.0.0.1", "[::1]", "localhost:1234", "127.0.0.1:9", "[::1]:80", "LOCALHOST"):
        assert srv.request("GET", "/v1/models", headers={"Host": host})[0] == 200, host


def _guard_status(app_options: dict, headers: dict, method: str = "GET") -> tuple[int, dict]:
    """Status and headers of one request through the server's host and origin guard (an ASGI call)."""
    from mlxbatch.server.app import guard

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": method, "path": "/v1/models", "query_string": b"", "scheme": "http",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(guard(inner, **app_options)(scope, receive, send))
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


@pytest.mark.parametrize("options, headers, want", [
    ({"host": "127.0.0.1"}, {"host": "evil.example"}, 400),
    ({"host": "127.0.0.1"}, {"host": "localhost:8080"}, 200),
    ({"host": "::1"}, {"host": "[::1]:8080"}, 200),
    ({"host": "0.0.0.0"}, {"host": "my-mac.local:8080"}, 200),  # bound to the LAN: any name reaches it
    ({"host": "0.0.0.0"}, {"host": "my-mac.local", "origin": "http://evil.example"}, 403),
    ({"host": "192.168.1.5"}, {"host": "192.168.1.5:8080"}, 200),
    ({"host": "192.168.1.5"}, {"host": "evil.example"}, 400),
    ({"host": "0.0.0.0", "allowed_hosts": ("my-mac.local",)}, {"host": "other.local"}, 400),
    ({"host": "127.0.0.1", "allowed_hosts": ("my-mac.local",)}, {"host": "My-Mac.local:80"}, 200),
    ({"host": "127.0.0.1", "allowed_hosts": ("*",)}, {"host": "anything.example"}, 200),
    ({"host": "127.0.0.1", "allowed_origins": ("http://localhost:3000",)},
     {"host": "localhost", "origin": "http://localhost:3000"}, 200),
    ({"host": "127.0.0.1", "allowed_origins": ("http://localhost:3000",)},
     {"host": "localhost", "origin": "http://localhost:3001"}, 403),
    ({"host": "127.0.0.1", "allowed_origins": ("*",)}, {"host": "localhost", "origin": "https://app.example"}, 200),
    ({"host": "127.0.0.1"}, {"host": "127.0.0.1:8080", "origin": "http://127.0.0.1:8080"}, 403),  # we serve no pages
])
def test_host_and_origin_rules(options, headers, want):
    assert _guard_status(options, headers)[0] == want


def test_allowed_origin_gets_cors_headers_and_a_preflight():
    opts = {"host": "127.0.0.1", "allowed_origins": ("http://localhost:3000",)}
    status, headers = _guard_status(opts, {"host": "localhost", "origin": "http://localhost:3000",
                                           "access-control-request-method": "POST",
                                           "access-control-request-headers": "authorization, content-type"},
                                    method="OPTIONS")
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000", headers
    assert "authorization" in headers["access-control-allow-headers"].lower()
    status, headers = _guard_status(opts, {"host": "localhost", "origin": "http://localhost:3000"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"


# ------------------------------------------------------------ 5: the input file of an unfinished batch
def test_input_file_of_an_unfinished_batch_cannot_be_deleted(tiny, tmp_path, monkeypatch):
    from mlxbatch.server import batches

    release = threading.Event()
    real = batches.source.count_rows
    monkeypatch.setattr(batches.source, "count_rows", lambda path: (release.wait(60), real(path))[1])
    with InProc(tmp_path / "data", tiny) as srv:
        c = srv.client()
        b = _batch(c, [_batch_line(f"r{i}", f"row {i}") for i in range(3)])
        status, got = srv.request("DELETE", f"/v1/files/{b.input_file_id}")
        assert status == 409 and got["error"]["param"] == "file_id" and b.id in got["error"]["message"], got
        assert str(tmp_path) not in got["error"]["message"]
        release.set()
        assert _wait_batch(c, b.id, timeout=60).status == "completed"
        assert c.files.delete(b.input_file_id).deleted


# ------------------------------------------------------------ 7: uploads stream to disk off the event loop
def test_an_upload_never_blocks_the_event_loop(tiny, tmp_path, monkeypatch):
    """A slow disk (each fsync 3 s): requests made while a file uploads are still answered at once."""
    import os

    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (time.sleep(3.0), real_fsync(fd))[1])
    blob = b"".join(_batch_line(f"u{i}", "word " * 40).encode() + b"\n" for i in range(40_000))  # ~13 MB
    with InProc(tmp_path / "data", tiny) as srv:
        done, slowest = threading.Event(), []

        def upload():
            try:
                f = _upload(srv.client(), [blob.decode().rstrip("\n")])
                assert f.bytes == len(blob)
            finally:
                done.set()

        t = threading.Thread(target=upload)
        t.start()
        while not done.is_set():
            t0 = time.monotonic()
            assert srv.request("GET", "/health")[0] == 200
            slowest.append(time.monotonic() - t0)
        t.join()
    assert len(slowest) >= 3 and max(slowest) < 1.5, sorted(slowest)[-5:]


# ------------------------------------------------------------ 9: an upload killed mid-copy
def test_unfinished_uploads_are_removed_at_start(tmp_path):
    from mlxbatch.server.files import FileStore

    store = FileStore(tmp_path / "files")
    kept = store._register("file-kept", "a.jsonl", "batch", 3, "file-kept.jsonl")
    (tmp_path / "files" / "file-kept.jsonl").write_bytes(b"{}\n")
    (tmp_path / "files" / "file-0rphan.jsonl").write_bytes(b"{}\n")  # its copy finished, its metadata never did
    (tmp_path / "files" / ".file-1rphan.part").write_bytes(b"{")  # killed while copying
    (tmp_path / "files" / "file-2rphan.json.tmp").write_bytes(b"{")  # killed while writing the metadata
    store = FileStore(tmp_path / "files")
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["file-kept.json", "file-kept.jsonl"]
    assert [m["id"] for m in store.list()] == [kept["id"]]


# ------------------------------------------------------------ 10: NUL bytes in ids
def test_nul_byte_in_an_id_is_404(open_server):
    for method, path in (("GET", "/v1/files/file-%00x"), ("GET", "/v1/files/file-%00x/content"),
                         ("DELETE", "/v1/files/%00"), ("GET", "/v1/batches/batch_%00"),
                         ("POST", "/v1/batches/batch_%00/cancel")):
        status, got = open_server.request(method, path)
        assert status == 404 and got["error"]["code"] in ("file_not_found", "batch_not_found"), (path, got)
    status, got = open_server.request("POST", "/v1/batches", {"input_file_id": "file-\0", "endpoint":
                                                              "/v1/chat/completions", "completion_window": "24h"})
    assert status == 404, got


# ------------------------------------------------------------ 11: the error record of a non-JSON line
def test_error_record_of_a_non_json_line_has_custom_id_and_response(open_server):
    c = open_server.client()
    b = _wait_batch(c, _batch(c, [_batch_line("ok", "hi"), "{not json"]).id)
    (err,) = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    assert err["custom_id"] is None and err["response"] is None and err["error"]["code"] == "invalid_json", err
    assert err["id"].startswith("batch_req_")


# ------------------------------------------------------------ 12: listing files
def test_files_list_pages_with_limit_after_and_order(open_server):
    c = open_server.client()
    ids = [_upload(c, [_batch_line(f"f{i}", "hi")]).id for i in range(4)]
    newest_first = [f["id"] for f in open_server.request("GET", "/v1/files?purpose=batch&limit=10000")[1]["data"]]
    assert [i for i in newest_first if i in ids] == ids[::-1]  # uploaded one after another: newest first
    status, page = open_server.request("GET", f"/v1/files?limit=2&order=asc&after={ids[0]}")
    assert status == 200 and [f["id"] for f in page["data"]] == ids[1:3], page
    assert page["has_more"] is True and page["first_id"] == ids[1] and page["last_id"] == ids[2]
    status, page = open_server.request("GET", f"/v1/files?limit=1&after={ids[1]}")
    assert [f["id"] for f in page["data"]] == [ids[0]]
    assert [f.id for f in c.files.list(limit=2, order="asc", after=ids[1])][:2] == ids[2:4]
    for query, param in (("limit=0", "limit"), ("limit=x", "limit"), ("order=up", "order"), ("after=file-nope",
                                                                                           "after")):
        status, got = open_server.request("GET", f"/v1/files?{query}")
        assert status in (400, 404) and got["error"]["param"] == param, (query, got)


# ------------------------------------------------------------ 13: live counts are committed rows
def test_live_request_counts_are_committed_rows_only(tiny, tmp_path):
    with InProc(tmp_path / "data", tiny) as srv:
        srv.srv.batches.spec = replace(srv.srv.batches.spec, commit_seconds=3600.0)  # rows finish, none commit
        c = srv.client()
        b = _batch(c, [_batch_line(f"r{i}", f"row {i}", max_tokens=4) for i in range(200)] + ["{bad"])
        run = _wait(lambda: srv.srv.batches._running.get(b.id))
        _wait(lambda: run.loop is not None and run.loop.cp.num_done >= 10)
        got = c.batches.retrieve(b.id).request_counts
        job = tmp_path / "data" / "batches" / b.id / "job"
        assert (got.completed, got.failed) == _committed(job) == (0, 0), got
        done = _wait_batch(c, b.id, timeout=120)
    assert (done.request_counts.completed, done.request_counts.failed) == (200, 1)


# ------------------------------------------------------------ 14: an empty API key
@pytest.mark.parametrize("key", ["", "  "])
def test_empty_api_key_is_a_usage_error(tmp_path, no_model, key):
    res = cli("serve", "--model", "random:tiny", "--api-key", key, "--data", tmp_path / "data")
    assert res.exit_code == 2 and "--api-key" in res.output and "empty" in res.output, res.output


# ------------------------------------------------------------ 17: the model names a request may give
def test_model_default_and_the_served_name_are_accepted(open_server):
    for name in ("default", "random:tiny"):
        status, got = open_server.request("POST", "/v1/chat/completions",
                                          {"model": name, "messages": _chat("hi"), "max_tokens": 2})
        assert status == 200 and got["usage"]["completion_tokens"] == 2, (name, got)
    assert open_server.request("GET", "/v1/models/default")[0] == 200
    status, got = open_server.request("POST", "/v1/chat/completions",
                                      {"model": "gpt-9", "messages": _chat("hi"), "max_tokens": 2})
    assert status == 404 and got["error"]["param"] == "model"


def test_served_model_name_aliases(tiny, tmp_path):
    with InProc(tmp_path / "data", tiny, served_model_names=("my-model", "other")) as srv:
        for name in ("my-model", "other", "default", "random:tiny"):
            status, got = srv.request("POST", "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2})
            assert status == 200, (name, got)
        assert srv.request("POST", "/v1/completions", {"model": "nope", "prompt": "hi"})[0] == 404
        assert [m["id"] for m in srv.request("GET", "/v1/models")[1]["data"]] == ["random:tiny", "my-model", "other"]

