"""One worker of a `--workers` job: the body of a Ray actor (cluster/pool.py wraps it with `ray.remote`).

Owns: loading the model once, building the engine (an import path, so tests can use a stand-in),
building each constrained request's grammar guide here (guides do not pickle; constraints do),
and stepping the engine in time-boxed calls: one round trip per call, not per step. Does not own:
which rows come here (cluster/pool.py) or anything written to disk (the driver is the single writer).
Imports no Ray: it runs and is tested as a plain object too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import time

from mlxbatch import __version__, models
from mlxbatch.engine.config import EngineConfig
from mlxbatch.models import adapters as adapter_files
from mlxbatch.types import Completion, EngineStats, Request

DEFAULT_ENGINE = "mlxbatch.engine:Engine"
PROTOCOL = 3  # the shape of start()'s and work()'s answers: the driver refuses a worker with another


def load_object(path: str):
    """`package.module:Name`, or `/path/to/file.py:Name` for a module that is not installed."""
    where, _, name = path.rpartition(":")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


class Worker:
    def __init__(self, model: str, *, dtype: str, ignore_eos: bool | None, config: EngineConfig,
                 engine: str = DEFAULT_ENGINE):
        self.args = dict(model=model, dtype=dtype, ignore_eos=ignore_eos)
        self.config = config  # the job's engine settings; its adapters are (name, absolute path or None)
        self.engine_path = engine
        self.engine = None
        self.grammars = None

    def start(self) -> dict:
        """Load the model and build the engine; what the driver checks and shows."""
        lm = models.load(self.args["model"], dtype=self.args["dtype"], ignore_eos=self.args["ignore_eos"])
        opened = adapter_files.open_all(self.config.adapters)
        for adapter in opened:
            adapter_files.load_weights(adapter, lm.model)
        lm.adapters = opened
        self.engine = load_object(self.engine_path)(lm, self.config)
        self.tokenizer = lm.tokenizer
        return {"pid": os.getpid(), "host": socket.gethostname(), "version": __version__, "protocol": PROTOCOL,
                "weights_sha256": lm.weights_hash, "adapters_sha256": adapter_files.digest(opened) if opened else "",
                "dtype": lm.dtype, "max_batch": self.engine.max_batch, "backend": models.backend(),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),  # Ray's placement, where it gave GPUs
                "forward": self.engine.stats.forward}

    def work(self, requests: list[tuple], budget_s: float) -> tuple[list[Completion], EngineStats, float]:
        """Add (key, tokens, params, adapter) requests, then step until `budget_s` has passed or nothing is left;
        returns what finished, the engine's counters and the seconds this call spent."""
        started = time.monotonic()
        for key, tokens, params, adapter in requests:
            self.engine.add(Request(key, tokens, params, self._guide(params.constraint), adapter))
        done: list[Completion] = []
        deadline = started + budget_s
        while self.engine.has_work and time.monotonic() < deadline:
            done.extend(self.engine.step())
        return done, self.engine.stats, time.monotonic() - started

    def _guide(self, constraint):
        if constraint is None:
            return None
        if self.grammars is None:
            from mlxbatch.job.grammar import Grammars

            self.grammars = Grammars(self.tokenizer)  # compiles each distinct constraint once
        return self.grammars.guide(constraint)
