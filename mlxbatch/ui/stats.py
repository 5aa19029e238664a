"""Job progress numbers, shared by the runner (writes) and the dashboard (reads).

Owns: counters, rates over a sliding window and overall, ETA, memory. Does not
own: presenting them (ui/dashboard.py).
"""

from __future__ import annotations

import resource
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from mlxbatch.types import EngineStats, WorkerStatus

_WINDOW_SECONDS = 10.0


def rss_mb() -> float:
    """Peak resident memory of this process in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


@dataclass
class JobStats:
    total_rows: int = 0
    done_before: int = 0  # rows committed by earlier runs
    done_now: int = 0  # rows finished by this run (results + errors)
    errors: int = 0  # error records, all runs
    prompt_tokens: int = 0  # this run
    generated_tokens: int = 0  # this run
    constrained: int = 0  # outputs with a schema or regex, this run
    constrained_truncated: int = 0  # of which cut off by max_tokens before they closed (parsed: null)
    started: float = field(default_factory=time.monotonic)
    engine: EngineStats = field(default_factory=EngineStats)
    workers: list[WorkerStatus] = field(default_factory=list)  # a --workers job's workers
    model: str = ""
    device: str = ""
    output: str = ""
    _samples: deque = field(default_factory=deque)

    @property
    def done(self) -> int:
        return self.done_before + self.done_now

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def sample(self) -> None:
        """Record a point for the windowed rates."""
        now = time.monotonic()
        self._samples.append((now, self.engine.prompt_computed, self.engine.generated_tokens, self.done_now))
        while len(self._samples) > 2 and now - self._samples[0][0] > _WINDOW_SECONDS:
            self._samples.popleft()

    def _rate(self, i: int) -> float:
        if len(self._samples) < 2:
            return 0.0
        a, b = self._samples[0], self._samples[-1]
        return (b[i] - a[i]) / max(b[0] - a[0], 1e-9)

    @property
    def prompt_tps_now(self) -> float:
        return self._rate(1)

    @property
    def gen_tps_now(self) -> float:
        return self._rate(2)

    @property
    def gen_tps_avg(self) -> float:
        return self.engine.generated_tokens / max(self.elapsed, 1e-9)

    @property
    def prompt_tps_avg(self) -> float:
        return self.engine.prompt_computed / max(self.elapsed, 1e-9)

    @property
    def eta_seconds(self) -> float | None:
        rate = self._rate(3) or (self.done_now / max(self.elapsed, 1e-9))
        left = self.total_rows - self.done
        return left / rate if rate > 0 and left >= 0 else None

    @property
    def prefix_hit_rate(self) -> float:
        e = self.engine
        return e.prefix_hit_tokens / e.prompt_tokens if e.prompt_tokens else 0.0

    @property
    def padding_fraction(self) -> float:
        """Share of prefill work spent on padding (rows of a unit padded to its longest)."""
        e = self.engine
        return e.prompt_padding / (e.prompt_padding + e.prompt_computed) if e.prompt_computed else 0.0

    @property
    def occupancy(self) -> float:
        return self.engine.active / self.engine.capacity if self.engine.capacity else 0.0

    def memory(self) -> dict:
        import mlx.core as mx  # here, not at the top: `status` reads fmt_duration without loading MLX

        return {"rss_peak_mb": round(rss_mb(), 1), "mlx_active_mb": round(mx.get_active_memory() / 1e6, 1),
                "mlx_peak_mb": round(mx.get_peak_memory() / 1e6, 1)}

    def snapshot(self) -> dict:
        e = self.engine
        return {
            "t": round(self.elapsed, 2), "done": self.done, "total": self.total_rows, "errors": self.errors,
            "prompt_tok_s": round(self.prompt_tps_now, 1), "gen_tok_s": round(self.gen_tps_now, 1),
            "gen_tok_s_avg": round(self.gen_tps_avg, 1), "active": e.active, "waiting": e.waiting,
            "prompt_tokens": e.prompt_tokens, "prompt_computed": e.prompt_computed,
            "prompt_padding": e.prompt_padding, "prefix_hit_tokens": e.prefix_hit_tokens,
            "generated_tokens": e.generated_tokens, "kv_mb": round(e.kv_bytes / 1e6, 1),
            "kv_shared_mb": round(e.kv_shared_bytes / 1e6, 1), "kv_peak_mb": round(e.kv_peak_bytes / 1e6, 1),
            "kv_budget_mb": round(e.kv_budget_bytes / 1e6, 1), "oom_retries": e.oom_retries,
            "constrained": self.constrained,
            "constrained_truncated": self.constrained_truncated, **self.memory(),
            **({"workers": [_worker_snapshot(w) for w in self.workers]} if self.workers else {}),
        }


def _worker_snapshot(w: WorkerStatus) -> dict:
    return {**asdict(w), "gen_tok_s": round(w.gen_tok_s, 1), "busy_s": round(w.busy_s, 2)}


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
