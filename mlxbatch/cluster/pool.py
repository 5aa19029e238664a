"""Several engines as one: `WorkerPool` has Engine's interface and runs the rows on Ray actors.

Owns: starting one actor per worker (each loads the model once and runs an engine, cluster/actor.py),
checking they all load what the driver's manifest names, routing requests (prefix affinity,
cluster/routing.py; all samples of a row together), up to two calls in flight per worker with about two
batches outstanding, faults (a lost worker is killed for good, its rows go back to the front
of the queue, a replacement starts, up to a bound), the summed engine counters and each
worker's status for the dashboard. Does not own: reading, rendering or writing rows; the
runner's JobLoop drives this exactly as it drives one Engine and stays the single writer.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import fields
from functools import partial
from itertools import groupby
from pathlib import Path

from mlxbatch import __version__
from mlxbatch.cluster.actor import DEFAULT_ENGINE, PROTOCOL, Worker
from mlxbatch.cluster.routing import PrefixRouter
from mlxbatch.cluster.session import Session
from mlxbatch.engine.config import EngineConfig
from mlxbatch.errors import ModelError, WorkerError
from mlxbatch.models import adapters as adapter_files
from mlxbatch.types import Completion, EngineStats, Request, WorkerStatus

BUDGET_S = 0.3  # each call steps its engine this long: one round trip per worker per 0.3 s
MAX_RESTARTS = 3  # per worker: a worker that keeps failing is given up
_WAIT_S = 0.5  # step() returns at least this often, so the loop commits and redraws
_RATE_WINDOW_S = 10.0
_OUTSTANDING_BATCHES = 2  # requests kept at a worker: its next batch is there before it asks
# A second call waits at the actor while the driver handles the first one's results, so the worker
# does not idle on the driver (a stand-in engine at batch 64 on a shared 2-CPU VM: ~7,800 rows/s
# through the driver with one call in flight, ~9,900 with two; noisy runs).
_CALLS_IN_FLIGHT = 2
# Engine counters that say "now" (summed over running workers); every other number only grows
# (summed over all workers, a lost one's included).
_NOW = ("active", "capacity", "waiting", "kv_bytes", "kv_shared_bytes", "kv_peak_bytes", "prefix_cache_bytes",
        "kv_budget_bytes", "active_peak")
_CUMULATIVE = tuple(f.name for f in fields(EngineStats) if f.type in ("int", int) and f.name not in _NOW)


def pool_factory(spec, *, engine: str = DEFAULT_ENGINE):
    """An engine factory for JobLoop: builds a pool of `spec.workers` actors running `engine`."""
    return partial(WorkerPool, num_workers=spec.workers, address=spec.ray_address, dtype=spec.dtype,
                   ignore_eos=spec.ignore_eos, engine=engine, defer_start=True)  # JobLoop renders meanwhile


def worker_model(spec: str) -> str:
    """The model as workers name it: a local path made absolute (an actor's working folder is not ours)."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if not spec.startswith("random:") and path.exists() else spec


def _row_of(key):
    return key[0] if isinstance(key, tuple) else key


def _describe(exc: Exception) -> str:
    """A lost worker's reason in one line: the worker's own exception where Ray carries it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, Exception) and str(cause).strip():
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _say(message: str) -> None:
    print(f"[mlxbatch] {message}", file=sys.stderr, flush=True)


class _Slot:
    """One worker place: its actor (replaced after a fault), its queue and what it holds."""

    def __init__(self, index: int, max_batch: int):
        self.index = index
        self.actor = None
        self.calls: list = []  # refs of calls in flight: start(), or up to _CALLS_IN_FLIGHT work()s
        self.is_starting = True
        self.queue: deque[list[Request]] = deque()  # groups: the samples of one row
        self.num_queued = 0
        self.inflight: dict = {}  # key -> Request sent and not yet completed
        self.max_batch = max_batch
        self.stats = EngineStats()
        self.rates: deque = deque()  # (time, generated tokens)
        self.status = WorkerStatus(name=f"worker {index + 1}")

    @property
    def is_running(self) -> bool:
        return self.status.state == "running"

    @property
    def is_dead(self) -> bool:
        return self.status.state == "dead"

    @property
    def load(self) -> int:
        return self.num_queued + len(self.inflight)

    def push(self, groups, *, front: bool = False) -> None:
        for g in (reversed(groups) if front else groups):
            (self.queue.appendleft if front else self.queue.append)(g)
            self.num_queued += len(g)

    def pop(self, *, back: bool = False) -> list[Request]:
        g = self.queue.pop() if back else self.queue.popleft()
        self.num_queued -= len(g)
        return g


class WorkerPool:
    """Add requests, call `step()` until `has_work` is false; as Engine, over Ray actors."""

    def __init__(self, lm, config: EngineConfig | None = None, *, num_workers: int, address: str | None = None,
                 dtype: str = "auto", ignore_eos: bool | None = None, engine: str = DEFAULT_ENGINE,
                 max_restarts: int = MAX_RESTARTS, defer_start: bool = False):
        """`config` is each worker's engine configuration, sent to it as it is (EngineConfig.from_spec)."""
        config = config or EngineConfig()
        self.lm, self.max_restarts = lm, max_restarts
        self.session = Session(address, num_workers=num_workers)
        self.ray = self.session.ray
        try:
            options = self.session.actor_options(num_workers)
            self._actor_cls = self.ray.remote(**options)(Worker)
            self._worker_args = dict(dtype=dtype, ignore_eos=ignore_eos, config=config, engine=engine)
            self.slots = [_Slot(i, config.max_batch or 0) for i in range(num_workers)]
            self.stats = EngineStats()
            self.workers = [s.status for s in self.slots]  # the dashboard reads these as they change
            self._retired = EngineStats()
            self._last_row = None  # (row, slot) of the last request added: its other samples follow it
            self._last_error = ""
            self.router = None  # built once the workers say their batch size
            for s in self.slots:
                self._launch(s)
            if not defer_start:
                self.wait_started()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ Engine's interface
    @property
    def max_batch(self) -> int:
        return sum(s.max_batch for s in self.slots if not s.is_dead)

    @property
    def num_waiting(self) -> int:
        return sum(s.num_queued for s in self.slots)

    @property
    def has_work(self) -> bool:
        return any(s.num_queued or s.inflight for s in self.slots)

    def add(self, request: Request) -> None:
        row = _row_of(request.key)
        if self._last_row and self._last_row[0] == row:  # JobLoop adds a row's samples one after another
            slot = self._last_row[1]
            if slot.queue and _row_of(slot.queue[-1][0].key) == row:
                slot.queue[-1].append(request)
                slot.num_queued += 1
            else:
                slot.push([[request]])
            return
        live = {s.index: s.load for s in self.slots if not s.is_dead}
        slot = self.slots[self.router.route(request.tokens, live)]
        slot.push([[request]])
        self._last_row = (row, slot)

    def step(self) -> list[Completion]:
        """Send work where a worker has none on its way, then collect what came back."""
        for s in self.slots:
            self._top_up(s)
        done = self._poll(_WAIT_S)
        self._sum_stats()
        return done

    def close(self) -> None:
        for s in getattr(self, "slots", ()):
            if s.actor is not None:
                self.session.kill(s.actor)
        self.session.close()

    # ------------------------------------------------------------ starting
    def _launch(self, slot: _Slot) -> None:
        slot.actor = self._actor_cls.remote(worker_model(self.lm.name), **self._worker_args)
        slot.calls = [slot.actor.start.remote()]
        slot.is_starting = True

    def wait_started(self, while_waiting=lambda: False) -> None:
        """Every worker up (or given up); lines name each one's pid and host. `while_waiting()` runs
        between looks (the driver renders rows meanwhile) until it returns False."""
        since, is_busy = time.monotonic(), True
        while any(s.is_starting for s in self.slots):
            is_busy = is_busy and while_waiting()
            self._poll(0 if is_busy else _WAIT_S)
            if time.monotonic() - since > 30:
                since = time.monotonic()
                _say(f"waiting for {sum(s.is_starting for s in self.slots)} worker(s) to load {self.lm.name}")
        if not any(s.is_running for s in self.slots):
            raise WorkerError(f"no worker could start ({self._last_error})")
        if self.router is None:
            self.router = PrefixRouter(slack=min(s.max_batch for s in self.slots if s.is_running))
            self._sum_stats()

    def _started(self, slot: _Slot, info: dict) -> None:
        if info.get("protocol") != PROTOCOL:  # an older or newer mlxbatch answers in another shape
            raise WorkerError(f"{slot.status.name} on {info['host']} runs mlxbatch {info.get('version', '?')} "
                              f"(protocol {info.get('protocol', 1)}), the driver {__version__} (protocol {PROTOCOL}): "
                              "every machine needs the same mlxbatch")
        if (info["weights_sha256"], info["dtype"]) != (self.lm.weights_hash, self.lm.dtype):
            raise ModelError(
                f"{slot.status.name} on {info['host']} loads {self.lm.name} as {info['dtype']} with weights sha256 "
                f"{info['weights_sha256'][:12]}, the driver as {self.lm.dtype} with {self.lm.weights_hash[:12]}: "
                "every machine needs the same model files (and --dtype when backends differ)")
        adapters = getattr(self.lm, "adapters", None)  # a LoadedModel has them; a stand-in may not
        wanted = adapter_files.digest(adapters) if adapters else ""
        if info.get("adapters_sha256", "") != wanted:
            raise ModelError(f"{slot.status.name} on {info['host']} reads other adapter files than the driver: "
                             "every machine needs the same adapter files at the same paths")
        slot.is_starting = False
        slot.max_batch = info["max_batch"]
        slot.stats = EngineStats(capacity=slot.max_batch, forward=info["forward"])  # until its first results
        st = slot.status
        st.state, st.host, st.pid = "running", info["host"], info["pid"]
        gpu = f", GPU {info['gpus']}" if info.get("gpus") else ""
        _say(f"{st.name}: pid {st.pid} on {st.host} ({info['backend']}{gpu}, {info['dtype']}, max batch {slot.max_batch})")

    # ------------------------------------------------------------ calls in flight
    def _top_up(self, slot: _Slot) -> None:
        while slot.is_running and len(slot.calls) < _CALLS_IN_FLIGHT and self._send(slot):
            pass

    def _send(self, slot: _Slot) -> bool:
        """One work() call with the requests that bring the worker up to its outstanding target."""
        if not slot.queue:
            self._steal_for(slot)
        room, batch = _OUTSTANDING_BATCHES * slot.max_batch - len(slot.inflight), []
        while slot.queue and room > 0:
            group = slot.pop()
            room -= len(group)
            batch += group
        if not batch and (slot.calls or not slot.inflight):
            return False  # the call in flight carries on with what it holds: no empty round trips
        for r in batch:
            slot.inflight[r.key] = r
        slot.calls.append(slot.actor.work.remote([(r.key, r.tokens, r.params, r.adapter) for r in batch], BUDGET_S))
        return True

    def _steal_for(self, thief: _Slot) -> None:
        """An idle worker takes rows queued for one that is not running, or beyond a busy one's next batch."""
        victim = max((s for s in self.slots if s is not thief and s.queue), key=lambda s: s.num_queued, default=None)
        if victim is None:
            return
        keep = victim.max_batch if victim.is_running else 0
        room = _OUTSTANDING_BATCHES * thief.max_batch - len(thief.inflight)
        while victim.queue and victim.num_queued - len(victim.queue[-1]) >= keep and thief.num_queued < room:
            thief.push([victim.pop(back=True)], front=True)

    def _poll(self, timeout: float) -> list[Completion]:
        """Results of every call that has finished (waiting up to `timeout` for the first)."""
        calls = {ref: s for s in self.slots for ref in s.calls}
        if not calls:
            if self.has_work and all(s.is_dead for s in self.slots):
                raise WorkerError(f"every worker was lost (last: {self._last_error}); committed rows are kept, "
                                  "rerun the command to go on")
            return []
        ready, _ = self.ray.wait(list(calls), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = self.ray.wait(list(calls), num_returns=len(calls), timeout=0)
        done: list[Completion] = []
        for ref in ready:
            slot = calls[ref]
            if ref not in slot.calls:
                continue  # the worker was lost earlier in this loop: its other calls are void
            slot.calls.remove(ref)
            try:
                result = self.ray.get(ref)
            except Exception as exc:  # the actor died, its node was lost, or its call raised
                self._lost(slot, exc)
                continue
            if slot.is_starting:
                self._started(slot, result)
            else:
                done += self._received(slot, *result)
            self._top_up(slot)  # the next call goes out at once
        return done

    def _received(self, slot: _Slot, completions: list[Completion], stats: EngineStats,
                  busy_s: float) -> list[Completion]:
        # Only keys this worker holds are delivered: nothing arrives twice, nothing from a replaced actor.
        out = [c for c in completions if slot.inflight.pop(c.key, None) is not None]
        slot.stats = stats
        slot.status.done += len(out)
        slot.status.busy_s += busy_s
        now = time.monotonic()
        slot.rates.append((now, stats.generated_tokens))
        while len(slot.rates) > 2 and now - slot.rates[0][0] > _RATE_WINDOW_S:
            slot.rates.popleft()
        (t0, g0), (t1, g1) = slot.rates[0], slot.rates[-1]
        slot.status.gen_tok_s = (g1 - g0) / (t1 - t0) if t1 > t0 else 0.0
        return out

    # ------------------------------------------------------------ faults
    def _lost(self, slot: _Slot, exc: Exception) -> None:
        """Kill it for good, put its rows back at the front, then restart it or give it up."""
        self.session.kill(slot.actor)
        slot.calls = []  # results of its other calls are never read
        requests = list(slot.inflight.values())
        slot.inflight.clear()
        slot.push([list(g) for _, g in groupby(requests, key=lambda r: _row_of(r.key))], front=True)
        self._retire(slot)
        self._last_error = _describe(exc)
        st = slot.status
        # A start() that raised (the model is missing there, say) would raise again: no restart.
        is_retried = not (slot.is_starting and isinstance(exc, self.ray.exceptions.RayTaskError))
        if is_retried and st.restarts < self.max_restarts:
            st.restarts += 1
            st.state, st.pid = "restarting", 0
            _say(f"{st.name}: lost ({self._last_error}); {len(requests)} requests back in the queue; "
                 f"restarting ({st.restarts} of {self.max_restarts})")
            self._launch(slot)
            return
        why = "no restarts left" if is_retried else "it could not start"
        st.state, slot.is_starting = "dead", False
        _say(f"{st.name}: lost ({self._last_error}); {why}, its {slot.num_queued} queued requests go "
             "to the other workers")
        self._hand_over(slot)

    def _hand_over(self, slot: _Slot) -> None:
        """A dead worker's queue goes to the least-loaded live ones, row by row."""
        live = [s for s in self.slots if not s.is_dead]
        while slot.queue and live:
            min(live, key=lambda s: s.load).push([slot.pop()])
        if self._last_row and self._last_row[1] is slot:
            self._last_row = None

    def _retire(self, slot: _Slot) -> None:
        for name in _CUMULATIVE:  # its counters stay in the totals: they never go backwards
            setattr(self._retired, name, getattr(self._retired, name) + getattr(slot.stats, name))
        slot.stats = EngineStats()
        slot.rates.clear()
        slot.status.gen_tok_s = 0.0

    def _sum_stats(self) -> None:
        """The job's engine counters: every worker's last snapshot, summed in place (JobStats holds this object)."""
        live = [s.stats for s in self.slots if s.is_running]
        for name in _CUMULATIVE:
            setattr(self.stats, name, getattr(self._retired, name) + sum(getattr(x, name) for x in live))
        for name in _NOW:
            setattr(self.stats, name, sum(getattr(x, name) for x in live))
        self.stats.waiting += self.num_waiting
        self.stats.kv_format = next((x.kv_format for x in live if x.kv_format), "")
        forward = next((x.forward for x in live if x.forward), "")
        self.stats.forward = f"{len(live)} workers running: {forward}" if forward else ""
