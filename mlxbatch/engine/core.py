"""The generation engine: continuous batching over mlx-lm model modules.

Owns: the decode loop (one sampled-token array and one host transfer per step,
the next step queued before the previous tokens are read), chunked prefill of
admitted units interleaved with decode steps, shared-prefix KV reuse through a
byte-capped LRU, stop tokens / stop strings / max_tokens, lazy slot compaction,
surviving an out-of-memory failure (the failed step's rows rerun from their start on a smaller
batch and budget; a row that fails alone is an `out_of_memory` error) and the counters the
dashboard shows. Does not own: the KV budget (budget.py), reading input or writing
results (runner.py), grouping (scheduler.py), sampling maths (sampling.py).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace

import mlx.core as mx

from mlxbatch.engine import arch
from mlxbatch.engine.budget import MIN_TRIM, TRIM_SHARE, KVBudget, UnitShape
from mlxbatch.engine.config import EngineConfig, KVFormat
from mlxbatch.engine.kvcache import BatchCache, SharedPrefix
from mlxbatch.engine.kvquant import each
from mlxbatch.engine.model_runner import ForwardOptions, ModelRunner, default_options
from mlxbatch.engine.oom import free_memory, is_out_of_memory
from mlxbatch.engine.prefix_cache import PrefixCache
from mlxbatch.engine.sampling import RowParams, allowed_tokens, sample
from mlxbatch.engine.scheduler import Scheduler, Unit, request_key
from mlxbatch.engine.shapes import num_traces, row_bucket, row_buckets
from mlxbatch.models import LoadedModel
from mlxbatch.types import Completion, EngineStats, Request, SamplingParams

GPU_MAX_BATCH, CPU_MAX_BATCH = 512, 64  # rows decoded together by default
_COMPACT_FRACTION = 0.5  # drop finished rows once they are half the batch (a compaction copies the cache)
_ADMIT_FRACTION = 0.125  # refill once this share of slots is free (a merge copies the cache)
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
MIN_HEAD_TOKENS = 64  # a cached prompt's head is reused from this many shared tokens (a system prompt)
_OOM_SHRINK = 0.5  # after running out of memory: budget, batch width and prefill sizes times this
_MIN_PREFILL_CHUNK = 16
_MAX_FILLING = 4  # units prefilled side by side (a short prompt need not wait for a long one)
_WARM_COLUMNS = (0, 100, 150, 200, 300, 600)  # warm-up widths: column buckets 64, 128, 192, 256, 512, 768
_SLOW_STEP = 0.2  # seconds: a step this slow is counted (stats.slow_steps)


@dataclass
class _Row:
    request: Request
    prompt_len: int
    limit: int  # tokens it may generate: max_tokens, capped by the context
    shared_len: int = 0  # leading prompt tokens read from a shared prefix, not held by the row
    born: int = 0  # Engine._clock less the columns it held on joining: its span is _clock - born
    final_span: int = 0  # the most columns it may span (its unit's width + limit + 1)
    generated: list = field(default_factory=list)
    logprobs: list | None = None
    is_alive: bool = True
    has_stop: bool = field(init=False)  # stop strings or a grammar: `_hits_stop` runs after each token

    def __post_init__(self):
        self.has_stop = bool(self.request.params.stop) or self.guide is not None

    @property
    def guide(self):
        return self.request.guide


@dataclass
class _Filling:
    """A unit mid-prefill: its cache, its padded tokens and their mask, and the columns done so far."""
    unit: Unit
    cache: BatchCache
    tokens: mx.array
    valid: mx.array
    spans: list  # each row's final span (as _Row.final_span), for the KV budget
    done_cols: int = 0

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def remaining(self) -> int:
        return self.rows * (self.tokens.shape[1] - self.done_cols)

    @property
    def order(self) -> tuple:
        # Urgent classes first, then the least left to compute: a short prompt beside a long one
        # is done within a step or two.
        return (self.unit.requests[0].priority, self.remaining)


def _runner(lm: LoadedModel, options: ForwardOptions | None) -> ModelRunner:
    """The model's last runner when the choices are the same: a later engine over the same model
    (bench's timed run, a library caller's next job) reuses its fused weights and compiled
    layers instead of fusing and tracing again. Only one is kept: each holds fused weights."""
    options = options or default_options()
    adapters = lm.adapters or None
    if lm.runner is None or lm.runner.options != options or not _same_adapters(lm.runner.adapters, adapters):
        if lm.runner is not None:
            lm.runner.close()  # its adapters leave the model before another runner wraps it
        lm.runner = ModelRunner(lm.model, options, adapters)
    return lm.runner


def _same_adapters(a: list | None, b: list | None) -> bool:
    """The same adapters by name and content (a later job reopens the same files)."""
    return [x.manifest_entry() for x in a or ()] == [x.manifest_entry() for x in b or ()]


def _default_kv_bytes() -> int:
    info = mx.device_info()
    total = info.get("memory_size") or info.get("total_memory") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * 0.4)


class Engine:
    """Add requests, call `step()` until `has_work` is false; each step returns completions."""

    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None, **settings):
        """`Engine(lm, EngineConfig.from_spec(spec))`; keywords (`Engine(lm, max_batch=8, kv_bits=4)`, as
        tests and probes write it) are EngineConfig.of's, and an unknown one is a TypeError there."""
        if settings:
            if config is not None:
                raise TypeError("Engine takes an EngineConfig or keywords, not both")
            config = EngineConfig.of(**settings)
        self.config = config = config or EngineConfig()
        _check_adapters(lm, config)
        self.lm = lm
        self.runner = _runner(lm, _streaming(lm, _with_kv(lm, config.options or default_options(), config.kv)))
        kv = self.runner.options.kv
        is_cpu = not self.runner.options.full_buffer
        plan = lm.offload.plan.engine_settings(max_batch=config.max_batch, max_kv_gb=config.max_kv_gb) \
            if lm.offload is not None else {}  # a memory cap: KV, blocks of rows and prefill sizes from its plan
        self.max_batch = plan.get("max_batch") or config.max_batch or (CPU_MAX_BATCH if is_cpu else GPU_MAX_BATCH)
        self.is_bucketed = not self.runner.has_state  # rows padded to shapes.row_bucket (state layers: exact)
        self.budget = KVBudget(plan.get("max_kv_bytes") or (int(config.max_kv_gb * 1e9) if config.max_kv_gb
                                                            else _default_kv_bytes()),
                               bytes_per_token=self.runner.kv_bytes_per_token(),
                               state_bytes=self.runner.state_bytes_per_row(), fine=is_cpu,
                               rows_held=self._rows_held)
        self.prefill_chunk = plan.get("prefill_chunk") or config.prefill_chunk
        self.max_prefill_tokens = plan.get("max_prefill_tokens") or config.max_prefill_tokens or (4096 if is_cpu else 32768)
        # Prefill tokens (rows x columns) computed per step beside the decode: bounds a server's streams'
        # step; a batch job (throughput first) prefills a whole unit a step, and so do streamed weights
        # (read once per step).
        self.max_step_tokens = plan.get("max_prefill_tokens") or config.max_step_tokens or \
            ((256 if is_cpu else 2048) if config.is_interactive else self.max_prefill_tokens)
        self.prefix_cache = PrefixCache(int(config.prefix_cache_gb * 1e9))
        self.scheduler = Scheduler(reserve=self.max_batch // 8)
        self.stats = EngineStats(capacity=self.max_batch, forward=self.runner.describe(),
                                 kv_budget_bytes=self.max_kv_bytes, kv_format=kv.describe() if kv else "",
                                 resident_share=lm.offload.plan.resident_share if lm.offload is not None else 1.0)
        self._eos = frozenset(lm.eos_token_ids)
        self._cache: BatchCache | None = None
        self._clock = 0  # decode steps so far: each adds a column to every row of the batch
        self._rows: list[_Row] = []
        self._params: RowParams | None = None
        self._next: tuple[mx.array, mx.array | None] | None = None  # sampled, not yet read
        self._filling: list[_Filling] = []  # units mid-prefill
        self._wants_logprobs = False
        self._num_alive = 0
        self._num_guided = 0  # live rows with a grammar (structured output)
        self._cancelled: set = set()  # keys of rows cancelled mid-prefill: they join dead
        self._prefilling = None  # the unit whose prefill runs now: an allocation failure is its alone
        self._failed_alone: set[int] = set()  # ids of requests that ran out of memory as the only row

    # ------------------------------------------------------------ public API (engine/protocol.py)
    workers: tuple = ()  # no workers: everything runs in this process

    def wait_started(self, while_waiting=lambda: False) -> None:
        """Nothing to start: the model is loaded and this engine runs in process."""

    def close(self) -> None:
        """Nothing to stop (the model's memory belongs to its LoadedModel)."""

    def add(self, request: Request) -> None:
        self.scheduler.add(request)
        self._wants_logprobs |= request.params.logprobs is not None
        self.stats.waiting = len(self.scheduler)

    def cancel(self, key) -> bool:
        """Drop a request by key (every sample's key is its own): a waiting one leaves the queue, a
        running one's row stops now and frees its slot at the next step, one mid-prefill joins dead.
        No completion is returned for it. False when no such request is in the engine."""
        if self.scheduler.remove(key):
            self.stats.waiting = len(self.scheduler)
            return True
        for row in self._rows:
            if row.is_alive and row.request.key == key:
                row.is_alive = False
                self._num_alive -= 1
                self._num_guided -= row.guide is not None
                self.stats.active = self._num_alive
                return True
        if any(r.key == key for f in self._filling for r in f.unit.requests):
            self._cancelled.add(key)
            return True
        return False

    def live(self):
        """(key, tokens generated so far, logprobs so far or None) of each running row: a server
        streams from these between steps. The lists are the engine's own: read, never change."""
        return ((r.request.key, r.generated, r.logprobs) for r in self._rows if r.is_alive)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler)

    @property
    def num_active(self) -> int:
        return self._num_alive

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler) or bool(self._filling) or self.num_active > 0

    def warm_up(self) -> int:
        """Trace the compiled decode for every row bucket (and, where rows share prefixes, the
        cascade; where attention runs over the bucketed buffer, its first column buckets) before
        serving, so no request's step compiles them; returns the traces made."""
        before = num_traces()
        widths = _WARM_COLUMNS if self.runner.options.full_buffer else (0,)
        for rows in row_buckets(self.max_batch) if self.is_bucketed else ():
            for cols in widths:
                if rows * (cols + 1) * self.budget.bytes_per_token <= self.max_kv_bytes // 4:
                    self._warm(rows, cols, shared=False)
            if self.runner.can_share_prefix and rows > 1:
                self._warm(rows, 0, shared=True)
        return num_traces() - before

    def _warm(self, rows: int, cols: int, *, shared: bool) -> None:
        """Two decode steps of `rows` rows after `cols` columns of zeros (a stand-in prompt)."""
        one = self.runner.new_cache(1)
        one.layout.begin(mx.ones((1, 1), dtype=mx.bool_))
        self.runner.forward_hidden(mx.zeros((1, 1), dtype=mx.int32), one)
        n = cols or self.runner.options.min_shared_tokens
        kv = [tuple(each(lambda a: mx.repeat(a, n, axis=2), x) for x in entry) for entry in one.prefix_kv()]
        cache = self.runner.new_cache(rows) if shared or not cols else BatchCache.from_prefix(
            self.runner.cache_format, kv, rows, cols)
        if shared:
            cache.layout.share(SharedPrefix(b"", kv, n))
        for _ in range(2):  # a first column, then one more: decode proper
            cache.layout.begin(mx.ones((rows, 1), dtype=mx.bool_))
            mx.eval(self.runner.forward_last(mx.zeros((rows, 1), dtype=mx.int32), cache))

    @property
    def num_filling(self) -> int:
        return sum(f.rows for f in self._filling)

    def step(self) -> list[Completion]:
        """One scheduling round and one decode step; returns rows that finished."""
        done: list[Completion] = []
        t0, traces, self._step_prefill = time.perf_counter(), num_traces(), 0
        try:
            if not self._step(done):
                return done
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            done += self._recover(exc)
        self._count()
        self._time(time.perf_counter() - t0, num_traces() - traces)
        return done

    def _time(self, seconds: float, traces: int) -> None:
        st = self.stats
        st.step_seconds += seconds
        st.step_max_seconds = max(st.step_max_seconds, seconds)
        st.slow_steps += seconds > _SLOW_STEP
        st.traces += traces
        st.trace_steps += traces > 0
        st.prefill_step_tokens += self._step_prefill
        st.prefill_steps += self._step_prefill > 0
        st.step_max_prefill_tokens = max(st.step_max_prefill_tokens, self._step_prefill)

    def _step(self, done: list) -> bool:
        """The step's work; rows that finish are appended to `done` as they do (so a failure
        later in the step loses none). False when no row is running."""
        self._compact()
        self._admit()
        if not self._rows:
            return False
        current = self._next
        if self._num_guided:  # a grammar's next mask needs this step's tokens: read them first
            done += self._absorb(current)
            self._next = self._decode(current[0]) if self.num_active else None
        else:
            self._next = self._decode(current[0]) if self.num_active else None
            done += self._absorb(current)
        return True

    def _count(self) -> None:
        st = self.stats
        st.capacity, st.kv_budget_bytes = self.max_batch, self.max_kv_bytes
        st.steps += 1
        st.active = self.num_active
        st.active_peak = max(st.active_peak, st.active)
        st.waiting = len(self.scheduler)
        caches = [c for c in (self._cache, *(f.cache for f in self._filling)) if c is not None]
        # A prefix used by both the running batch and the unit being prefilled is held once.
        shared = {id(p): p.nbytes for c in caches for p in c.layout.groups}
        st.kv_shared_bytes = sum(shared.values()) + sum(c.layout.joined_bytes for c in caches)
        st.kv_bytes = sum(c.nbytes for c in caches) + st.kv_shared_bytes
        st.kv_peak_bytes = max(st.kv_peak_bytes, st.kv_bytes)
        st.prefix_cache_bytes = self.prefix_cache.nbytes
        if self.lm.offload is not None and self.lm.offload.streamer is not None:
            st.streamed_bytes, st.stream_wait_s = self.lm.offload.streamer.bytes_read, self.lm.offload.streamer.wait_s

    # ------------------------------------------------------------ decode
    def _decode(self, tokens: mx.array):
        self._clock += 1
        self._cache.layout.begin(mx.ones((len(self._rows), 1), dtype=mx.bool_))
        logits = self.runner.forward_last(tokens[:, None], self._cache, self._adapters(r.request for r in self._rows))
        allowed = self._allowed(self._rows, logits.shape[-1]) if self._num_guided else None
        sampled, logprobs = sample(logits, self._params, with_logprobs=self._wants_logprobs, allowed=allowed)
        self._params.counter = self._params.counter + 1
        extra = self._logprob_arrays(sampled, logprobs)
        mx.async_eval(sampled, *(extra or ()))
        return sampled, extra

    def _adapters(self, requests) -> list[int] | None:
        """Each request's adapter index, where the model has adapters (the runner gathers their updates)."""
        return [r.adapter for r in requests] if self.runner.bank is not None else None

    def _allowed(self, rows: list, vocab: int) -> mx.array:
        """bool [B, vocab]: what each live guided row's grammar allows next; every token for the others."""
        guided = [(i, r.guide) for i, r in enumerate(rows) if r.guide is not None and r.is_alive]
        return allowed_tokens(mx.array(guided[0][1].masks(guided, len(rows))), vocab)

    def _logprob_arrays(self, sampled: mx.array, logprobs: mx.array):
        # Fixed shapes once any request wants logprobs, so row sets always concatenate.
        if not self._wants_logprobs:
            return None
        chosen = mx.take_along_axis(logprobs, sampled[:, None], axis=-1)[:, 0]
        top = mx.argpartition(-logprobs, MAX_TOP_LOGPROBS - 1, axis=-1)[:, :MAX_TOP_LOGPROBS]
        return chosen, top, mx.take_along_axis(logprobs, top, axis=-1)

    def _absorb(self, current) -> list[Completion]:
        """Append each live row's new token; finish rows on EOS, stop string or limit.

        A hot loop (once per step over every row): kept flat on purpose.
        """
        t0 = time.perf_counter()
        tokens = current[0].tolist()  # waits for the device: the rest of the step is host time
        self.stats.sync_seconds += time.perf_counter() - t0
        lps = [a.tolist() for a in current[1]] if current[1] is not None else None
        eos, done, appended = self._eos, [], 0
        for i, (row, token) in enumerate(zip(self._rows, tokens)):
            if not row.is_alive:
                continue
            if lps is not None and row.logprobs is not None and token not in eos:
                self._record_logprob(row, token, lps, i)
            reason = None
            if token in eos:
                reason = "stop"
            else:
                row.generated.append(token)
                appended += 1
                if row.has_stop and self._hits_stop(row):
                    reason = "stop"
                elif len(row.generated) >= row.limit:
                    reason = "length"
            if reason:
                row.is_alive = False
                self._num_guided -= row.guide is not None
                done.append(self._complete(row, reason))
        self.stats.generated_tokens += appended
        self._num_alive -= len(done)
        return done

    def _record_logprob(self, row: _Row, token: int, lps: list, i: int) -> None:
        n = row.request.params.logprobs
        top = sorted(zip(lps[1][i], lps[2][i]), key=lambda t: -t[1])[:n] if n else []
        row.logprobs.append((token, lps[0][i], top))

    def _hits_stop(self, row: _Row) -> bool:
        if row.guide is not None and row.guide.consume(row.generated[-1]):
            return True  # the grammar is complete (a JSON value closed): nothing else may follow
        if not row.request.params.stop:
            return False
        longest = max(len(s) for s in row.request.params.stop)
        tail = self.lm.tokenizer.decode(row.generated[-(longest + 2):])
        return any(s in tail for s in row.request.params.stop)

    def _complete(self, row: _Row, reason: str) -> Completion:
        text = self.lm.tokenizer.decode(row.generated)
        tokens = row.generated
        if reason == "stop" and row.request.params.stop:
            cut = min((text.find(s) for s in row.request.params.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        return Completion(row.request.key, text, tokens, reason, row.prompt_len, row.logprobs)

    # ------------------------------------------------------------ batch shape
    def _compact(self, force: bool = False, *, bucket: bool = True) -> None:
        """Drop finished rows once they are half the batch, or when they hold columns no live row
        needs (the widest rows finished: see budget.TRIM_SHARE), trimming those columns. Where the
        batch is bucketed, dead rows stay as padding up to the bucket (blanked: they hold no columns)."""
        dead = len(self._rows) - self.num_active
        if not dead:
            return
        live = min((r.born for r in self._rows if r.is_alive), default=self._clock)
        dead_cols = live - min(r.born for r in self._rows)  # leading columns only finished rows use
        wide = dead_cols >= max(MIN_TRIM, (self._clock - live) // TRIM_SHARE)
        if dead < _COMPACT_FRACTION * len(self._rows) and not force and not wide:
            return
        keep = [i for i, r in enumerate(self._rows) if r.is_alive]
        if not keep:
            self._cache, self._rows, self._params, self._next = None, [], None, None
            return
        blank = row_bucket(len(keep), cap=self.max_batch) - len(keep) if bucket and self.is_bucketed else 0
        dead_rows = [i for i, r in enumerate(self._rows) if not r.is_alive][:blank]
        blank = len(dead_rows)  # never more padding rows than dead rows to reuse
        keep += dead_rows
        index = mx.array(keep, dtype=mx.int32)
        self._cache.keep(keep, trim=force or dead_cols > 0, stepwise=self._is_tight(), blank=blank)
        self._params = self._params.take(index)
        sampled, extra = self._next
        self._next = (sampled[index], tuple(a[index] for a in extra) if extra else None)
        self._rows = [self._rows[i] for i in keep[:len(keep) - blank]] + [_pad_row(self._clock) for _ in range(blank)]

    def _admit(self) -> None:
        """Start units while slots are free, then spend the step's prefill budget (max_step_tokens)
        on the units mid-prefill, most urgent and shortest first; a finished unit joins the batch."""
        while len(self._filling) < _MAX_FILLING and self._start_next():
            pass
        budget = self.max_step_tokens
        for f in sorted(self._filling, key=lambda f: f.order):
            if budget <= 0:
                break
            self._prefilling = f.unit
            budget -= self._prefill_chunk(f, budget)
            self._prefilling = None

    def _start_next(self) -> bool:
        """Start the next unit where slots are free and it fits the KV budget; False if none."""
        free = self.max_batch - self.num_active - self.num_filling
        if not self.scheduler or free <= 0:
            return False
        busy = self.num_active + self.num_filling
        if busy and free < _ADMIT_FRACTION * self.max_batch and len(self.scheduler) >= free:
            return False
        unit = self.scheduler.next_unit(max_rows=free, max_prefill_tokens=self.max_prefill_tokens,
                                        fits=self._unit_fits)
        if unit is None:
            return False
        self._compact(force=True)  # finished rows make room for the unit (as KVBudget.projected_peak counts)
        self._prefilling = unit
        self._filling.append(self._start_unit(unit))
        self._prefilling = None
        return True

    def _rows_held(self, n: int) -> int:
        """The rows a batch of n live rows holds: padded to its shape bucket where bucketed."""
        return row_bucket(n, cap=self.max_batch) if n and self.is_bucketed else n

    @property
    def max_kv_bytes(self) -> int:
        return self.budget.max_bytes

    def _is_tight(self, joining: BatchCache | None = None) -> bool:
        return self.budget.is_tight(self._cache.nbytes + (joining.nbytes if joining is not None else 0))

    def _unit_fits(self, requests: list, prefix_len: int) -> bool:
        """Whether a unit of these requests may start (one row always may, into an empty batch)."""
        if not requests or (len(requests) == 1 and not self.num_active and not self._filling):
            return True
        groups = list(self._cache.layout.groups) if self._cache is not None else []
        # Units mid-prefill count as rows of the batch: they join it before this unit.
        live = [r.final_span for r in self._rows if r.is_alive] + [s for f in self._filling for s in f.spans]
        return self.budget.fits(self._unit_shape(requests, prefix_len, groups), live,
                                sum(g.nbytes for g in groups), len(groups))

    def _unit_shape(self, requests: list, prefix_len: int, groups: list) -> UnitShape:
        """What the unit would hold: its columns (a prefix stored once excluded), each row's final
        span, and its shared prefix where the batch does not hold it yet."""
        p = prefix_len if self._reuses_prefix(requests) else 0
        shares = bool(p) and self._should_share(len(requests), p)
        width = max(len(r.tokens) for r in requests) - (p if shares else 0)
        ends = tuple(width + self._limit(r) + 1 for r in requests)
        new_prefix = 0
        if shares and not any(g.key == request_key(requests[0].tokens[:p], requests[0].adapter) for g in groups):
            new_prefix = self.budget.bytes_per_token * p
        return UnitShape(len(requests), width, ends, new_prefix)

    def _longest_row(self) -> int:
        """Columns the longest live row may reach in the batch (1,024 assumed for an empty one)."""
        own = max((r.prompt_len - r.shared_len + r.limit for r in self._rows if r.is_alive), default=1024)
        return min(own, self.lm.context_length)

    # ------------------------------------------------------------ prefill
    def _start_unit(self, unit: Unit) -> _Filling:
        reqs = unit.requests
        p = unit.prefix_len if self._reuses_prefix(reqs) else 0  # else whole prompts, left-padded
        if len(reqs) == 1 and p:  # a lone row reads what the LRU holds; the rest is prefilled step by step
            kv, p = self._cached(request_key(reqs[0].tokens[:p], reqs[0].adapter), reqs[0].adapter)
            cache = BatchCache.from_prefix(self.runner.cache_format, kv, 1, p) if p else self.runner.new_cache(1)
        else:
            cache = self._unit_cache(reqs, p)
        suffixes = [r.tokens[p:] for r in reqs]
        width = max(len(s) for s in suffixes)
        pads = [width - len(s) for s in suffixes]
        # Right-align suffixes; pads get positions below p and are masked out.
        cache.layout.offset = mx.array([p - n for n in pads], dtype=mx.int32)
        tokens = mx.array([[0] * n + s for n, s in zip(pads, suffixes)], dtype=mx.int32)
        valid = mx.array([[False] * n + [True] * len(s) for n, s in zip(pads, suffixes)])
        st = self.stats
        st.prompt_tokens += sum(len(r.tokens) for r in reqs)
        st.prompt_computed += sum(len(s) for s in suffixes)
        st.prompt_padding += sum(pads)
        st.prefix_hit_tokens += p * (len(reqs) - 1)
        span = cache.columns + width  # the unit's columns once prefilled (a shared prefix not among them)
        return _Filling(unit, cache, tokens, valid, [span + self._limit(r) + 1 for r in reqs])

    def _limit(self, request: Request) -> int:
        """Tokens a request may generate: its max_tokens, capped by the context."""
        return min(request.params.max_tokens, self.lm.context_length - len(request.tokens))

    def _reuses_prefix(self, reqs: list) -> bool:
        # State layers (ModelRunner.can_reuse_prefix) take a prefix only where no pads follow it.
        return self.runner.can_reuse_prefix or len({len(r.tokens) for r in reqs}) == 1

    def _unit_cache(self, reqs: list, p: int) -> BatchCache:
        """A unit's cache: its common prefix stored once for the group when that pays,
        else copied into each row."""
        if not p:
            return self.runner.new_cache(len(reqs))
        prefix = self._prefix(reqs[0].tokens[:p], reqs[0].adapter)  # a unit's rows share their adapter when p > 0
        if self._should_share(len(reqs), p):
            cache = self.runner.new_cache(len(reqs))
            cache.layout.share(prefix)
            return cache
        return BatchCache.from_prefix(self.runner.cache_format, prefix.kv, len(reqs), p)

    def _should_share(self, rows: int, p: int) -> bool:
        opts = self.runner.options
        if not (self.runner.can_share_prefix and rows > 1 and p >= opts.min_shared_tokens):
            return False
        if not self.runner.is_small:
            return True
        # A small model is bound by operations per step, and the cascade adds some: copies
        # are faster while they fit the KV budget (and sharing is what makes them fit).
        held = self._cache.nbytes + self._cache.layout.shared_bytes if self._cache is not None else 0
        return held + self.budget.bytes_per_token * p * rows > self.max_kv_bytes

    def _prefill_chunk(self, f: _Filling, budget: int) -> int:
        """Prefill the next columns of `f` within `budget` tokens (at least a few columns, so a wide
        unit still moves); join it when done. Returns the tokens computed."""
        unit, cache, tokens, start = f.unit, f.cache, f.tokens, f.done_cols
        cols = min(self.prefill_chunk, max(budget // f.rows, _MIN_PREFILL_CHUNK))
        stop = min(start + cols, tokens.shape[1])
        cache.layout.begin(f.valid[:, start:stop])
        adapters = self._adapters(unit.requests)
        self._step_prefill += f.rows * (stop - start)
        if stop < tokens.shape[1]:
            self.runner.forward_hidden(tokens[:, start:stop], cache, adapters)
            f.done_cols = stop
            return f.rows * (stop - start)
        logits = self.runner.forward_last(tokens[:, start:stop], cache, adapters)
        self._filling.remove(f)
        self._join(unit, cache, logits)
        return f.rows * (stop - start)

    def _join(self, unit: Unit, cache: BatchCache, logits: mx.array) -> None:
        """Sample the unit's first tokens and merge it into the running batch."""
        shared = unit.prefix_len if cache.layout.groups else 0  # groups only where prefixes are reused
        width = cache.columns  # every row of the unit spans the unit's columns (as KVBudget.projected_peak counts)
        rows = [_Row(r, len(r.tokens), self._limit(r), shared, born=self._clock - width,
                     final_span=width + self._limit(r) + 1,
                     logprobs=[] if r.params.logprobs is not None else None) for r in unit.requests]
        params = RowParams.build([r.params for r in unit.requests])
        num_guided = sum(r.guide is not None for r in unit.requests)
        allowed = self._allowed(rows, logits.shape[-1]) if num_guided else None
        sampled, logprobs = sample(logits, params, with_logprobs=self._wants_logprobs, allowed=allowed)
        params.counter = params.counter + 1
        extra = self._logprob_arrays(sampled, logprobs)
        mx.eval(sampled, *cache.arrays(), *(extra or ()))
        if len(unit.requests) == 1 and unit.prefix_len and self._reuses_prefix(unit.requests):
            self._remember(unit.requests[0], cache)
        self._prefilling = None  # computed: from here on the unit is part of the running batch
        self._num_guided += num_guided
        self._drop_cancelled(rows)
        self._compact(force=True, bucket=False)
        alive = sum(r.is_alive for r in rows)
        pad = row_bucket(len(self._rows) + len(rows), cap=self.max_batch) - len(self._rows) - len(rows)
        if pad and self.is_bucketed:
            rows, params, sampled, extra = self._pad(cache, rows, params, sampled, extra, pad)
        if not self._rows:
            self._cache, self._params, self._rows, self._next = cache, params, rows, (sampled, extra)
            self._num_alive = alive
            return
        self._cache.merge(cache, stepwise=self._is_tight(cache))
        self._params = self._params.concat(params)
        self._next = (mx.concatenate([self._next[0], sampled]), _concat_extra(self._next[1], extra, len(self._rows)))
        self._rows = self._rows + rows
        self._num_alive += alive

    def _pad(self, cache: BatchCache, rows: list, params: RowParams, sampled, extra, n: int):
        """`n` dead rows added to a joining unit, so the batch it makes holds a bucket's rows."""
        cache.merge(self.runner.new_cache(n))
        rows = rows + [_pad_row(self._clock) for _ in range(n)]
        params = params.concat(RowParams.build([SamplingParams()] * n))
        zeros = lambda a: mx.concatenate([a, mx.zeros((n, *a.shape[1:]), dtype=a.dtype)])  # noqa: E731
        return rows, params, zeros(sampled), tuple(zeros(a) for a in extra) if extra else None

    def _drop_cancelled(self, rows: list) -> None:
        """Rows cancelled while their unit was prefilled join dead (compaction drops them)."""
        if not self._cancelled:
            return
        for r in rows:
            if r.request.key in self._cancelled:
                self._cancelled.discard(r.request.key)
                r.is_alive = False
                self._num_guided -= r.guide is not None

    def _cached(self, key: bytes, adapter: int) -> tuple[list | None, int]:
        """(KV, length) of the longest head of the prompt `key` the LRU holds: a cached prefix of it,
        or the head it shares with a cached prompt (from MIN_HEAD_TOKENS tokens); (None, 0) if none."""
        self.stats.prefix_lookups += 1
        found = self.prefix_cache.longest(key)
        kv, have = (found.kv, found.length) if found else (None, 0)
        packed = self.runner.options.kv
        # Packed KV or a state (the whole prefix's summary): no head slicing.
        head, n = self.prefix_cache.shared_head(key) if packed is None and not self.runner.has_state else (None, 0)
        n -= 1 if adapter and n else 0  # the key's adapter tag token is not a position of the KV
        if n >= have + MIN_HEAD_TOKENS:  # causal: the first n positions' KV depend on those n tokens only
            kv, have = [(k[:, :, :n], v[:, :, :n]) for k, v in head.kv], n
        self.stats.prefix_hit_tokens += have
        self.stats.prefix_hits += bool(have)
        return kv, have

    def _remember(self, request: Request, cache: BatchCache) -> None:
        """A lone row's prompt (but its last token) into the LRU, as `_prefix` stores a computed prefix."""
        n = len(request.tokens) - 1
        key = request_key(request.tokens[:n], request.adapter)
        found = self.prefix_cache.longest(key)
        if n <= 0 or self.runner.has_state or (found is not None and found.length == n):
            return
        kv = [tuple(each(lambda a: mx.contiguous(a[:, :, :n]), x) for x in entry) for entry in cache.prefix_kv()]
        self.prefix_cache.put(SharedPrefix(key, kv, n))

    def _prefix(self, prefix: list[int], adapter: int = 0) -> SharedPrefix:
        """A prompt prefix's KV (batch 1) under one adapter, from the LRU (the same object) or computed
        and cached; a cached shorter prefix of it, or the head it shares with a cached one, is extended
        rather than recomputed."""
        key = request_key(prefix, adapter)
        found = self.prefix_cache.longest(key)
        if found is not None and found.length == len(prefix):
            self.stats.prefix_lookups += 1
            self.stats.prefix_hit_tokens += found.length
            self.stats.prefix_hits += 1
            return found
        kv, have = self._cached(key, adapter)
        cache = BatchCache.from_prefix(self.runner.cache_format, kv, 1, have) if have else self.runner.new_cache(1)
        rest = mx.array([prefix[have:]], dtype=mx.int32)
        for start in range(0, rest.shape[1], self.prefill_chunk):
            chunk = rest[:, start : start + self.prefill_chunk]
            cache.layout.begin(mx.ones(chunk.shape, dtype=mx.bool_))
            self.runner.forward_hidden(chunk, cache, [adapter] if self.runner.bank else None)
        self.stats.prompt_computed += rest.shape[1]
        stored = SharedPrefix(key, [tuple(each(mx.contiguous, x) for x in kv) for kv in cache.prefix_kv()], len(prefix))
        mx.eval(stored.kv)
        self.prefix_cache.put(stored)
        return stored


    # ------------------------------------------------------------ out of memory
    def _recover(self, exc: BaseException) -> list[Completion]:
        """After an allocation failure: drop the failed step's rows (the unit being prefilled, or
        the whole running batch and that unit), free memory, shrink the budget, batch width and
        prefill sizes, and queue the rows again from their first token (nothing of theirs was
        returned yet). A row that fails twice running alone cannot run at all: an error completion."""
        unit = self._prefilling  # set: the failure came from this unit's prefill, the batch is intact
        failed = list(unit.requests) if unit is not None else []
        in_batch = unit is None and bool(self._rows)
        if unit is None:  # units mid-prefill go too: they hold memory
            failed += [r for f in self._filling for r in f.unit.requests]
        held = self.stats.kv_bytes
        if in_batch:
            alive = [r for r in self._rows if r.is_alive]
            failed = [r.request for r in alive] + failed
            self.stats.generated_tokens -= sum(len(r.generated) for r in alive)  # they run again
            self._cache, self._rows, self._params, self._next = None, [], None, None
            self._num_alive = self._num_guided = 0
        self._filling = [f for f in self._filling if unit is not None and f.unit is not unit]
        self._prefilling = None
        self.prefix_cache.clear()
        free_memory()
        # A row that failed alone gets one more try (smaller prefill chunks, memory freed); twice: an error.
        alone = len(failed) == 1 and not self._rows
        gives_up = alone and id(failed[0]) in self._failed_alone
        if alone:
            self._failed_alone.add(id(failed[0]))
        self._shrink(len(failed) + self.num_active, held)
        self.stats.oom_retries += 1
        what = "prefill" if unit is not None else "decode"
        if gives_up:
            r = failed[0]
            print(f"[mlxbatch] out of memory: a row of {len(r.tokens):,} prompt tokens cannot run even alone "
                  f"(an out_of_memory error record): {str(exc)[:200]}", file=sys.stderr, flush=True)
            return [Completion(r.key, "", [], "error", len(r.tokens), None,
                               ("out_of_memory", f"out of memory running this row alone ({len(r.tokens):,} prompt "
                                                 f"tokens, max_tokens {r.params.max_tokens}): {str(exc)[:200]}"))]
        for r in failed:
            if r.guide is not None:
                r.guide.reset()
            self.scheduler.add(r)
        print(f"[mlxbatch] out of memory in {what} ({str(exc)[:120]}); retrying its {len(failed)} rows with "
              f"batch {self.max_batch}, KV budget {self.max_kv_bytes / 1e9:.2f} GB", file=sys.stderr, flush=True)
        return []

    def _shrink(self, rows: int, held: int) -> None:
        self.max_batch = max(1, int(min(self.max_batch, rows) * _OOM_SHRINK))
        self.scheduler.reserve = self.max_batch // 8
        self.max_step_tokens = max(_MIN_PREFILL_CHUNK, int(self.max_step_tokens * _OOM_SHRINK))
        self.budget.shrink(held, self._longest_row())
        self.max_prefill_tokens = max(_MIN_PREFILL_CHUNK, int(self.max_prefill_tokens * _OOM_SHRINK))
        self.prefill_chunk = max(_MIN_PREFILL_CHUNK, int(self.prefill_chunk * _OOM_SHRINK))


def _pad_row(clock: int) -> _Row:
    """A dead row that only fills the batch to its bucket (shapes.row_bucket)."""
    return _Row(Request(None, [], SamplingParams(max_tokens=0)), 0, 0, born=clock, is_alive=False)


def _with_kv(lm: LoadedModel, options: ForwardOptions, kv: KVFormat | None) -> ForwardOptions:
    """The options with the KV format asked for (checked against the model's head dimension)."""
    from mlxbatch.engine.kvquant import make

    if kv is None:
        return options
    packed = make(kv.bits, kv.value_bits, kv.group_size, head_dim=arch.head_dim(lm.model.args))
    return replace(options, kv_bits=packed.bits, kv_value_bits=packed.value_bits, kv_group_size=packed.group_size)


def _streaming(lm: LoadedModel, options: ForwardOptions) -> ForwardOptions:
    """Streamed layers run mlx-lm's own layers: fused copies and the compiled layer hold every
    layer's weights, and an adapter folded into a weight would be lost at its next read."""
    if lm.offload is None or lm.offload.streamer is None:
        return options
    return replace(options, fused=False, compiled_decode=False, fuse_adapter=False)


def _check_adapters(lm: LoadedModel, config: EngineConfig) -> None:
    """A config that names adapters runs on a model that carries them (attached by runner.py or a
    worker): never a setting accepted and silently dropped. A config without any uses the model's."""
    if config.adapters and tuple(a.name for a in lm.adapters or ()) != config.adapter_names:
        have = ", ".join(a.name for a in lm.adapters or ()) or "none"
        raise ValueError(f"the engine's config names adapters {', '.join(config.adapter_names)} but the "
                         f"model carries {have}")


def _concat_extra(old, new, num_old: int):
    """Join logprob side arrays; rows from before logprobs were wanted get zeros (never read)."""
    if new is None:
        return None
    if old is None:
        old = (mx.zeros((num_old,)), mx.zeros((num_old, MAX_TOP_LOGPROBS), dtype=new[1].dtype),
               mx.zeros((num_old, MAX_TOP_LOGPROBS)))
    return tuple(mx.concatenate([a.astype(b.dtype), b]) for a, b in zip(old, new))
