"""Presenting job progress: a Rich live panel on a terminal, plain lines otherwise.

Owns: everything the user sees while a job runs and the summary table at the
end. The library (runner, engine) never imports rich; the CLI hands a
Dashboard to the runner as its progress callback.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from mlxbatch.types import WorkerStatus
from mlxbatch.ui.stats import JobStats, fmt_duration

_LIVE_HZ = 4.0
_PLAIN_SECONDS = 5.0


def _table(s: JobStats) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold cyan")
    t.add_column()
    e = s.engine
    pct = 100 * s.done / s.total_rows if s.total_rows else 100.0
    t.add_row("rows", f"{s.done:,}/{s.total_rows:,} ({pct:.1f}%)  errors {s.errors:,}  ETA {fmt_duration(s.eta_seconds)}")
    t.add_row("generation", f"{s.gen_tps_now:,.0f} tok/s now, {s.gen_tps_avg:,.0f} avg  ({e.generated_tokens:,} tokens)")
    t.add_row("prompt", f"{s.prompt_tps_now:,.0f} tok/s now, {s.prompt_tps_avg:,.0f} avg  "
              f"({e.prompt_computed:,} computed of {e.prompt_tokens:,}, {100 * s.padding_fraction:.0f}% padding)")
    t.add_row("batch", f"{e.active} in flight / {e.capacity} slots ({100 * s.occupancy:.0f}%), {e.waiting} waiting")
    if s.constrained:
        t.add_row("structured", _structured(s))
    t.add_row("prefix cache", f"{100 * s.prefix_hit_rate:.0f}% of prompt tokens reused ({e.prefix_hits} cache hits)")
    mem = s.memory()
    t.add_row("memory (driver)" if s.workers else "memory",
              f"MLX {mem['mlx_active_mb']:,.0f} MB (peak {mem['mlx_peak_mb']:,.0f}), RSS peak {mem['rss_peak_mb']:,.0f} MB")
    t.add_row("KV cache", f"{e.kv_bytes / 1e6:,.0f} MB held ({e.kv_shared_bytes / 1e6:,.0f} MB shared prefixes, "
              f"stored once), peak {e.kv_peak_bytes / 1e6:,.0f} MB; prefix LRU {e.prefix_cache_bytes / 1e6:,.0f} MB; "
              + kv_line(e))
    if e.streamed_bytes:
        t.add_row("streaming", stream_line(e, s.elapsed))
    t.add_row("model", f"{s.model} on {s.device}  ->  {s.output}")
    t.add_row("", e.forward)
    for w in s.workers:
        t.add_row(w.name, _worker(w, s.elapsed))
    return t


def _worker(w: WorkerStatus, elapsed: float) -> str:
    where = f"pid {w.pid} on {w.host}" if w.pid else "no process yet"
    restarts = f", {w.restarts} restart{'s' if w.restarts != 1 else ''}" if w.restarts else ""
    # Below 100%: it waited on the driver, or its rows were done.
    busy = f", busy {min(w.busy_s / elapsed, 1):.0%}" if elapsed > 0 else ""
    return f"{w.state:<10} {w.done:,} done, {w.gen_tok_s:,.0f} gen tok/s{busy}  ({where}{restarts})"


def _workers_line(s: JobStats) -> str:
    return "[mlxbatch] workers: " + "; ".join(f"{w.name.removeprefix('worker ')} {_worker(w, s.elapsed)}"
                                              for w in s.workers)


def stream_line(e, elapsed: float) -> str:
    """Weights streamed under a memory cap: the read rate over the job, and what stays resident."""
    return (f"{e.streamed_bytes / 1e9 / max(elapsed, 1e-9):,.2f} GB/s streamed ({e.streamed_bytes / 1e9:,.1f} GB, "
            f"{e.stream_wait_s:,.1f} s waited on reads); {100 * e.resident_share:.0f}% of the weights resident")


def kv_line(e) -> str:
    """How KV is stored and the budget admission works to (lowered after running out of memory)."""
    fmt = e.kv_format or "model dtype"
    budget = f"budget {e.kv_budget_bytes / 1e9:,.2f} GB" if e.kv_budget_bytes else ""
    lowered = f" (lowered after {e.oom_retries} out-of-memory retries)" if e.oom_retries else ""
    return f"{fmt}, {budget}{lowered}" if budget else fmt


def _structured(s: JobStats) -> str:
    return (f"{s.constrained:,} constrained outputs, {s.constrained_truncated:,} cut off by max_tokens "
            "before they closed (parsed: null)")


def _plain_line(s: JobStats) -> str:
    return (f"[mlxbatch] {s.done}/{s.total_rows} rows, {s.errors} errors, {s.gen_tps_now:.0f} gen tok/s "
            f"({s.gen_tps_avg:.0f} avg), {s.prompt_tps_now:.0f} prompt tok/s, {s.engine.active} in flight, "
            + (f"{s.constrained_truncated} of {s.constrained} constrained cut off, " if s.constrained else "")
            + f"prefix reuse {100 * s.prefix_hit_rate:.0f}%, KV {s.engine.kv_bytes / 1e6:.0f} MB ({kv_line(s.engine)}), ETA {fmt_duration(s.eta_seconds)}")


class Dashboard:
    """Call `update(stats)` as often as you like; it throttles itself."""

    def __init__(self, *, is_live: bool | None = None, quiet: bool = False):
        self.console = Console(stderr=True)
        self.is_live = sys.stderr.isatty() if is_live is None else is_live
        self.quiet = quiet
        self._live: Live | None = None
        self._last = 0.0

    def __enter__(self) -> "Dashboard":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _render(self, s: JobStats):
        bar = ProgressBar(total=max(s.total_rows, 1), completed=s.done, width=60)
        return Group(bar, _table(s))

    def update(self, s: JobStats, *, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.is_live:
            if self._live is None:
                self._live = Live(self._render(s), console=self.console, auto_refresh=False, transient=False)
                self._live.start()
            if force or now - self._last >= 1 / _LIVE_HZ:
                self._live.update(self._render(s), refresh=True)
                self._last = now
        elif force or now - self._last >= _PLAIN_SECONDS:
            if not self._last:  # the first line says what runs where (dtype chosen by --dtype auto)
                print(f"[mlxbatch] model {s.model} on {s.device} -> {s.output}", file=sys.stderr, flush=True)
                print(f"[mlxbatch] {s.engine.forward}", file=sys.stderr, flush=True)
            print(_plain_line(s), file=sys.stderr, flush=True)
            if s.workers:
                print(_workers_line(s), file=sys.stderr, flush=True)
            self._last = now

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def summary(self, s: JobStats, *, complete: bool) -> None:
        self.stop()
        t = Table(title="mlxbatch: " + ("job complete" if complete else "job stopped"), show_header=False)
        t.add_column(style="bold")
        t.add_column(justify="right")
        e = s.engine
        for k, v in [("rows done", f"{s.done:,} / {s.total_rows:,}"), ("error records", f"{s.errors:,}"),
                     ("this run", fmt_duration(s.elapsed)), ("generated tokens", f"{e.generated_tokens:,}"),
                     ("generation tok/s", f"{s.gen_tps_avg:,.1f}"),
                     ("prompt tokens computed / total", f"{e.prompt_computed:,} / {e.prompt_tokens:,}"),
                     ("prefix reuse", f"{100 * s.prefix_hit_rate:.0f}%"), ("output", s.output)]:
            t.add_row(k, v)
        if s.constrained:
            t.add_row("constrained cut off / total", f"{s.constrained_truncated:,} / {s.constrained:,}")
        self.console.print(t)
