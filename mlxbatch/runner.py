"""`run_job(spec)`: wires source -> render -> engine -> sink + checkpoint.

Owns: the main loop (feed the look-ahead window, step the engine, commit
finished rows by time and by count), duplicate-id detection (on ids as
written), signal handling while the loop runs (a first SIGINT/SIGTERM/SIGHUP
stops and commits, a second exits at once), the manifest, the metrics log and
the end-of-job Parquet export. Does not own: any stage's internals, file names
or the state schema (output/checkpoint.py), or how the process exits (cli/__init__.py).
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import orjson

from mlxbatch import exits, models, startup
from mlxbatch.engine import Engine, Request
from mlxbatch.engine.config import EngineConfig
from mlxbatch.engine.core import GPU_MAX_BATCH
from mlxbatch.engine.protocol import BatchEngine
from mlxbatch.errors import (
    InputFileError,
    Interrupted,
    MlxbatchError,
    ModelError,
    RowError,
    UsageError,
    WorkerError,
)
from mlxbatch.job import source
from mlxbatch.job.grammar import GrammarError, Grammars
from mlxbatch.job.ids import IdSet, written_id
from mlxbatch.job.render import Item, Renderer, raw_id, request_params
from mlxbatch.job.spec import JobSpec
from mlxbatch.models import adapters as adapter_files
from mlxbatch.output.checkpoint import (
    ERRORS,
    METRICS,
    RESULTS,
    Checkpoint,
    make_state,
    read_state,
)
from mlxbatch.output.fs import open_append
from mlxbatch.output.records import RecordMaker, check_kept_fields, write_parquet
from mlxbatch.ui.stats import JobStats

_COMMIT_ROWS = 512  # also commit once this many rows wait, however short the time since the last
_METRICS_SECONDS = 10.0
_RENDER_BATCH = 64  # rows tokenized per call (the tokenizer runs a batch in parallel)


@dataclass
class _InFlight:
    item: Item
    done: list = field(default_factory=list)
    remaining: int = 0
    error: tuple | None = None  # (code, message) of a sample that could not run: the row is an error record


STOP_SIGNALS = exits.EXIT_SIGNALS


class _StopFlag:
    """A first SIGINT/SIGTERM/SIGHUP asks for a clean stop; a second one exits at once."""

    def __init__(self):
        self.is_set = False

    def handle(self, signum, frame) -> None:
        if self.is_set:
            exits.leave_now("interrupted again; leaving now (committed rows are safe)")
        self.is_set = True


@contextmanager
def _signals(flag: _StopFlag):
    if threading.current_thread() is not threading.main_thread():
        yield  # a job run by a server's thread: the server sets `flag` itself (only the main thread gets signals)
        return
    old = {s: signal.signal(s, flag.handle) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def build_manifest(spec: JobSpec, lm: models.LoadedModel) -> dict:
    template = getattr(lm.tokenizer, "chat_template", None) or ""
    manifest = {
        "input": source.fingerprint(spec.input),
        "model": {"name": lm.name, "weights_sha256": lm.weights_hash, "dtype": lm.dtype},
        "settings": spec.resume_settings(),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
    }
    if lm.adapters:  # by content: a resume with a retrained checkpoint is refused like a changed setting
        manifest["adapters"] = adapter_files.manifest(lm.adapters)
    return manifest


def _check_columns(spec: JobSpec) -> None:
    """A Parquet file without any usable column is a job-level error, not N row errors."""
    if source.kind_of(spec.input) != "parquet":
        return
    cols = source.parquet_columns(spec.input)
    usable = {spec.prompt_field, spec.messages_field, "custom_id", "body"}
    if not usable & set(cols):
        raise InputFileError(f"{spec.input}: no {spec.prompt_field!r}, {spec.messages_field!r} or OpenAI "
                             f"'body' column (columns: {', '.join(cols)}); map one with --prompt-field")


class JobLoop:
    """One run over the input; `run()` returns when the input is done or a stop was asked."""

    def __init__(self, spec: JobSpec, lm: models.LoadedModel, cp: Checkpoint, stats: JobStats,
                 progress: Callable[[JobStats], None] | None, engine_factory: Callable[..., BatchEngine] = Engine):
        self.spec, self.lm, self.cp, self.stats = spec, lm, cp, stats
        self.progress = progress or (lambda s: None)
        self.renderer = Renderer(spec, lm.tokenizer, lm.context_length, names=lm.names)
        self.maker = RecordMaker(spec.output_format, lm.name, lm.tokenizer, spec.adapter_names,
                                 reasoning=spec.reasoning)
        self.grammars = Grammars(lm.tokenizer)  # compiles each distinct constraint once, on first use
        self.rows = source.read_rows(spec.input)
        self.is_exhausted = False
        self.seen = IdSet()
        self.ready: deque[tuple[source.Row, Item]] = deque()  # rendered, not yet given to the engine
        self.inflight: dict[int, _InFlight] = {}
        self.stop = _StopFlag()
        self.engine: BatchEngine = engine_factory(lm, EngineConfig.from_spec(spec))
        if self.engine.workers:
            self._start_workers()
        self.window = max(4 * self.engine.max_batch, 256)
        self.stats.engine = self.engine.stats
        self.stats.workers = self.engine.workers  # a pool's worker statuses, kept current
        self._last_metrics = 0.0
        self._prev_state = read_state(cp.folder)  # counters of earlier runs, added to this run's

    def run(self) -> bool:
        """True when every row has a record."""
        startup.mark("checkpoint and engine setup")
        num_steps = 0
        with _signals(self.stop):
            while not self.stop.is_set:
                self._feed()
                if not self.engine.has_work and self.is_exhausted:
                    break
                for c in self.engine.step():
                    self._finish_sample(c)
                num_steps += 1
                if num_steps <= 2:  # the first has the first rows' render and prefill; the second is a decode step
                    startup.mark("first engine step (render, prefill)" if num_steps == 1 else "second engine step")
                self._tick()
        self.commit()
        self._write_metrics()  # the run's last line: its totals (a worker's busy time among them)
        return self.is_exhausted and not self.inflight and not self.stop.is_set

    def _start_workers(self) -> None:
        """Render the first rows while the workers start and load the model, then start the job's clock:
        Ray's start and the model loads are not job time, as loading the model is not on one machine."""
        # The workers' batch is unknown until they are up: a GPU engine's default stands in for it.
        ahead = 4 * (self.spec.batch_size or GPU_MAX_BATCH) * max(len(self.engine.workers), 1)
        try:
            self.engine.wait_started(lambda: self._render_ahead(ahead))
        except BaseException:
            self.engine.close()
            raise
        self.stats.started = time.monotonic()

    def _feed(self) -> None:
        """Top up the look-ahead window with rendered rows."""
        while self.engine.num_waiting < self.window and not self.stop.is_set:
            if not self.ready:
                if self.is_exhausted:
                    return
                self._render_ahead(1)
                continue
            self._admit(*self.ready.popleft())

    def _render_ahead(self, limit: int) -> bool:
        """Render and tokenize rows (a batch per call) until `limit` are ready; False once there is nothing to do."""
        if self.is_exhausted or len(self.ready) >= limit:
            return False
        batch = []
        while len(batch) < _RENDER_BATCH:
            row = next(self.rows, None)
            if row is None:
                self.is_exhausted = True
                break
            if self._is_duplicate(row) and not self.cp.is_done(row.index):
                self._error(row, RowError("duplicate_id", f"line {row.line}: id "
                            f"{raw_id(row, self.spec.id_field)!r} appeared earlier in the input"))
            elif not self.cp.is_done(row.index):
                batch.append(row)
        for row, rendered in zip(batch, self.renderer.render_many(batch)):
            if isinstance(rendered, RowError):
                self._error(row, rendered)
            else:
                self.ready.append((row, rendered))
        return True

    def _is_duplicate(self, row: source.Row) -> bool:
        """Ids are compared as written: 77 and "77", or line 95's `line-95` and an explicit one, clash."""
        rid = written_id(row, self.spec.id_field)
        return rid is not None and not self.seen.add(rid)

    def _admit(self, row: source.Row, item: Item) -> None:
        try:
            guides = [self._guide(item) for _ in range(item.n * max(len(item.adapters), 1))]
        except GrammarError as exc:
            self._error(row, RowError("invalid_schema", f"line {row.line}: {exc}"))
            return
        adapters = item.adapters or (0,)
        total = item.n * len(adapters)  # n samples per adapter, adapter after adapter
        self.inflight[row.index] = _InFlight(item, [None] * total, total)
        for k in range(total):  # sample k % n draws the same seed under every adapter: a fair comparison
            self.engine.add(Request((row.index, k), item.tokens, request_params(item, k % item.n), guides[k],
                                    adapters[k // item.n]))

    def _guide(self, item: Item):
        c = item.params.constraint
        return None if c is None else self.grammars.guide(c)

    def _error(self, row: source.Row, err: RowError) -> None:
        rid = raw_id(row, self.spec.id_field)
        is_openai = bool(row.data and ("custom_id" in row.data or "body" in row.data))
        record = self.maker.error(line=row.line, rid=rid if isinstance(rid, (str, int)) else None, code=err.code,
                                  message=err.message, custom_id=rid if is_openai and isinstance(rid, str) else None,
                                  is_openai=is_openai)
        self._add_error(row.index, record)

    def _add_error(self, index: int, record: dict) -> None:
        self.cp.add(index, ERRORS, record)
        self.stats.done_now += 1
        self.stats.errors += 1

    def _engine_error(self, index: int, slot: _InFlight) -> None:
        """A row whose sample the engine could not run (out of memory even alone): its error record."""
        item, (code, message) = slot.item, slot.error
        record = self.maker.error(line=item.line, rid=item.custom_id if item.is_openai else item.id, code=code,
                                  message=f"line {item.line}: {message}", custom_id=item.custom_id,
                                  is_openai=item.is_openai)
        self._add_error(index, record)

    def _finish_sample(self, c) -> None:
        index, sample = c.key
        slot = self.inflight[index]
        slot.done[sample] = c
        slot.remaining -= 1
        slot.error = slot.error or c.error
        if slot.item.params.constraint is not None and c.error is None:
            self.stats.constrained += 1
            self.stats.constrained_truncated += c.finish_reason == "length"
        if slot.remaining == 0:
            del self.inflight[index]
            if slot.error is not None:
                self._engine_error(index, slot)
                return
            self.cp.add(index, RESULTS, self.maker.records(slot.item, slot.done))
            self.stats.done_now += 1

    def _tick(self) -> None:
        self.stats.sample()
        now = time.monotonic()
        if now - self.cp.last_commit >= self.spec.commit_seconds or self.cp.num_pending >= _COMMIT_ROWS:
            self.commit()
        if now - self._last_metrics >= _METRICS_SECONDS:
            self._write_metrics()
        self.progress(self.stats)

    def _write_metrics(self) -> None:
        self._last_metrics = time.monotonic()
        with open_append(self.cp.folder / METRICS) as f:  # best effort, not fsynced
            f.write(orjson.dumps(self.stats.snapshot(), option=orjson.OPT_APPEND_NEWLINE))

    def commit(self, *, complete: bool = False) -> None:
        prev, s = self._prev_state, self.stats
        state = make_state(
            rows_done=self.cp.num_done, rows_total=s.total_rows, errors=self.cp.num_errors, complete=complete,
            generated_tokens=prev.get("generated_tokens", 0) + s.engine.generated_tokens,
            prompt_tokens=prev.get("prompt_tokens", 0) + s.engine.prompt_tokens,
            seconds=round(prev.get("seconds", 0) + s.elapsed, 2),
            constrained=prev.get("constrained", 0) + s.constrained,
            constrained_truncated=prev.get("constrained_truncated", 0) + s.constrained_truncated,
            gen_tok_s_last_run=round(s.gen_tps_avg, 1), model=s.model, device=s.device,
            kv_format=s.engine.kv_format, kv_peak_mb_last_run=round(s.engine.kv_peak_bytes / 1e6, 1),
            kv_budget_mb_last_run=round(s.engine.kv_budget_bytes / 1e6, 1),
            oom_retries=prev.get("oom_retries", 0) + s.engine.oom_retries)
        self.cp.commit(state)


def attach_adapters(lm: models.LoadedModel, opened: list) -> None:
    """The job's adapters on the loaded model, each checked against it (the engine applies them)."""
    if lm.model is not None:  # a --workers driver holds no weights: each worker checks its own
        for adapter in opened:
            adapter_files.load_weights(adapter, lm.model)
    lm.adapters = opened


def _check_model(spec: JobSpec, lm: models.LoadedModel | None = None) -> None:
    """The architecture and the KV format, checked before the weights load (a usage error, not a
    failure minutes later): a cache kind the engine cannot batch, a KV group size that does not
    divide the head dimension, packed KV where the attention cannot read it. A model already
    loaded (`lm`: bench, the server's batches) is checked as it is: no config read, no hub call."""
    from mlxbatch.engine import arch
    from mlxbatch.engine.kvquant import make

    model = lm.model if lm is not None else None
    config = _model_config(spec) if model is None else {}
    kv = None
    if spec.kv_bits:
        try:
            kv = make(spec.kv_bits, spec.kv_value_bits, spec.kv_group_size,
                      head_dim=arch.head_dim(model.args if model is not None else config))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if model is not None:
        arch.check(model, kv)
    elif config.get("model_type"):
        arch.check_config(config, kv)


def _model_config(spec: JobSpec) -> dict:
    if spec.model.startswith("random:"):
        config = models.random_config(spec.model.split(":", 1)[1])  # an unknown preset or layer count: ModelError now
    else:
        path = models.local_path(spec.model, dtype=spec.dtype)  # what `load` reads next (cached)
        try:
            config = orjson.loads((path / "config.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}  # `load` says what is wrong with the folder
        config = {**config, **config.get("text_config", {})}
    return config


def _workers_factory(spec: JobSpec, engine_factory):
    """The pool of Ray workers, or the caller's own factory (tests pass a pool with a stand-in engine)."""
    from mlxbatch.cluster.session import (
        require_ray,  # Ray is imported only for --workers
    )

    require_ray()
    if engine_factory is not Engine:
        return engine_factory
    from mlxbatch.cluster.pool import pool_factory

    return pool_factory(spec)


def run_job(spec: JobSpec, *, progress: Callable[[JobStats], None] | None = None,
            resume_hint: str = "", lm: models.LoadedModel | None = None, engine_factory=Engine,
            on_loaded: Callable[[], None] | None = None,
            on_loop: Callable[[JobLoop], None] | None = None) -> JobStats:
    """Run (or resume) a job to completion; raises Interrupted after a clean stop.

    `engine_factory(lm, config)` builds the engine from the job's EngineConfig (tests pass a stand-in
    with Engine's interface);
    `on_loaded` runs once the model is loaded (the CLI freezes the collector there);
    `on_loop` gets the job loop before it runs (a server keeps it to read counts and to stop it).
    """
    source.check_readable(spec.input)
    source.kind_of(spec.input)
    _check_columns(spec)
    check_kept_fields(spec.output_format, spec.keep_fields)
    _check_model(spec, lm)
    if spec.workers:
        engine_factory = _workers_factory(spec, engine_factory)  # before loading: no Ray, no load
    # With workers the driver loads no weights: they live on the workers' devices.
    opened = adapter_files.open_all(spec.adapter)  # a bad adapter folder stops before the model loads
    if lm is None and not spec.workers:
        from mlxbatch.models import streamed

        lm = streamed.load(spec)  # None: the model loads as today (it fits, no cap given)
    lm = lm or models.load(spec.model, dtype=spec.dtype, ignore_eos=spec.ignore_eos, weights=not spec.workers)
    attach_adapters(lm, opened)
    if on_loaded:
        on_loaded()
    cp = Checkpoint.open(spec.output_dir, build_manifest(spec, lm), restart=spec.restart)
    device = f"{spec.workers} Ray workers, {lm.dtype}" if spec.workers else \
        f"{models.backend()} {mx.default_device()} {lm.dtype}"
    stats = JobStats(total_rows=source.count_rows(spec.input), done_before=cp.num_done, errors=cp.num_errors,
                     model=lm.name, device=device, output=str(spec.output_dir))
    try:
        loop = JobLoop(spec, lm, cp, stats, progress, engine_factory)
    except BaseException:
        cp.close()
        raise
    if on_loop:
        on_loop(loop)
    try:
        complete = loop.run()
        if complete:
            loop.commit(complete=True)
            if spec.parquet:
                write_parquet(cp.folder)
    except (WorkerError, ModelError):
        loop.commit()  # workers lost, or a replacement loads another model: keep what finished
        raise
    except MlxbatchError:
        raise
    except Exception:
        loop.commit()  # keep what finished before an unexpected failure
        raise
    finally:
        cp.close()
        loop.engine.close()  # a pool stops its workers (and a local Ray)
    if not complete:
        raise Interrupted(f"stopped: {cp.num_done:,}/{stats.total_rows:,} rows committed in {cp.folder}.\n"
                          f"resume with: {resume_hint or 'the same command'}")
    return stats
