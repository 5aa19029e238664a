"""The HTTP routes: OpenAI's chat/completions (streamed or not), models, files, batches; health, metrics.

Owns: reading and limiting request bodies, the API key, turning a request body into an Item by the
very rules a Batch line follows (it is rendered as one: `job/render.py`, whose `job/openai_body.py`
refuses the OpenAI fields mlxbatch cannot honour and checks `model` and tools), the server-only
fields (`stream`, `stream_options`), response and SSE chunk shapes (bodies from
`output/records.py`; streamed content, reasoning and tool calls split by `chat/parse.py`), and
OpenAI-shaped errors for every failure. Does not own: the engine thread
(server/engine_loop.py) or batches (server/batches.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mlxbatch.chat.tools import openai_calls
from mlxbatch.errors import RowError
from mlxbatch.job.grammar import GrammarError, Grammars
from mlxbatch.job.render import Renderer
from mlxbatch.output.records import RecordMaker
from mlxbatch.server.batches import BatchStore
from mlxbatch.server.engine_loop import EngineLoop, QueueFull, Ticket, engine_step_metrics
from mlxbatch.server.errors import ApiError, from_row_error
from mlxbatch.server.files import FileStore, boundary_of
from mlxbatch.server.guard import guard
from mlxbatch.types import Row

log = logging.getLogger("mlxbatch.server")

MAX_BODY_BYTES = 8 << 20  # a request body (the same cap as one input line of a job)
MAX_UPLOAD_BYTES = 1 << 30  # an uploaded batch file
_UPLOAD_PIECE = 1 << 20  # upload bytes handed to the worker thread at a time
_POLL_SECONDS = 1.0  # how often a waiting non-streamed request checks that its client is still there


class _LockedGrammars(Grammars):
    """One grammar cache for the server: request handlers and batch jobs make guides from many threads."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self._lock = threading.Lock()

    def guide(self, c):
        with self._lock:
            return super().guide(c)


@dataclass
class Server:
    lm: object
    engine_loop: EngineLoop
    files: FileStore
    batches: BatchStore
    renderer: Renderer
    maker: RecordMaker
    grammars: Grammars
    api_key: str | None = None
    started: float = 0.0
    aliases: tuple[str, ...] = ()  # --served-model-name

    @property
    def model_names(self) -> set[str]:
        """What a request's `model` may say: the one rule (LoadedModel.names) Batch lines follow too, and aliases."""
        return self.lm.names | set(self.aliases)


def _json(data, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(err: ApiError) -> Response:
    return _json(err.body, err.status)


# ------------------------------------------------------------ request bodies
async def _read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is {int(length):,} bytes; the limit is {limit:,}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit:,} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Request) -> dict:
    raw = await _read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    return body


def _check_openai_fields(srv: Server, body: dict) -> tuple[bool, bool]:
    """(stream, include_usage): the fields only an interactive request has (the rest: `_render`)."""
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", param="stream", code="invalid_value")
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and isinstance(opts.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                       param="stream_options", code="invalid_value")
    if opts is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options",
                       code="invalid_value")
    return bool(stream), bool(opts and opts.get("include_usage"))


def _render(srv: Server, endpoint: str, body: dict):
    """The body rendered exactly as a Batch line with it would be (same rules, same messages)."""
    if body.get("seed") is None:  # else every unseeded request would draw the same sample
        body = {**body, "seed": secrets.randbits(31)}
    row = Row(0, 0, {"custom_id": "request", "method": "POST", "url": endpoint, "body": body})
    item = srv.renderer.render_many([row])[0]
    if isinstance(item, RowError):
        raise from_row_error(item)
    try:
        guides = [srv.grammars.guide(item.params.constraint) for _ in range(item.n)] \
            if item.params.constraint is not None else []
    except GrammarError as exc:
        raise ApiError(400, f"response_format: {exc}", param="response_format", code="invalid_schema") from None
    return item, guides


# ------------------------------------------------------------ generation
async def _generate(request: Request, endpoint: str) -> Response:
    srv: Server = request.app.state.server
    body = await _json_body(request)
    is_stream, include_usage = _check_openai_fields(srv, body)
    item, guides = await run_in_threadpool(_render, srv, endpoint, body)
    ticket = Ticket(item, is_stream, asyncio.get_running_loop(), asyncio.Queue(), guides)
    try:
        srv.engine_loop.submit(ticket)
    except QueueFull as exc:
        raise ApiError(429, str(exc), code="queue_full") from None
    rid = ("cmpl-" if item.kind == "openai-completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
    if is_stream:
        return StreamingResponse(_sse(srv, ticket, rid, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done = [None] * item.n
    try:
        while any(c is None for c in done):
            try:
                event = await asyncio.wait_for(ticket.events.get(), _POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    srv.engine_loop.cancel(ticket)
                    return Response(status_code=499)
                continue
            if event[0] == "error":
                raise ApiError(500, event[1], code="engine_error")
            if event[0] == "done":
                done[event[1]] = event[2]
    except BaseException:
        srv.engine_loop.cancel(ticket)
        raise
    return _json(srv.maker.openai_body(item, done, rid))


async def _sse(srv: Server, t: Ticket, rid: str, include_usage: bool):
    """Server-sent events: one chunk per delta, a finish chunk per choice, usage if asked, [DONE]."""
    item, created = t.item, int(time.time())
    is_chat = item.kind != "openai-completion"
    model = item.model_field or srv.lm.name
    obj = "chat.completion.chunk" if is_chat else "text_completion"
    sent = [""] * item.n
    lps_sent = [0] * item.n
    left, prompt_tokens, completion_tokens = item.n, 0, 0
    finished = False
    parsers = [srv.maker.stream_parser(item) if is_chat else None for _ in range(item.n)]
    num_calls = [0] * item.n

    def chunk(choices: list, **extra) -> bytes:
        data = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra}
        if include_usage and "usage" not in data:
            data["usage"] = None
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def choice(s: int, text: str, lps, finish: str | None, first: bool = False, delta: dict | None = None) -> dict:
        if is_chat:
            if delta is None:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            lp = srv.maker.chat_logprobs(lps) if lps else None
            return {"index": s, "delta": delta, "logprobs": lp, "finish_reason": finish}
        lp = srv.maker.completion_logprobs(lps, len(sent[s])) if lps else None
        return {"text": text, "index": s, "logprobs": lp, "finish_reason": finish}

    def parsed(s: int, text: str, lps, finish: str | None, *, is_last: bool = False) -> list[bytes]:
        """Chunks of one sample's text split into content, reasoning_content and tool_calls deltas."""
        events = parsers[s].feed(text) + (parsers[s].finish() if is_last else [])
        deltas = []
        for kind, value in events:
            if kind == "tool_call":
                call = openai_calls([value], f"{rid}:{s}", start=num_calls[s])[0]
                deltas.append({"tool_calls": [{"index": num_calls[s], **call}]})
                num_calls[s] += 1
            else:
                deltas.append({"content" if kind == "content" else "reasoning_content": value})
        if finish is not None and num_calls[s] and finish == "stop":
            finish = "tool_calls"
        if not deltas and (lps or finish is not None):
            deltas = [{}]
        return [chunk([choice(s, "", lps if k == 0 else None, finish if k == len(deltas) - 1 else None,
                              delta=d)]) for k, d in enumerate(deltas)]

    try:
        if is_chat:
            yield chunk([choice(s, "", None, None, first=True) for s in range(item.n)])
        while left:
            event = await t.events.get()
            if event[0] == "error":
                yield b"data: " + orjson.dumps(ApiError(500, event[1], code="engine_error").body) + b"\n\n"
                break
            s = event[1]
            if event[0] == "delta":
                _, _, text, lps = event
                for data in parsed(s, text, lps, None) if parsers[s] else [chunk([choice(s, text, lps, None)])]:
                    yield data
                sent[s] += text
                lps_sent[s] += len(lps or ())
                continue
            c = event[2]
            rest = c.text[len(sent[s]):] if c.text.startswith(sent[s]) else ""
            lps = c.logprobs[lps_sent[s]:] if c.logprobs is not None else None
            if parsers[s]:
                for data in parsed(s, rest, lps, c.finish_reason, is_last=True):
                    yield data
            else:
                yield chunk([choice(s, rest, lps, c.finish_reason)])
            left -= 1
            prompt_tokens = c.prompt_tokens
            completion_tokens += c.completion_tokens
        else:
            finished = True
            if include_usage:
                yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens})
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:
            srv.engine_loop.cancel(t)  # the client went away (or the engine failed): free its rows


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "/v1/chat/completions")


async def completions(request: Request) -> Response:
    return await _generate(request, "/v1/completions")


# ------------------------------------------------------------ models, health, metrics
async def list_models(request: Request) -> Response:
    srv: Server = request.app.state.server
    names = dict.fromkeys((srv.lm.name, *srv.aliases))
    return _json({"object": "list", "data": [_model(srv, name) for name in names]})


async def get_model(request: Request) -> Response:
    srv: Server = request.app.state.server
    if request.path_params["model"] not in srv.model_names:
        raise ApiError(404, f"the model {request.path_params['model']!r} does not exist", param="model",
                       code="model_not_found")
    return _json(_model(srv, request.path_params["model"]))


def _model(srv: Server, name: str) -> dict:
    return {"id": name, "object": "model", "created": int(srv.started), "owned_by": "mlxbatch"}


async def health(request: Request) -> Response:
    return _json({"status": "ok"})


async def metrics(request: Request) -> Response:
    srv: Server = request.app.state.server
    loop = srv.engine_loop
    e, ls = loop.engine.stats, loop.stats
    now = time.monotonic()
    last = request.app.state.rate
    tps = (e.generated_tokens - last[1]) / max(now - last[0], 1e-9) if now > last[0] else 0.0
    if now - last[0] > 1.0:
        request.app.state.rate = (now, e.generated_tokens)
    values = [
        ("mlxbatch_queue_depth", "gauge", "interactive samples waiting for a slot", loop.num_queued_interactive),
        ("mlxbatch_batch_queue_depth", "gauge", "batch rows rendered and waiting for a slot", loop.num_queued_batch),
        ("mlxbatch_rows_in_flight", "gauge", "rows decoding in the engine", e.active),
        ("mlxbatch_batch_capacity", "gauge", "rows the engine decodes together", e.capacity),
        ("mlxbatch_generated_tokens_total", "counter", "tokens generated", e.generated_tokens),
        ("mlxbatch_prompt_tokens_total", "counter", "prompt tokens admitted", e.prompt_tokens),
        ("mlxbatch_prompt_computed_tokens_total", "counter", "prompt tokens run through the model", e.prompt_computed),
        ("mlxbatch_prefix_hit_tokens_total", "counter", "prompt tokens served from the prefix cache",
         e.prefix_hit_tokens),
        ("mlxbatch_tokens_per_second", "gauge", "generated tokens per second since the last scrape", round(tps, 2)),
        ("mlxbatch_kv_bytes", "gauge", "KV cache bytes held by the running batch", e.kv_bytes),
        ("mlxbatch_prefix_cache_bytes", "gauge", "bytes of computed prefixes kept", e.prefix_cache_bytes),
        ("mlxbatch_requests_total", "counter", "interactive requests admitted", ls.requests),
        ("mlxbatch_requests_rejected_total", "counter", "requests refused with 429", ls.rejected),
        ("mlxbatch_requests_cancelled_total", "counter", "samples dropped when their client left", ls.cancelled),
        ("mlxbatch_batch_rows_total", "counter", "batch samples completed", ls.batch_rows),
        ("mlxbatch_batch_preempted_total", "counter", "batch rows preempted for interactive ones", ls.preempted),
        ("mlxbatch_engine_errors_total", "counter", "failed engine steps", ls.engine_errors),
        *engine_step_metrics(e),
    ]
    lines = []
    for name, kind, help_, v in values:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {v}"]
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


# ------------------------------------------------------------ files
async def create_file(request: Request) -> Response:
    """The body is handed to a worker thread in ~1 MiB pieces: parsing and disk writes never hold up the loop."""
    srv: Server = request.app.state.server
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_UPLOAD_BYTES + (1 << 20):
        raise ApiError(413, f"upload is {int(length):,} bytes; the limit is {MAX_UPLOAD_BYTES:,}",
                       code="file_too_large")
    upload = srv.files.open_upload(boundary_of(request.headers.get("content-type", "")), max_bytes=MAX_UPLOAD_BYTES)
    try:
        piece = bytearray()
        async for chunk in request.stream():
            piece += chunk
            if len(piece) >= _UPLOAD_PIECE:
                await run_in_threadpool(upload.write, bytes(piece))
                piece.clear()
        await run_in_threadpool(upload.write, bytes(piece))
        meta = await run_in_threadpool(upload.finish)
    except ClientDisconnect:
        upload.abort()
        return Response(status_code=499)  # nobody is left to answer
    except BaseException:
        upload.abort()
        raise
    return _json(FileStore.public(meta))


async def list_files(request: Request) -> Response:
    srv: Server = request.app.state.server
    q = request.query_params
    limit = _int_param(q, "limit", 10_000, 1, 10_000)
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order", code="invalid_value")
    return _json(srv.files.page(purpose=q.get("purpose"), limit=limit, after=q.get("after"), order=order))


def _int_param(q, name: str, default: int, low: int, high: int) -> int:
    raw = q.get(name, str(default))
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"{name} must be an integer in [{low}, {high}], got {raw!r}", param=name,
                       code="invalid_value")
    return int(raw)


async def get_file(request: Request) -> Response:
    srv: Server = request.app.state.server
    return _json(FileStore.public(srv.files.get(request.path_params["file_id"])))


async def file_content(request: Request) -> Response:
    srv: Server = request.app.state.server
    meta = srv.files.get(request.path_params["file_id"])
    return StreamingResponse(srv.files.read_chunks(meta), media_type="application/jsonl")


async def delete_file(request: Request) -> Response:
    srv: Server = request.app.state.server
    return _json(await run_in_threadpool(srv.batches.delete_file, request.path_params["file_id"]))


# ------------------------------------------------------------ batches
async def create_batch(request: Request) -> Response:
    srv: Server = request.app.state.server
    body = await _json_body(request)
    return _json(BatchStore.public(await run_in_threadpool(srv.batches.create, body)))


async def get_batch(request: Request) -> Response:
    srv: Server = request.app.state.server
    return _json(BatchStore.public(srv.batches.get(request.path_params["batch_id"])))


async def list_batches(request: Request) -> Response:
    srv: Server = request.app.state.server
    limit = _int_param(request.query_params, "limit", 20, 1, 100)
    page = srv.batches.list(limit=limit, after=request.query_params.get("after"))
    page["data"] = [BatchStore.public(b) for b in page["data"]]
    return _json(page)


async def cancel_batch(request: Request) -> Response:
    srv: Server = request.app.state.server
    return _json(BatchStore.public(await run_in_threadpool(srv.batches.cancel, request.path_params["batch_id"])))


# ------------------------------------------------------------ the app
class _ApiKey:
    """ASGI middleware: every /v1 route needs `Authorization: Bearer KEY` when the server has a key."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key is not None and scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given, f"Bearer {self.key}"):
                what = "no API key given" if not given else "the API key is wrong"
                err = ApiError(401, f"{what}: send 'Authorization: Bearer KEY'", code="invalid_api_key")
                await _error(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return _error(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(ApiError(exc.status_code, exc.detail or "error", code="not_found" if exc.status_code == 404 else None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    # The exception's text may name server paths: it goes to the log, not to the client.
    return _error(ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                           code="internal_error"))


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/files", create_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]


def build_app(srv: Server, *, on_start=None, on_stop=None, host: str = "127.0.0.1",
              allowed_hosts: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = ()) -> object:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if on_start:
            on_start()
        try:
            yield
        finally:
            if on_stop:
                await run_in_threadpool(on_stop)

    app = Starlette(routes=ROUTES, lifespan=lifespan, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.server = srv
    app.state.rate = (time.monotonic(), 0)
    return guard(_ApiKey(app, srv.api_key), host=host, allowed_hosts=allowed_hosts,
                 allowed_origins=allowed_origins)
