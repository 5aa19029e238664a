"""Probe: is a compiled, fixed-shape decode step faster than the dynamic one on this device?"""
import sys
import time

import mlxbatch  # noqa: F401
import mlx.core as mx

from mlxbatch import models
from mlxbatch.kvcache import BatchCache, forward_last

B = int(sys.argv[1]) if len(sys.argv) > 1 else 325
STEPS, T0, TBUF = 100, 60, 256
lm = models.load("random:smollm2-135m")
model = lm.model
L = len(model.layers)
args = model.args
H, D = args.num_key_value_heads, args.hidden_size // args.num_attention_heads
dt = mx.bfloat16 if models.backend() != "cpu" else mx.float32


def dynamic():
    cache = BatchCache(L, B)
    cache.layout.begin(mx.ones((B, T0), dtype=mx.bool_))
    logits = forward_last(model, mx.zeros((B, T0), dtype=mx.int32), cache)
    tok = mx.argmax(logits, -1)
    mx.eval(tok)
    t = time.perf_counter()
    prev = tok
    for _ in range(STEPS):
        cache.layout.begin(mx.ones((B, 1), dtype=mx.bool_))
        nxt = mx.argmax(forward_last(model, prev[:, None], cache), -1)
        mx.async_eval(nxt)
        prev.tolist()
        prev = nxt
    prev.tolist()
    return (time.perf_counter() - t) / STEPS * 1000


class FixedCache:
    def __init__(self, k, v, idx, valid, offset):
        self.keys, self.values, self.idx, self.valid, self.offset = k, v, idx, valid, offset

    def update_and_fetch(self, k, v):
        start = mx.concatenate([mx.zeros((2,), mx.int32), self.idx.reshape(1), mx.zeros((1,), mx.int32)])
        self.keys = mx.slice_update(self.keys, k, start, axes=(0, 1, 2, 3))
        self.values = mx.slice_update(self.values, v, start, axes=(0, 1, 2, 3))
        return self.keys, self.values

    def make_mask(self, N, **kw):
        cols = mx.arange(self.valid.shape[1])
        return (self.valid | (cols == self.idx)[None])[:, None, None, :]


def step(tokens, idx, valid, offset, *kv):
    caches = [FixedCache(kv[2 * i], kv[2 * i + 1], idx, valid, offset) for i in range(L)]
    h = model.model(tokens[:, None], cache=caches)[:, -1]
    logits = model.model.embed_tokens.as_linear(h)
    out = [mx.argmax(logits, -1)]
    for c in caches:
        out += [c.keys, c.values]
    return tuple(out)


def fixed(compiled: bool):
    f = mx.compile(step) if compiled else step
    kv = [mx.zeros((B, H, TBUF, D), dt) for _ in range(2 * L)]
    valid = mx.concatenate([mx.ones((B, T0), mx.bool_), mx.zeros((B, TBUF - T0), mx.bool_)], 1)
    offset = mx.full((B,), T0, mx.int32)
    tok = mx.zeros((B,), mx.int32)
    mx.eval(kv, valid)
    t = None
    for s in range(STEPS + 3):
        if s == 3:
            mx.eval(tok)
            t = time.perf_counter()
        idx = mx.array(T0 + s, mx.int32)
        out = f(tok, idx, valid, offset, *kv)
        nxt, kv = out[0], list(out[1:])
        valid = valid | (mx.arange(TBUF) == idx)[None]
        offset = offset + 1
        mx.async_eval(nxt)
        tok.tolist()
        tok = nxt
    tok.tolist()
    return (time.perf_counter() - t) / STEPS * 1000


for name, fn in [("dynamic", dynamic), ("fixed", lambda: fixed(False)), ("fixed+compile", lambda: fixed(True))]:
    fn()
    print(f"{name:14s} B={B}: {fn():.2f} ms/step", flush=True)
