"""The server's one engine thread: interactive requests and batch rows share one Engine.

Owns: the thread that steps the Engine (no other thread touches it), the hand-off of requests
and cancels from other threads, and routing each completion (and each streamed sample's new
text, decoded incrementally) back to whoever asked. Priority is the engine scheduler's
(types.Priority): interactive requests are admitted first; batch rows fill the slots they leave,
less a reserve of an eighth of the batch kept for new interactive requests, a reserve's worth at
a time. A batch row once admitted runs to its end: nothing is cancelled and redone for priority.
Batch rows go from their jobs' queues into the engine's a window at a time (the scheduler groups
what it sees by shared prefix). A step's events reach each event loop in one hand-off.

Does not own: HTTP (server/app.py), rendering (job/render.py), batch jobs (server/batches.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from mlxbatch.engine import Engine
from mlxbatch.engine.config import EngineConfig
from mlxbatch.job.render import request_params
from mlxbatch.models.tokenizer import StreamingDecoder
from mlxbatch.types import Completion, EngineStats, Item, Priority, Request

log = logging.getLogger("mlxbatch.server")

_IDLE_WAIT = 0.5  # seconds the thread sleeps with nothing to do (a submit wakes it at once)
_FEED_WAIT = 0.2  # seconds a batch job's loop waits for completions before looking at its stop flag


class QueueFull(Exception):
    """More interactive samples are in flight than the server accepts (HTTP 429)."""


@dataclass
class _Sample:
    """What a streamed sample has sent so far, and its incremental decoder."""

    decoder: StreamingDecoder
    num_chars: int = 0
    num_logprobs: int = 0


@dataclass
class Ticket:
    """One interactive request: its rendered item, and where its events go (an asyncio queue).

    Events: ("delta", sample, text, logprob entries), ("done", sample, Completion), ("error", message).
    """

    item: Item
    is_stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    guides: list = field(default_factory=list)
    id: int = 0
    sent: list = field(default_factory=list)
    remaining: int = 0
    hold: int = 0  # characters held back while streaming: a stop string may still complete there

    def push(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
            pass


def engine_step_metrics(e: EngineStats) -> list[tuple]:
    """/metrics lines on where engine steps spend their time (scripts/serve_bench.py reads them)."""
    return [
        ("mlxbatch_engine_steps_total", "counter", "engine steps", e.steps),
        ("mlxbatch_engine_step_seconds_total", "counter", "wall time inside engine steps", round(e.step_seconds, 4)),
        ("mlxbatch_engine_sync_seconds_total", "counter", "of which waiting for the device", round(e.sync_seconds, 4)),
        ("mlxbatch_engine_step_seconds_max", "gauge", "the slowest engine step", round(e.step_max_seconds, 4)),
        ("mlxbatch_engine_slow_steps_total", "counter", "engine steps over 200 ms", e.slow_steps),
        ("mlxbatch_compiles_total", "counter", "compiled functions traced (each a compile)", e.traces),
        ("mlxbatch_compile_steps_total", "counter", "engine steps that compiled", e.trace_steps),
        ("mlxbatch_prefill_step_tokens_total", "counter", "prefill tokens computed inside steps", e.prefill_step_tokens),
        ("mlxbatch_prefill_steps_total", "counter", "engine steps that prefilled", e.prefill_steps),
        ("mlxbatch_step_prefill_tokens_max", "gauge", "most prefill tokens in one step", e.step_max_prefill_tokens),
    ]


def _put_all(items: list) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class BatchFeed:
    """A batch job's view of the shared engine: what `runner.JobLoop` calls as its engine.

    The job's thread adds rendered rows (they wait here, in order) and steps (it waits for
    completions); the engine thread moves rows into the engine and delivers completions.
    """

    def __init__(self, owner: "EngineLoop", fid: int):
        self._owner, self.fid = owner, fid
        self.max_batch = owner.engine.max_batch
        self.stats = EngineStats(capacity=self.max_batch)
        self.workers: list = []  # no workers: the shared engine runs in this process
        self._queue: deque[Request] = deque()
        self._done: list[Completion] = []
        self._cv = threading.Condition()
        self._outstanding = 0  # added, not yet delivered
        self.in_engine: dict = {}  # row key -> request, for rows handed to the engine (engine thread only)

    # -- the job's thread (Engine's interface, as JobLoop uses it)
    def add(self, request: Request) -> None:
        with self._cv:
            self._queue.append(request)
            self._outstanding += 1
        self._owner.wake()

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    @property
    def has_work(self) -> bool:
        return self._outstanding > 0

    def step(self) -> list[Completion]:
        with self._cv:
            if not self._done:
                self._cv.wait(_FEED_WAIT)
            out, self._done = self._done, []
            self._outstanding -= len(out)
        return out

    def wait_started(self, while_waiting=lambda: False) -> None:
        """Nothing to start: the engine thread is already running."""

    def close(self) -> None:
        self._owner.close_feed(self)

    # -- the engine thread
    def take(self, limit: int) -> list[Request]:
        with self._cv:
            return [self._queue.popleft() for _ in range(min(limit, len(self._queue)))]

    def put_back(self, requests: list[Request]) -> None:
        with self._cv:
            self._queue.extendleft(reversed(requests))

    def deliver(self, c: Completion) -> None:
        with self._cv:
            self._done.append(c)
            self.stats.prompt_tokens += c.prompt_tokens
            self.stats.generated_tokens += c.completion_tokens
            self._cv.notify()


@dataclass
class LoopStats:
    """Counters /metrics shows beyond the engine's own."""

    requests: int = 0  # interactive requests admitted
    rejected: int = 0  # refused with 429
    cancelled: int = 0  # interactive samples dropped (client gone)
    preempted: int = 0  # kept for /metrics: 0 since priority is the scheduler's (no row is redone)
    batch_rows: int = 0  # batch samples completed
    engine_errors: int = 0


class EngineLoop:
    """Owns the Engine and its thread; every public method is safe from any thread."""

    def __init__(self, lm, config: EngineConfig | None = None, *, max_queue: int = 1024, engine_factory=Engine):
        self.lm = lm
        self.config = config = config or EngineConfig()  # the server's one engine configuration
        self._factory = lambda: engine_factory(lm, config)
        self.engine = self._factory()
        self.max_batch = self.engine.max_batch
        self.max_in_flight = self.max_batch + max_queue  # interactive samples, running or waiting
        self.stats = LoopStats()
        self._cv = threading.Condition()
        self._inbox: deque[tuple[str, object]] = deque()
        self._in_flight = 0  # interactive samples accepted, not finished (read by submit under _cv)
        self._tickets: dict[int, Ticket] = {}
        self._feeds: dict[int, BatchFeed] = {}
        self._outbox: dict = {}  # event loop -> [(queue, event)] of this step, handed over at once
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlxbatch-engine", daemon=True)

    # ------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def submit(self, ticket: Ticket) -> None:
        """Queue an interactive request; QueueFull when the server holds as many as it accepts."""
        with self._cv:
            if self._in_flight + ticket.item.n > self.max_in_flight:
                self.stats.rejected += 1
                raise QueueFull(f"the server has {self._in_flight} requests in flight (limit "
                                f"{self.max_in_flight}); retry later")
            self._in_flight += ticket.item.n
            ticket.id = next(self._ids)
            self._inbox.append(("add", ticket))
            self._cv.notify()

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: its rows leave the batch at the next step."""
        with self._cv:
            self._inbox.append(("cancel", ticket))
            self._cv.notify()

    def open_feed(self) -> BatchFeed:
        with self._cv:
            feed = BatchFeed(self, next(self._ids))
            self._inbox.append(("feed", feed))
            self._cv.notify()
        return feed

    def close_feed(self, feed: BatchFeed) -> None:
        with self._cv:
            self._inbox.append(("close", feed))
            self._cv.notify()

    @property
    def num_queued_interactive(self) -> int:
        return self.engine.scheduler.count(Priority.INTERACTIVE)

    @property
    def num_queued_batch(self) -> int:
        waiting = sum(f.num_waiting for f in list(self._feeds.values()))
        return waiting + self.engine.scheduler.count(Priority.BATCH)

    # ------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        self._warm_up()
        while True:
            with self._cv:
                while not (self._stopping or self._inbox or self.engine.has_work or self._has_batch_rows()):
                    self._cv.wait(_IDLE_WAIT)
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, deque()
            for op, arg in inbox:
                getattr(self, "_on_" + op)(arg)
            try:
                self._feed_batch_rows()
                if self.engine.has_work:
                    self._route(self.engine.step())
                    self._stream()
            except Exception as exc:  # a failed step (out of memory, a bug): fail what ran, keep serving
                log.exception("engine step failed")
                self._recover(exc)
            self._flush()
        for t in list(self._tickets.values()):
            t.push(("error", "the server is shutting down"))

    def _warm_up(self) -> None:
        """Compile the decode's shapes before the first request (requests arriving meanwhile wait)."""
        t0 = time.perf_counter()
        try:
            traces = self.engine.warm_up()
        except Exception:  # a warm-up is an optimization: serve without it
            log.exception("warm-up failed")
            return
        log.info("warm-up: %d compiles in %.1f s", traces, time.perf_counter() - t0)

    def _has_batch_rows(self) -> bool:
        return any(f.num_waiting for f in self._feeds.values())

    def _post(self, t: Ticket, event: tuple) -> None:
        self._outbox.setdefault(t.loop, []).append((t.events, event))

    def _flush(self) -> None:
        """This step's events, one hand-off per event loop (not one wake-up per token)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
                pass

    def _on_add(self, t: Ticket) -> None:
        self.stats.requests += 1
        self._tickets[t.id] = t
        t.sent = [_Sample(StreamingDecoder(self.lm.tokenizer)) for _ in range(t.item.n)] if t.is_stream else []
        t.remaining = t.item.n
        t.hold = max((len(s) for s in t.item.params.stop), default=0)
        for s in range(t.item.n):
            self.engine.add(Request(("i", t.id, s), t.item.tokens, request_params(t.item, s),
                                    t.guides[s] if t.guides else None, priority=Priority.INTERACTIVE))

    def _on_cancel(self, t: Ticket) -> None:
        if self._tickets.pop(t.id, None) is None:
            return  # already finished
        for s in range(t.item.n):
            if self.engine.cancel(("i", t.id, s)):
                self.stats.cancelled += 1
        self._finish_interactive(t.remaining)

    def _on_feed(self, feed: BatchFeed) -> None:
        self._feeds[feed.fid] = feed

    def _on_close(self, feed: BatchFeed) -> None:
        self._feeds.pop(feed.fid, None)
        for key in feed.in_engine:
            self.engine.cancel(("b", feed.fid, key))
        feed.in_engine.clear()

    def _finish_interactive(self, samples: int) -> None:
        with self._cv:
            self._in_flight -= samples

    def _feed_batch_rows(self) -> None:
        """Keep a window of batch rows waiting in the engine (its scheduler ranks them after
        interactive requests): a batch's rows enter as slots free, never ahead of a chat request."""
        room = self.max_batch - self.engine.scheduler.count(Priority.BATCH)
        for feed in list(self._feeds.values()):
            if room <= 0:
                return
            for r in feed.take(room):
                feed.in_engine[r.key] = r
                self.engine.add(Request(("b", feed.fid, r.key), r.tokens, r.params, r.guide, r.adapter,
                                        priority=Priority.BATCH))
                room -= 1

    # -- results
    def _route(self, done: list[Completion]) -> None:
        for c in done:
            kind, owner, sub = c.key
            if kind == "b":
                feed = self._feeds.get(owner)
                if feed is not None and feed.in_engine.pop(sub, None) is not None:
                    self.stats.batch_rows += 1
                    feed.deliver(Completion(sub, c.text, c.tokens, c.finish_reason, c.prompt_tokens, c.logprobs,
                                            c.error))
                continue
            t = self._tickets.get(owner)
            if t is None:
                continue
            self._post(t, ("done", sub, c))
            t.remaining -= 1
            self._finish_interactive(1)
            if t.remaining == 0:
                del self._tickets[owner]

    def _stream(self) -> None:
        """Send each streamed sample's new text."""
        for key, tokens, logprobs in self.engine.live():
            if key[0] == "i":
                t = self._tickets.get(key[1])
                if t is not None and t.is_stream:
                    self._send_delta(t, key[2], tokens, logprobs)

    def _send_delta(self, t: Ticket, s: int, tokens: list, logprobs: list | None) -> None:
        sent = t.sent[s]
        if not sent.decoder.add(tokens):
            return
        end = len(sent.decoder.text) - t.hold
        if end <= sent.num_chars:
            return
        new_lp = logprobs[sent.num_logprobs:] if logprobs is not None else None
        self._post(t, ("delta", s, sent.decoder.text[sent.num_chars:end], new_lp))
        sent.num_chars = end
        if logprobs is not None:
            sent.num_logprobs = len(logprobs)

    def _recover(self, exc: Exception) -> None:
        """A step raised: every interactive request in it fails, batch rows go back; a fresh engine."""
        self.stats.engine_errors += 1
        for t in list(self._tickets.values()):
            self._post(t, ("error", f"generation failed: {exc}"))
            self._finish_interactive(t.remaining)
        self._tickets.clear()
        for feed in self._feeds.values():
            feed.put_back(list(feed.in_engine.values()))
            feed.in_engine.clear()
        self.engine = self._factory()
        time.sleep(0.1)
