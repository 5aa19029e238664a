"""What the runner drives: one interface for the in-process Engine and the Ray WorkerPool.

Owns: the `BatchEngine` protocol (add requests, step until no work is left, read its counters;
a pool also has workers to start and stop). The runner calls only these, on either, with no
type checks; it builds either as `factory(lm, config)` with the job's one EngineConfig
(engine/config.py). Does not own: either implementation (engine/core.py, cluster/pool.py).
"""

from __future__ import annotations

from typing import Callable, Protocol

from mlxbatch.types import Completion, EngineStats, Request, WorkerStatus


class BatchEngine(Protocol):
    max_batch: int  # rows decoded together (a pool: the sum over its live workers)
    stats: EngineStats
    workers: list[WorkerStatus]  # a pool's workers, kept current for the dashboard; [] in process

    def add(self, request: Request) -> None: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def has_work(self) -> bool: ...

    def step(self) -> list[Completion]:
        """One round: the rows that finished (a pool: what its workers sent back)."""
        ...

    def wait_started(self, while_waiting: Callable[[], bool] = lambda: False) -> None:
        """Block until every worker is up, calling `while_waiting` meanwhile (nothing to wait for in process)."""
        ...

    def close(self) -> None:
        """Stop what the engine started (a pool: its workers and a local Ray)."""
        ...
