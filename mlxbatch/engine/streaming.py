"""Streamed layers: a layer's weights read from the model's safetensors just before its forward.

Owns: turning a model's layer into a streamed one (its class swapped for a subclass whose call
brings the weights in, issues the next streamed layer's read, runs the layer, evaluates its output
and drops the weights), the reads themselves (`mx.load` is lazy per tensor: a fresh lazy array per
pass, read when evaluated, on a stream of its own so it overlaps the compute), and the counters
(bytes read, seconds the forward waited on a read). The module tree is unchanged (adapters find
their layers by name) and each weight is set on the module object that holds it, so a LoRA wrap
around a Linear still sees the streamed weight. Does not own: the plan (offload.py), loading.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class Tensor:
    """One parameter of a streamed layer: the module holding it, its name there, where it is stored."""

    module: nn.Module
    name: str
    file: str
    key: str
    dtype: object  # the dtype it runs in (a float weight stored in another is cast as it is read)


@dataclass
class Streamer:
    """The streamed layers of one model, in forward order, and what reading them cost."""

    layers: list = field(default_factory=list)  # per streamed layer: its Tensors
    bytes_read: int = 0
    wait_s: float = 0.0  # time a forward stalled for a read that had not finished
    reads: int = 0
    _pending: dict = field(default_factory=dict)  # position -> arrays being read
    _stream: object = None

    def __post_init__(self):
        self._stream = mx.new_stream(mx.cpu)  # reads run beside the compute, not queued behind it

    def read(self, pos: int) -> list:
        """Fresh lazy arrays of one streamed layer, their read issued."""
        tensors = self.layers[pos]
        files = {t.file: None for t in tensors}
        for f in files:  # one header parse per shard the layer lives in
            files[f] = mx.load(f, stream=self._stream)
        arrays = [_cast(files[t.file][t.key], t.dtype) for t in tensors]  # in the Tensors' order
        del files
        mx.async_eval(arrays)
        self.bytes_read += sum(a.nbytes for a in arrays)
        self.reads += 1
        return arrays

    def begin(self, pos: int) -> None:
        """Set layer `pos`'s weights (read ahead, or now) and issue the next streamed layer's read."""
        arrays = self._pending.pop(pos, None)
        if arrays is None:
            arrays = self.read(pos)
        nxt = (pos + 1) % len(self.layers)
        if nxt not in self._pending:
            self._pending[nxt] = self.read(nxt)
        t = time.perf_counter()
        mx.eval(arrays)  # only the wait: the read was issued a layer ago
        self.wait_s += time.perf_counter() - t
        for tensor, a in zip(self.layers[pos], arrays):
            setattr(tensor.module, tensor.name, a)

    def end(self, pos: int, placeholders: list) -> None:
        for tensor, a in zip(self.layers[pos], placeholders):
            setattr(tensor.module, tensor.name, a)

    def drop_pending(self) -> None:
        self._pending.clear()


def _cast(a: mx.array, dtype) -> mx.array:
    return a.astype(dtype) if dtype is not None and a.dtype != dtype else a


def install(layer: nn.Module, streamer: Streamer, tensors: list) -> None:
    """Make `layer` a streamed layer: its class becomes a subclass whose call streams its weights.
    Its current (lazy, never evaluated) arrays stay as placeholders between calls."""
    pos = len(streamer.layers)
    streamer.layers.append(tensors)
    base = type(layer)
    cls = _STREAMED.get(base) or _STREAMED.setdefault(base, type(f"Streamed{base.__name__}", (base,),
                                                                 {"__call__": _streamed_call}))
    object.__setattr__(layer, "_stream_pos", pos)
    object.__setattr__(layer, "_streamer", streamer)
    object.__setattr__(layer, "_placeholders", [getattr(t.module, t.name) for t in tensors])
    layer.__class__ = cls


_STREAMED: dict = {}


def _streamed_call(self, *args, **kwargs):
    s, pos = self._streamer, self._stream_pos
    s.begin(pos)
    try:
        out = super(type(self), self).__call__(*args, **kwargs)
        mx.eval(out, *_cache_arrays(args, kwargs))  # computed now: this layer's weights can go
    finally:
        s.end(pos, self._placeholders)
    return out


def _cache_arrays(args, kwargs) -> list:
    """The layer cache's buffers (written by this layer: the write holds the weights' graph)."""
    cache = kwargs.get("cache", args[2] if len(args) > 2 else None)
    out = []
    for name in ("keys", "values"):
        x = getattr(cache, name, None)
        out += list(x) if isinstance(x, tuple) else [x] if isinstance(x, mx.array) else []
    return out


def measure_bandwidth(streamer: Streamer, *, num_layers: int = 2) -> float:
    """Bytes/s of the streamed reads as a forward makes them (read and evaluated, one at a time)."""
    n = min(num_layers, len(streamer.layers))
    before, t = streamer.bytes_read, time.perf_counter()
    for pos in range(n):
        arrays = streamer.read(pos)
        mx.eval(arrays)
        del arrays
    secs = time.perf_counter() - t
    read = streamer.bytes_read - before
    streamer.bytes_read, streamer.reads = before, streamer.reads - n  # a probe, not a step
    return read / max(secs, 1e-9)


def file_read_bandwidth(files: list, *, max_bytes: int = 2 << 30) -> float:
    """Bytes/s of plain reads of the shard files (the disk, or the page cache where they sit in it)."""
    buf = bytearray(64 << 20)
    view, total, t = memoryview(buf), 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while total < max_bytes and (n := fh.readinto(view)):
                total += n
        if total >= max_bytes:
            break
    return total / max(time.perf_counter() - t, 1e-9)
