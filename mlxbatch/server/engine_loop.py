"""The server's one engine thread: interactive requests and batch rows share one Engine.

Owns: the thread that steps the Engine (no other thread touches it), the hand-off of requests
and cancels from other threads, routing each completion (and each streamed row's new text) back
to whoever asked, and the priority policy:

  Interactive requests come first. Batch rows are taken from their jobs' queues only into
  slots that interactive traffic leaves free, less a reserve of an eighth of the batch (the
  engine's refill step) kept for new interactive requests, and only a reserve's worth at a
  time (each admission is a prefill and a cache merge). A batch row never waits in the
  engine's queue ahead of an interactive one: when an interactive request arrives, batch rows
  not yet decoding go back to the head of their queue. When interactive requests wait and no
  slot is free, the most recently started batch rows are preempted: cancelled, put back at
  the head of their queue and later generated again from the start (their seeds are their
  own, so their output is the same).

Does not own: HTTP (server/app.py), rendering (job/render.py), batch jobs (server/batches.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from mlxbatch.engine import Engine
from mlxbatch.engine.config import EngineConfig
from mlxbatch.job.render import request_params
from mlxbatch.types import Completion, EngineStats, Item, Request

log = logging.getLogger("mlxbatch.server")

_IDLE_WAIT = 0.5  # seconds the thread sleeps with nothing to do (a submit wakes it at once)
_FEED_WAIT = 0.2  # seconds a batch job's loop waits for completions before looking at its stop flag


class QueueFull(Exception):
    """More interactive samples are in flight than the server accepts (HTTP 429)."""


@dataclass
class _Sample:
    """What a streamed sample has sent so far."""

    text: str = ""
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


class BatchFeed:
    """A batch job's view of the shared engine: what `runner.JobLoop` calls as its engine.

    The job's thread adds rendered rows (they wait here, in order) and steps (it waits for
    completions); the engine thread takes rows into free slots and delivers completions.
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
    preempted: int = 0  # batch rows taken out of the batch to make room for interactive ones
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
        self.reserve = self.max_batch // 8
        self.max_in_flight = self.max_batch + max_queue  # interactive samples, running or waiting
        self.stats = LoopStats()
        self._cv = threading.Condition()
        self._inbox: deque[tuple[str, object]] = deque()
        self._in_flight = 0  # interactive samples accepted, not finished (read by submit under _cv)
        self._tickets: dict[int, Ticket] = {}
        self._feeds: dict[int, BatchFeed] = {}
        self._batch: dict[tuple, tuple[BatchFeed, Request]] = {}  # engine key -> its feed and request
        self._batch_started: OrderedDict[tuple, None] = OrderedDict()  # batch keys decoding, oldest first
        self._inter_waiting: set[tuple] = set()  # interactive keys not decoding yet
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
        return len(self._inter_waiting)

    @property
    def num_queued_batch(self) -> int:
        return sum(f.num_waiting for f in list(self._feeds.values()))

    # ------------------------------------------------------------ the engine thread
    def _run(self) -> None:
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
                self._schedule()
                if self.engine.has_work:
                    self._route(self.engine.step())
                    self._stream()
            except Exception as exc:  # a failed step (out of memory, a bug): fail what ran, keep serving
                log.exception("engine step failed")
                self._recover(exc)
        for t in list(self._tickets.values()):
            t.push(("error", "the server is shutting down"))

    def _has_batch_rows(self) -> bool:
        return any(f.num_waiting for f in self._feeds.values())

    def _on_add(self, t: Ticket) -> None:
        self.stats.requests += 1
        self._tickets[t.id] = t
        t.sent = [_Sample() for _ in range(t.item.n)]
        t.remaining = t.item.n
        t.hold = max((len(s) for s in t.item.params.stop), default=0)
        for s in range(t.item.n):
            key = ("i", t.id, s)
            self.engine.add(Request(key, t.item.tokens, request_params(t.item, s), t.guides[s] if t.guides else None))
            self._inter_waiting.add(key)
        self._requeue_batch_waiting()

    def _on_cancel(self, t: Ticket) -> None:
        if self._tickets.pop(t.id, None) is None:
            return  # already finished
        for s in range(t.item.n):
            key = ("i", t.id, s)
            if self.engine.cancel(key):
                self.stats.cancelled += 1
            self._inter_waiting.discard(key)
        self._finish_interactive(t.remaining)

    def _on_feed(self, feed: BatchFeed) -> None:
        self._feeds[feed.fid] = feed

    def _on_close(self, feed: BatchFeed) -> None:
        self._feeds.pop(feed.fid, None)
        for key in [k for k, (f, _) in self._batch.items() if f is feed]:
            self.engine.cancel(key)
            self._forget_batch(key)

    def _finish_interactive(self, samples: int) -> None:
        with self._cv:
            self._in_flight -= samples

    # -- priority
    def _requeue_batch_waiting(self) -> None:
        """Batch rows not decoding yet go back to their queues: the interactive request goes first."""
        for key in [k for k in self._batch if k not in self._batch_started]:
            if self.engine.cancel(key):
                self._put_back(key)

    def _schedule(self) -> None:
        eng = self.engine
        if not eng.has_work:
            self._inter_waiting.clear()  # nothing can be waiting in an idle engine (a stale key must not block batches)
        waiting = len(self._inter_waiting)
        if waiting:
            # The engine admits while the free slots outnumber its queue (or are an eighth of the batch).
            need = min(waiting + 1, self.max_batch) - (self.max_batch - eng.num_active)
            for key in list(reversed(self._batch_started))[:max(need, 0)]:
                eng.cancel(key)
                self._put_back(key)
                self.stats.preempted += 1
            return
        step = max(self.reserve, 1)
        room = self.max_batch - self.reserve - eng.num_active - eng.num_waiting
        if room <= 0 or (eng.num_active and room < step):
            return
        room = min(room, step)  # one unit's prefill is what a chat request arriving now may wait behind
        for feed in list(self._feeds.values()):
            for r in feed.take(room):
                key = ("b", feed.fid, r.key)
                self._batch[key] = (feed, r)
                eng.add(Request(key, r.tokens, r.params, r.guide))
                room -= 1
            if room <= 0:
                return

    def _put_back(self, key: tuple) -> None:
        feed, request = self._batch[key]
        self._forget_batch(key)
        feed.put_back([request])

    def _forget_batch(self, key: tuple) -> None:
        self._batch.pop(key, None)
        self._batch_started.pop(key, None)

    # -- results
    def _route(self, done: list[Completion]) -> None:
        for c in done:
            kind, owner, sub = c.key
            if kind == "b":
                entry = self._batch.get(c.key)
                self._forget_batch(c.key)
                if entry is not None:
                    self.stats.batch_rows += 1
                    entry[0].deliver(Completion(sub, c.text, c.tokens, c.finish_reason, c.prompt_tokens, c.logprobs))
                continue
            self._inter_waiting.discard(c.key)
            t = self._tickets.get(owner)
            if t is None:
                continue
            t.push(("done", sub, c))
            t.remaining -= 1
            self._finish_interactive(1)
            if t.remaining == 0:
                del self._tickets[owner]

    def _stream(self) -> None:
        """Note which rows now decode, and send each streamed sample's new text."""
        for key, tokens, logprobs in self.engine.live():
            if key[0] == "b":
                if key not in self._batch_started:
                    self._batch_started[key] = None
                continue
            self._inter_waiting.discard(key)
            t = self._tickets.get(key[1])
            if t is not None and t.is_stream:
                self._send_delta(t, key[2], tokens, logprobs)

    def _send_delta(self, t: Ticket, s: int, tokens: list, logprobs: list | None) -> None:
        sent = t.sent[s]
        text = self.lm.tokenizer.decode(tokens)
        safe = text[: len(text) - t.hold] if t.hold else text
        safe = safe.rstrip("\ufffd")  # a character cut between tokens: wait for the rest
        new_lp = logprobs[sent.num_logprobs:] if logprobs is not None else None
        if len(safe) <= len(sent.text) or not safe.startswith(sent.text):
            return
        t.push(("delta", s, safe[len(sent.text):], new_lp))
        sent.text = safe
        if logprobs is not None:
            sent.num_logprobs = len(logprobs)

    def _recover(self, exc: Exception) -> None:
        """A step raised: every interactive request in it fails, batch rows go back; a fresh engine."""
        self.stats.engine_errors += 1
        for t in list(self._tickets.values()):
            t.push(("error", f"generation failed: {exc}"))
            self._finish_interactive(t.remaining)
        self._tickets.clear()
        self._inter_waiting.clear()
        for key in list(self._batch):
            self._put_back(key)
        self.engine = self._factory()
        time.sleep(0.1)
