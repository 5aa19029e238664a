"""The server's engine thread in process (no HTTP): priority, streaming, events."""

import asyncio
import time

import pytest

from mlxbatch.engine import Engine
from mlxbatch.engine.config import EngineConfig
from mlxbatch.models.tokenizer import StreamingDecoder
from mlxbatch.server.engine_loop import EngineLoop, Ticket
from mlxbatch.types import Item, Request, SamplingParams


def test_streaming_decoder_equals_full_decode_over_split_characters(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("héllo 世界 🎉🎉 naïve — Ωμέγα\n\n  𝔘𝔫𝔦 done", add_special_tokens=False)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some characters are split over tokens
    for tokens in (ids, ids[:-3], list(reversed(ids))):  # also ending inside a character
        d, out = StreamingDecoder(tok), ""
        for k in range(1, len(tokens) + 1):
            out += d.add(tokens[:k])
            assert tok.decode(tokens[:k]).startswith(out)
        assert out + d.flush(tokens) == tok.decode(tokens)


class _CountingTokenizer:
    """The model's tokenizer, counting the tokens every decode call reads."""

    def __init__(self, inner):
        self._inner, self.decoded = inner, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self._inner.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _LoggingEngine(Engine):
    """An engine that logs every add and the order rows join the batch."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.added, self.joined = [], []

    def add(self, request):
        self.added.append(request.key)
        super().add(request)

    def _join(self, unit, cache, logits):
        self.joined += [r.key for r in unit.requests]
        super()._join(unit, cache, logits)


def _item(tiny, text: str, max_tokens: int) -> Item:
    return Item(0, 1, "x", "chat", tiny.tokenizer.encode(text), SamplingParams(max_tokens=max_tokens, seed=1))


async def _collect(t: Ticket) -> list:
    events = []
    while not events or events[-1][0] not in ("done", "error"):
        events.append(await asyncio.wait_for(t.events.get(), 120))
    return events


def _ask(loop: EngineLoop, items: list, *, stream: bool) -> list:
    async def go():
        tickets = [Ticket(it, stream, asyncio.get_running_loop(), asyncio.Queue()) for it in items]
        for t in tickets:
            loop.submit(t)
        return await asyncio.gather(*(_collect(t) for t in tickets))
    return asyncio.run(go())


@pytest.fixture
def loop_of(tiny):
    loops = []

    def make(**kw):
        lp = EngineLoop(tiny, EngineConfig.of(max_batch=8), engine_factory=_LoggingEngine, **kw)
        lp.start()
        loops.append(lp)
        return lp
    yield make
    for lp in loops:
        lp.stop()


def test_streaming_reads_each_token_a_bounded_number_of_times(tiny, loop_of, monkeypatch):
    lp = loop_of()
    counting = _CountingTokenizer(tiny.tokenizer)
    monkeypatch.setattr(lp, "lm", type("LM", (), {"tokenizer": counting})())
    events = _ask(lp, [_item(tiny, "Tell me a story.", 96)], stream=True)[0]
    deltas = "".join(e[2] for e in events if e[0] == "delta")
    done = events[-1][2]
    assert done.completion_tokens == 96 and done.text.startswith(deltas) and deltas
    # Re-decoding the whole stream at every step reads ~n^2/2 tokens (4,656 here); a window, a few per token.
    assert counting.decoded <= 8 * done.completion_tokens


def _wait(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_batch_rows_are_not_redone_and_interactive_requests_go_first(tiny, loop_of):
    lp = loop_of()
    feed = lp.open_feed()
    for i in range(20):
        feed.add(Request(f"b{i}", tiny.tokenizer.encode(f"batch row {i} " + "word " * (i % 5)),
                         SamplingParams(max_tokens=24, seed=i)))
    eng = lp.engine
    _wait(lambda: eng.num_active >= 4)  # batch rows decode
    # Rows mid-prefill when the chats arrive have been admitted: they may join first.
    started = set(eng.joined) | {r.key for f in list(eng._filling) for r in f.unit.requests}
    waiting_batch = {("b", feed.fid, f"b{i}") for i in range(20)} - started
    events = _ask(lp, [_item(tiny, f"Chat request {i}.", 6) for i in range(4)], stream=False)
    assert all(e[-1][0] == "done" for e in events)
    joined = list(eng.joined)
    chats = [k for k in joined if k[0] == "i"]
    assert len(chats) == 4 and waiting_batch
    # Interactive requests joined ahead of every batch row that was waiting when they arrived.
    last_chat = max(joined.index(k) for k in chats)
    assert not any(k in waiting_batch for k in joined[:last_chat])
    # No batch row was handed to the engine twice (cancelled and redone).
    batch_adds = [k for k in eng.added if k[0] == "b"]
    assert len(batch_adds) == len(set(batch_adds))
    assert lp.stats.preempted == 0
