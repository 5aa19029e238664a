"""The shapes compiled code sees, kept to a bounded set, and a count of how often MLX traces.

Owns: the batch's row buckets (a running batch always holds a bucket's number of rows, the rest
dead, so a server's ever-changing batch meets a few dozen shapes, not every size; each new shape
is a trace and, on a GPU, kernel builds inside an engine step) and `compiled`, mx.compile with
a trace counter (a traced function's Python body runs only when MLX traces it). Does not own:
which rows run (core.py), the compiled functions themselves (fused.py, attention.py).
"""

from __future__ import annotations

import logging
from collections import Counter

import mlx.core as mx

log = logging.getLogger("mlxbatch.engine")

TRACES: Counter = Counter()  # traces per compiled function name, process-wide
_SMALL = 8  # up to this many rows: powers of two


def row_bucket(n: int, *, cap: int | None = None) -> int:
    """The rows a batch of n live rows holds: powers of two up to 8, then steps of an eighth to a
    quarter of the size (16, 24, 32, 40, ..., 64, 80, ..., 128, 160, ...), capped at `cap`."""
    if n <= 1:
        b = 1
    elif n <= _SMALL:
        b = 1 << (n - 1).bit_length()
    else:
        step = max(_SMALL, 1 << ((n - 1).bit_length() - 3))
        b = -(-n // step) * step
    return max(n, min(b, cap)) if cap else b


def row_buckets(cap: int) -> list[int]:
    """Every bucket up to `cap` rows (what a warm-up traces)."""
    out, n = [], 1
    while n <= cap:
        out.append(row_bucket(n, cap=cap))
        n = out[-1] + 1
    return out


def num_traces() -> int:
    return sum(TRACES.values())


def compiled(fn, name: str):
    """mx.compile(fn), counting each trace under `name` (and logging it with the input shapes)."""
    def traced(*args):
        TRACES[name] += 1
        log.info("compile %s #%d: input shapes %s", name, TRACES[name], [getattr(a, "shape", None) for a in args[:3]])
        return fn(*args)
    return mx.compile(traced)
