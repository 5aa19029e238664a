"""`mlxbatch serve`: a real server process on 127.0.0.1, driven by the official `openai` client."""

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_jsonl, write_jsonl

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "sk-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """`mlxbatch serve` in a subprocess; `client()` is an openai client pointed at it."""

    def __init__(self, data: Path, *args: str, model: str = "random:tiny", key: str | None = KEY):
        self.data, self.args, self.model, self.key = data, args, model, key
        self.port = _free_port()
        self.proc = None

    def start(self, timeout: float = 120) -> "ServerProc":
        cmd = [sys.executable, "-m", "mlxbatch", "serve", "--model", self.model, "--port", str(self.port),
               "--data", str(self.data), *self.args] + (["--api-key", self.key] if self.key else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = open(self.data.parent / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.read_log()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server did not start: {self.read_log()}")

    def read_log(self) -> str:
        return (self.data.parent / f"server-{self.port}.log").read_text(errors="replace")[-3000:]

    def client(self, key: str | None = None):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key or self.key or "none",
                             max_retries=0, timeout=120)

    def request(self, method: str, path: str, body=None, *, headers=None, key: str | None = "default"):
        """(status, parsed JSON or text) of one raw HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        h = dict(headers or {})
        key = self.key if key == "default" else key
        if key:
            h["Authorization"] = f"Bearer {key}"
        if isinstance(body, (dict, list)):
            body, h["Content-Type"] = json.dumps(body).encode(), "application/json"
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        raw = r.read()
        conn.close()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProc(tmp_path_factory.mktemp("serve") / "data").start()
    yield srv
    assert srv.stop() in (0, 130), srv.read_log()  # SIGTERM: a clean stop


def _chat(text: str) -> list:
    return [{"role": "user", "content": text}]


def _batch_line(cid: str, text: str, max_tokens: int = 8, url: str = "/v1/chat/completions") -> str:
    body = {"model": "random:tiny", "max_tokens": max_tokens}
    body.update({"messages": _chat(text)} if url.endswith("chat/completions") else {"prompt": text})
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _upload(client, lines: list[str]):
    return client.files.create(file=("batch.jsonl", io.BytesIO("\n".join(lines).encode() + b"\n")), purpose="batch")


def _wait_batch(client, bid: str, statuses=("completed", "failed", "cancelled"), timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.batches.retrieve(bid)
        if b.status in statuses:
            return b
        time.sleep(0.3)
    raise AssertionError(f"batch {bid} still {b.status}")


# ------------------------------------------------------------ interactive
def test_chat_and_completions_streamed_and_not(server, tiny):
    c = server.client()
    r = c.chat.completions.create(model="random:tiny", messages=_chat("Hello there"), max_tokens=7)
    prompt = tiny.tokenizer.apply_chat_template(_chat("Hello there"), add_generation_prompt=True, tokenize=True)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"  # random: models ignore EOS, as in `mlxbatch run`
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 7, len(prompt) + 7)

    chunks = list(c.chat.completions.create(model="random:tiny", messages=_chat("Hello there"), max_tokens=7,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # greedy: streamed and not agree
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7

    cr = c.completions.create(model="random:tiny", prompt="Once upon a time", max_tokens=5)
    assert cr.object == "text_completion" and cr.usage.completion_tokens == 5
    assert cr.usage.prompt_tokens == len(tiny.tokenizer.encode("Once upon a time"))
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="random:tiny", prompt="Once upon a time", max_tokens=5, stream=True) if ch.choices)
    assert streamed == cr.choices[0].text

    n = c.chat.completions.create(model="random:tiny", messages=_chat("pick"), max_tokens=6, n=3, temperature=1.0,
                                  seed=7)
    assert [ch.index for ch in n.choices] == [0, 1, 2] and n.usage.completion_tokens == 18
    again = c.chat.completions.create(model="random:tiny", messages=_chat("pick"), max_tokens=6, n=3,
                                      temperature=1.0, seed=7)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in n.choices]  # seeded
    assert [m.id for m in c.models.list().data] == ["random:tiny"]


def test_logprobs_stop_and_json_schema(server):
    c = server.client()
    r = c.chat.completions.create(model="random:tiny", messages=_chat("hi"), max_tokens=4, logprobs=True,
                                  top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert len(lp) == 4 and all(len(t.top_logprobs) == 2 for t in lp)
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
              "required": ["color"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}}
    j = c.chat.completions.create(model="random:tiny", messages=_chat("a color"), max_tokens=40, response_format=rf)
    assert json.loads(j.choices[0].message.content)["color"] in ("red", "green", "blue")
    js = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="random:tiny", messages=_chat("a color"), max_tokens=40, response_format=rf, stream=True) if ch.choices)
    assert json.loads(js) == json.loads(j.choices[0].message.content)
    full = c.completions.create(model="random:tiny", prompt="abc", max_tokens=12).choices[0].text
    stop = full[3:6]
    cut = c.completions.create(model="random:tiny", prompt="abc", max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[:full.find(stop)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="random:tiny", prompt="abc", max_tokens=12, stop=[stop], stream=True) if ch.choices)
    assert streamed == cut.choices[0].text  # nothing past the stop string was ever sent


def test_sixteen_concurrent_streams_match_run(server, tiny, tmp_path):
    """Greedy outputs of 16 concurrent streamed requests equal `mlxbatch run` over the same prompts."""
    from mlxbatch.job.spec import build_spec
    from mlxbatch.runner import run_job

    texts = [f"Question {i}: " + "tell me more " * (i % 5) for i in range(16)]
    out: dict[int, str] = {}

    def one(i: int) -> None:
        s = server.client().chat.completions.create(model="random:tiny", messages=_chat(texts[i]), max_tokens=10,
                                                    stream=True)
        out[i] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(out) == list(range(16))
    rows = write_jsonl(tmp_path / "in.jsonl", [{"id": str(i), "messages": _chat(t)} for i, t in enumerate(texts)])
    run_job(build_spec(None, {"input": rows, "model": "random:tiny", "max_tokens": 10}), lm=tiny)
    expected = {int(r["id"]): r["output"] for r in read_jsonl(tmp_path / "in.mlxbatch" / "results.jsonl")}
    assert out == expected


def test_disconnected_stream_frees_its_row(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"messages": _chat("go on"), "max_tokens": 5000, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    r.readline()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = dict(line.rsplit(" ", 1) for line in server.request("GET", "/metrics")[1].splitlines()
                 if not line.startswith("#"))
        if m["mlxbatch_rows_in_flight"] == "0" and int(m["mlxbatch_requests_cancelled_total"]) >= 1:
            return
        time.sleep(0.3)
    raise AssertionError(f"the row was not freed: {m}")


# ------------------------------------------------------------ the Batch API
def test_batch_round_trip(server):
    c = server.client()
    good = [_batch_line(f"c{i}", f"prompt number {i}") for i in range(20)]
    good += [_batch_line(f"p{i}", f"text {i}", url="/v1/completions") for i in range(3)]
    bad = ["{not json", json.dumps({"custom_id": "bad-temp", "method": "POST", "url": "/v1/chat/completions",
                                    "body": {"messages": _chat("x"), "temperature": "hot"}}),
           json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}})]
    f = _upload(c, good[:10] + bad + good[10:])
    assert f.purpose == "batch" and c.files.retrieve(f.id).bytes == f.bytes
    assert c.files.content(f.id).content.decode().count("\n") == len(good) + len(bad)
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"run": "t1"})
    assert b.status == "validating" and b.metadata == {"run": "t1"}
    b = _wait_batch(c, b.id)
    assert b.status == "completed" and b.completed_at and b.in_progress_at
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (26, 23, 3)
    outputs = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == sorted(json.loads(x)["custom_id"] for x in good)
    for o in outputs:
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert body["object"] == ("text_completion" if o["custom_id"].startswith("p") else "chat.completion")
        assert body["usage"]["completion_tokens"] == 8
    errors = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    assert sorted((e.get("custom_id") or "", e["error"]["code"]) for e in errors) == \
        [("", "invalid_json"), ("bad-temp", "invalid_field"), ("bad-url", "unsupported_url")]
    listed = c.batches.list(limit=100)
    assert b.id in [x.id for x in listed.data]
    assert c.batches.retrieve(b.id).output_file_id == b.output_file_id
    assert c.files.delete(f.id).deleted and f.id not in [x.id for x in c.files.list().data]


def test_batch_cancel_while_chat_stays_fast(server):
    c = server.client()
    f = _upload(c, [_batch_line(f"r{i}", f"row {i} " + "word " * (i % 9), max_tokens=48) for i in range(400)])
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    _wait_batch(c, b.id, statuses=("in_progress",))
    time.sleep(1.0)
    t0 = time.monotonic()
    s = c.chat.completions.create(model="random:tiny", messages=_chat("quick"), max_tokens=4, stream=True)
    first = next(iter(s))
    ttft = time.monotonic() - t0
    assert first.choices and len(list(s)) >= 1
    assert ttft < 10, ttft  # the batch does not make a chat request wait behind 400 rows
    b = c.batches.cancel(b.id)
    assert b.status in ("cancelling", "cancelled")
    b = _wait_batch(c, b.id)
    assert b.status == "cancelled" and b.cancelled_at
    assert b.request_counts.total == 400 and b.request_counts.completed < 400
    if b.output_file_id:
        lines = c.files.content(b.output_file_id).text.splitlines()
        assert len(lines) == b.request_counts.completed
        assert len({json.loads(x)["custom_id"] for x in lines}) == len(lines)
    assert server.request("POST", f"/v1/batches/{b.id}/cancel")[0] == 409


@pytest.mark.slow
def test_kill9_mid_batch_then_resume(tmp_path):
    """kill -9 while a batch runs; a new server resumes it; every custom_id is in the output once."""
    data = tmp_path / "data"
    srv = ServerProc(data).start()
    c = srv.client()
    lines = [_batch_line(f"k{i}", f"kill test {i} " + "x " * (i % 7), max_tokens=24) for i in range(240)]
    lines.insert(100, "garbage")
    b = c.batches.create(input_file_id=_upload(c, lines).id, endpoint="/v1/chat/completions",
                         completion_window="24h")
    from mlxbatch.output import journal

    job = data / "batches" / b.id / "job"
    deadline = time.monotonic() + 120
    # Committed rows (the journal), not the live count: rows counted done are committed up to a
    # second later, and a kill in between would leave nothing committed to resume from.
    while not job.is_dir() or journal.read(job).num_rows < 40:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    srv.kill9()
    on_disk = json.loads((data / "batches" / b.id / "batch.json").read_text())
    assert on_disk["status"] == "in_progress"  # killed mid-batch: the new server has something to resume
    assert 0 < journal.read(job).num_rows < 241
    srv2 = ServerProc(data)
    srv2.port = srv.port
    srv2.start()
    done = _wait_batch(srv2.client(), b.id, timeout=240)
    srv2.stop()
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (240, 1)
    out = [json.loads(x) for x in (data / "batches" / b.id / "job" / "results.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"k{i}" for i in range(240))
    errs = read_jsonl(data / "batches" / b.id / "job" / "errors.jsonl")
    assert [e["line"] for e in errs] == [101]


# ------------------------------------------------------------ errors and the API key
def _bad_requests(srv: ServerProc) -> list:
    """(name, method, path, body, headers, key, status, param)."""
    chat = "/v1/chat/completions"

    def ok(**extra):
        return {"model": "random:tiny", "messages": _chat("hi"), "max_tokens": 2, **extra}

    big = json.dumps(ok(pad="x" * (9 << 20))).encode()
    j = {"Content-Type": "application/json"}
    cases = [
        ("malformed json", "POST", chat, b"{\"messages\": [", j, "default", 400, None),
        ("body not an object", "POST", chat, [1, 2], None, "default", 400, None),
        ("temperature text", "POST", chat, ok(temperature="hot"), None, "default", 400, "temperature"),
        ("temperature negative", "POST", chat, ok(temperature=-1), None, "default", 400, "temperature"),
        ("top_p zero", "POST", chat, ok(top_p=0), None, "default", 400, "top_p"),
        ("max_tokens zero", "POST", chat, ok(max_tokens=0), None, "default", 400, "max_tokens"),
        ("max_completion_tokens negative", "POST", chat, ok(max_completion_tokens=-5), None, "default", 400,
         "max_tokens"),
        ("n zero", "POST", chat, ok(n=0), None, "default", 400, "n"),
        ("seed text", "POST", chat, ok(seed="x"), None, "default", 400, "seed"),
        ("top_logprobs too many", "POST", chat, ok(logprobs=True, top_logprobs=50), None, "default", 400,
         "top_logprobs"),
        ("logprobs text", "POST", chat, ok(logprobs="yes"), None, "default", 400, "logprobs"),
        ("stop number", "POST", chat, ok(stop=5), None, "default", 400, "stop"),
        ("no messages", "POST", chat, {"max_tokens": 2}, None, "default", 400, "messages"),
        ("bad role", "POST", chat, ok(messages=[{"role": "wizard", "content": "x"}]), None, "default", 400, None),
        ("response_format xml", "POST", chat, ok(response_format={"type": "xml"}), None, "default", 400,
         "response_format"),
        ("response_format bad schema", "POST", chat,
         ok(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
         None, "default", 400, "response_format"),
        ("stream text", "POST", chat, ok(stream="yes"), None, "default", 400, "stream"),
        ("stream_options without stream", "POST", chat, ok(stream_options={"include_usage": True}), None,
         "default", 400, "stream_options"),
        ("tools", "POST", chat, ok(tools=[{"type": "function", "function": {"name": "f"}}]), None, "default",
         400, "tools"),
        ("presence_penalty", "POST", chat, ok(presence_penalty=1.0), None, "default", 400, "presence_penalty"),
        ("unknown model", "POST", chat, ok(model="gpt-9"), None, "default", 404, "model"),
        ("completion without prompt", "POST", "/v1/completions", {"max_tokens": 2}, None, "default", 400, "prompt"),
        ("completion prompt number", "POST", "/v1/completions", {"prompt": 3}, None, "default", 400, "prompt"),
        ("unknown route", "GET", "/v1/nothing", None, None, "default", 404, None),
        ("wrong method", "GET", chat, None, None, "default", 405, None),
        ("body too large", "POST", chat, big, j, "default", 413, None),
        ("no api key", "POST", chat, ok(), None, None, 401, None),
        ("wrong api key", "POST", chat, ok(), None, "sk-wrong", 401, None),
        ("files without key", "GET", "/v1/files", None, None, None, 401, None),
        ("batches with wrong key", "GET", "/v1/batches", None, None, "sk-wrong", 401, None),
        ("unknown file", "GET", "/v1/files/file-nope", None, None, "default", 404, "file_id"),
        ("unknown file content", "GET", "/v1/files/file-nope/content", None, None, "default", 404, "file_id"),
        ("upload not multipart", "POST", "/v1/files", {"purpose": "batch"}, None, "default", 400, "file"),
        ("unknown batch", "GET", "/v1/batches/batch_nope", None, None, "default", 404, "batch_id"),
        ("cancel unknown batch", "POST", "/v1/batches/batch_nope/cancel", None, None, "default", 404, "batch_id"),
        ("batch of unknown file", "POST", "/v1/batches", {"input_file_id": "file-nope", "endpoint": chat,
                                                          "completion_window": "24h"}, None, "default", 404,
         "file_id"),
        ("batch bad endpoint", "POST", "/v1/batches", {"input_file_id": "file-nope", "endpoint": "/v1/embeddings",
                                                       "completion_window": "24h"}, None, "default", 400,
         "endpoint"),
        ("batch bad window", "POST", "/v1/batches", {"input_file_id": "file-nope", "endpoint": chat,
                                                     "completion_window": "1h"}, None, "default", 400,
         "completion_window"),
        ("batch list limit zero", "GET", "/v1/batches?limit=0", None, None, "default", 400, "limit"),
    ]
    return cases


@pytest.mark.slow
def test_bad_requests_get_openai_errors_while_a_stream_runs(tmp_path):
    srv = ServerProc(tmp_path / "data", "--max-batch", "2", "--max-queue", "0").start()
    try:
        result = {}

        def long_stream():
            s = srv.client().chat.completions.create(model="random:tiny", messages=_chat("long"), max_tokens=1500,
                                                     stream=True, stream_options={"include_usage": True})
            chunks = list(s)
            result["usage"] = chunks[-1].usage
            result["text"] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            result["at"] = time.monotonic()

        t = threading.Thread(target=long_stream)
        t.start()
        time.sleep(1.0)
        # Two slots, no queue: the stream holds one, so a request for two samples is refused.
        status, body = srv.request("POST", "/v1/chat/completions", {"messages": _chat("x"), "max_tokens": 2, "n": 2})
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        c = srv.client()
        with pytest.raises(openai.BadRequestError):
            c.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
        with pytest.raises(openai.AuthenticationError):
            srv.client(key="sk-wrong").models.list()
        cases = _bad_requests(srv)
        for name, method, path, body, headers, key, want, param in cases:
            status, got = srv.request(method, path, body, headers=headers, key=key)
            assert status == want, (name, status, got)
            assert set(got["error"]) == {"message", "type", "param", "code"} and got["error"]["message"], (name, got)
            if param:
                assert got["error"]["param"] == param, (name, got)
        assert len(cases) >= 25
        finished_before = "at" in result
        t.join(180)
        assert result["usage"].completion_tokens == 1500 and result["text"]  # unharmed
        assert not finished_before  # the stream was in flight through every bad request
        assert srv.request("GET", "/health")[0] == 200
    finally:
        srv.stop()


def test_missing_extra_is_a_clear_message(monkeypatch):
    import builtins

    from mlxbatch.errors import UsageError
    from mlxbatch.server import require_serve

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "uvicorn" else real(name, *a, **k))
    with pytest.raises(UsageError, match=r"mlxbatch\[serve\]"):
        require_serve()


# ------------------------------------------------------------ job-file settings reach the engine
def test_serve_job_files_kv_format_is_the_engines(tiny, tmp_path):
    """`serve --job FILE`: the file's KV format is applied to the server's one engine, not dropped."""
    from mlxbatch.engine.config import EngineConfig, KVFormat
    from mlxbatch.server import ServeOptions, build, serve_spec

    job = tmp_path / "job.toml"
    job.write_text('model = "random:tiny"\nkv_bits = 4\nkv_group_size = 32\nbatch_size = 6\nmax_kv_gb = 0.5\n')
    spec = serve_spec(job, {})
    srv, _ = build(spec, ServeOptions(data=tmp_path / "data"), lm=tiny)  # the engine thread is not started
    loop = srv.engine_loop
    assert loop.config == EngineConfig(max_batch=6, max_kv_gb=0.5, kv=KVFormat(4, None, 32), is_interactive=True)
    kv = loop.engine.runner.options.kv
    assert (kv.bits, kv.value_bits, kv.group_size) == (4, 4, 32)
    assert loop.engine.stats.kv_format == "4-bit, groups of 32" and loop.max_batch == 6


def test_serve_job_file_with_kv_bits_runs_a_batch(tmp_path):
    """The served process: a batch job under the job file's KV format (its engine settings are the server's)."""
    job = tmp_path / "job.toml"
    job.write_text("kv_bits = 8\n")
    srv = ServerProc(tmp_path / "data", "--job", str(job)).start()
    try:
        c = srv.client()
        f = _upload(c, [_batch_line(f"r{i}", f"Hello {i}", max_tokens=4) for i in range(3)])
        b = _wait_batch(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h").id)
        assert b.status == "completed" and b.request_counts.completed == 3, srv.read_log()
        r = c.chat.completions.create(model="random:tiny", messages=_chat("Hi"), max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        assert srv.stop() in (0, 130), srv.read_log()


@pytest.mark.parametrize("line", ['adapter = ["a=/nowhere/adapter"]', "workers = 2"])
def test_serve_refuses_job_file_settings_it_cannot_apply(tmp_path, line):
    from tests.conftest import cli

    job = tmp_path / "job.toml"
    job.write_text(f'model = "random:tiny"\n{line}\n')
    res = cli("serve", "--job", job, "--data", tmp_path / "data")
    key = line.split(" ")[0]
    assert res.exit_code == 2 and f"`{key}`: `mlxbatch serve` does not run" in res.output, res.output


# ------------------------------------------------------------ the engine's cancel
def test_engine_cancel_waiting_and_running(tiny):
    from mlxbatch.engine import Engine, Request, SamplingParams

    def run(cancel: bool) -> dict:
        eng = Engine(tiny, max_batch=2)
        for i in range(4):
            eng.add(Request(i, tiny.tokenizer.encode(f"prompt {i}"), SamplingParams(max_tokens=6)))
        out = {}
        for _ in range(3):
            out.update({c.key: c.text for c in eng.step()})
        if cancel:
            assert eng.cancel(0) and eng.cancel(3) and not eng.cancel(99)  # running, waiting, unknown
            assert {k for k, _, _ in eng.live()} == {1}
        while eng.has_work:
            out.update({c.key: c.text for c in eng.step()})
        return out

    full, cut = run(False), run(True)
    assert sorted(cut) == [1, 2] and all(cut[k] == full[k] for k in cut)


def test_engine_reuses_a_cached_prompts_head(tiny):
    """One request after another with one long system prompt: the second reuses the first's head, same tokens."""
    from mlxbatch.engine import Engine, Request, SamplingParams

    head = " ".join(["alpha beta gamma delta"] * 40)
    prompts = [tiny.tokenizer.encode(f"{head} question {i} " + "x " * i) for i in range(3)]

    def run(eng: Engine, i: int) -> list:
        eng.add(Request(i, prompts[i], SamplingParams(max_tokens=6)))
        out = []
        while eng.has_work:
            out += [c.tokens for c in eng.step()]
        return out[0]

    shared = Engine(tiny, max_batch=4)
    got = [run(shared, i) for i in range(3)]
    assert got == [run(Engine(tiny, max_batch=4), i) for i in range(3)]
    assert shared.stats.prefix_hit_tokens >= 2 * 160 and shared.stats.prompt_computed < sum(map(len, prompts)) / 2


# ------------------------------------------------------------ the embedded model
@pytest.mark.realmodel
@pytest.mark.slow
def test_embedded_model_answers(tmp_path):
    srv = ServerProc(tmp_path / "data", model="smollm2-135m", key=None).start()
    try:
        c = srv.client()
        r = c.chat.completions.create(model="smollm2-135m", messages=_chat("What is the capital of France?"),
                                      max_tokens=20)
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                  "required": ["city"], "additionalProperties": False}
        j = c.chat.completions.create(model="smollm2-135m", messages=_chat("Name the capital of France as JSON."),
                                      max_tokens=40, response_format={"type": "json_schema", "json_schema": {
                                          "name": "city", "schema": schema}})
        assert isinstance(json.loads(j.choices[0].message.content)["city"], str)
    finally:
        srv.stop()
