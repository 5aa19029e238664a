"""The batched KV cache the engine drives, and the seam to mlx-lm's models.

Owns: per-layer key/value buffers of a batch of rows that share one column
layout (a boolean `valid` mask says which columns each row may attend to), the
per-row RoPE positions, merging batches, dropping rows and trimming columns,
and running an mlx-lm model for hidden states and projecting chosen positions.
Unlike mlx-lm's BatchKVCache (left padding only), gaps may sit anywhere, so a
shared prefix can be followed by right-aligned suffixes of different lengths.
Does not own: which rows run (scheduler.py) or sampling (sampling.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .fused import fused_layers, hidden_states

USE_FUSED = True  # tests switch it off to compare against mlx-lm's own layers

_GROW = 256  # columns added at a time, as mlx-lm's caches do
# Attention runs over the whole buffer (unused columns masked), so its shapes change once
# per _GROW columns instead of every step: backends that build a kernel or plan per shape
# (MLX's CUDA attention) would otherwise pay that cost at every step of a cold run.


# On the CPU there is no per-shape cost and masked columns are pure waste: exact shapes.
ATTEND_FULL_BUFFER = mx.default_device() != mx.cpu


def capacity(columns: int) -> int:
    return ((columns + _GROW - 1) // _GROW) * _GROW
# Architectures whose mlx-lm Model is `model.model(...)` then lm_head / tied embedding.
_FAST_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"}


class Layout:
    """Column bookkeeping shared by every layer of one batch."""

    def __init__(self, batch: int):
        self.valid = mx.zeros((batch, 0), dtype=mx.bool_)
        self.offset = mx.zeros((batch,), dtype=mx.int32)  # RoPE position of the next column
        self.idx = 0  # columns in use

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def begin(self, valid_cols: mx.array) -> None:
        """Declare which of the next columns are real for each row, before a forward."""
        self.valid = mx.concatenate([self.valid, valid_cols], axis=1)

    def end(self, num_cols: int) -> None:
        self.idx += num_cols
        self.offset = self.offset + num_cols


class LayerCache:
    """mlx-lm's cache protocol for one layer (offset, update_and_fetch, make_mask)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.keys = None
        self.values = None

    @property
    def offset(self):
        return self.layout.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        start, n = self.layout.idx, keys.shape[2]
        if self.keys is None or start + n > self.keys.shape[2]:
            self._grow(keys, values, start + n)
        self.keys[..., start : start + n, :] = keys
        self.values[..., start : start + n, :] = values
        if ATTEND_FULL_BUFFER:
            return self.keys, self.values
        return self.keys[..., : start + n, :], self.values[..., : start + n, :]

    def _grow(self, keys, values, needed: int) -> None:
        B, H, _, Dk = keys.shape
        cols = capacity(needed)
        new_k = mx.zeros((B, H, cols, Dk), keys.dtype)
        new_v = mx.zeros((B, H, cols, values.shape[3]), values.dtype)
        if self.keys is not None:
            used = self.layout.idx
            new_k[..., :used, :] = self.keys[..., :used, :]
            new_v[..., :used, :] = self.values[..., :used, :]
        self.keys, self.values = new_k, new_v

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        """[B, 1, N, capacity]: real columns each row may see, causally; a padding query
        also sees itself so its softmax stays finite (its output is never used)."""
        total = self.layout.idx + N
        cap = total
        if ATTEND_FULL_BUFFER:
            cap = max(capacity(total), self.keys.shape[2] if self.keys is not None else 0)
        valid = _pad_right(self.layout.valid[:, :total], cap - total)[:, None, None, :]
        if N == 1:
            return valid
        q = mx.arange(self.layout.idx, total)[:, None]
        k = mx.arange(cap)[None]
        return (valid & (q >= k)[None, None]) | (q == k)[None, None]

    def used(self):
        idx = self.layout.idx
        return self.keys[..., :idx, :], self.values[..., :idx, :]


class BatchCache:
    """All layers' caches of one batch plus their shared layout."""

    def __init__(self, num_layers: int, batch: int):
        self.layout = Layout(batch)
        self.layers = [LayerCache(self.layout) for _ in range(num_layers)]

    @property
    def batch(self) -> int:
        return self.layout.batch

    @property
    def columns(self) -> int:
        return self.layout.idx

    def arrays(self) -> list:
        out = [self.layout.valid, self.layout.offset]
        for c in self.layers:
            if c.keys is not None:
                out += [c.keys, c.values]
        return out

    @classmethod
    def from_prefix(cls, prefix_kv: list, batch: int, length: int) -> "BatchCache":
        """A batch whose rows all start with the same computed prefix."""
        bc = cls(len(prefix_kv), batch)
        if length == 0:
            return bc
        for c, (k, v) in zip(bc.layers, prefix_kv):
            c.keys = mx.broadcast_to(k, (batch, *k.shape[1:]))
            c.values = mx.broadcast_to(v, (batch, *v.shape[1:]))
            # A real buffer, so later writes do not touch the cached prefix.
            c.keys, c.values = mx.array(c.keys), mx.array(c.values)
        bc.layout.valid = mx.ones((batch, length), dtype=mx.bool_)
        bc.layout.offset = mx.full((batch,), length, dtype=mx.int32)
        bc.layout.idx = length
        return bc

    def prefix_kv(self) -> list:
        """Row 0's keys/values of every layer (for the prefix cache)."""
        return [tuple(x[:1] for x in c.used()) for c in self.layers]

    def keep(self, rows: list[int], *, trim: bool = False) -> None:
        """Drop every row not listed; with `trim`, also the leading columns no row uses
        (that reads a value back from the device, so only where a sync happens anyway)."""
        index = mx.array(rows, dtype=mx.int32)
        lay = self.layout
        valid = lay.valid[index]
        first = int(mx.argmax(valid.any(axis=0)).item()) if trim and lay.idx else 0
        lay.valid = valid[:, first:]
        lay.offset = lay.offset[index]
        for c in self.layers:
            if c.keys is not None:
                c.keys = c.keys[index, :, first : lay.idx, :]
                c.values = c.values[index, :, first : lay.idx, :]
        lay.idx -= first

    def merge(self, other: "BatchCache") -> None:
        """Append other's rows; the shorter side gets invalid columns on the left."""
        cols = max(self.columns, other.columns)
        a_pad, b_pad = cols - self.columns, cols - other.columns
        lay, olay = self.layout, other.layout
        lay.valid = mx.concatenate([_pad_cols(lay.valid[:, : self.columns], a_pad),
                                    _pad_cols(olay.valid[:, : other.columns], b_pad)], axis=0)
        lay.offset = mx.concatenate([lay.offset, olay.offset])
        for c, o in zip(self.layers, other.layers):
            (ak, av), (bk, bv) = _used_or_empty(c, o), _used_or_empty(o, c)
            c.keys = mx.concatenate([_pad_kv(ak, a_pad), _pad_kv(bk, b_pad)], axis=0)
            c.values = mx.concatenate([_pad_kv(av, a_pad), _pad_kv(bv, b_pad)], axis=0)
        lay.idx = cols


def _pad_right(valid: mx.array, n: int) -> mx.array:
    if n == 0:
        return valid
    return mx.concatenate([valid, mx.zeros((valid.shape[0], n), dtype=mx.bool_)], axis=1)


def _pad_cols(valid: mx.array, n: int) -> mx.array:
    if n == 0:
        return valid
    return mx.concatenate([mx.zeros((valid.shape[0], n), dtype=mx.bool_), valid], axis=1)


def _pad_kv(x: mx.array, n: int) -> mx.array:
    if n == 0:
        return x
    return mx.pad(x, [(0, 0), (0, 0), (n, 0), (0, 0)])


def _used_or_empty(c: LayerCache, like: LayerCache):
    if c.keys is not None:
        return c.used()
    k, v = like.keys, like.values
    B = c.layout.batch
    return (mx.zeros((B, k.shape[1], 0, k.shape[3]), k.dtype), mx.zeros((B, v.shape[1], 0, v.shape[3]), v.dtype))


def _hidden(model: nn.Module, tokens: mx.array, cache: BatchCache) -> mx.array:
    if USE_FUSED and (fused := fused_layers(model)) is not None:
        return hidden_states(model, tokens, cache.layers, fused)
    return model.model(tokens, cache=cache.layers)


def forward_last(model: nn.Module, tokens: mx.array, cache: BatchCache) -> mx.array:
    """Logits [B, vocab] of the last column only, advancing the cache by the input width.

    The caller has already declared the new columns' validity with `layout.begin`.
    """
    if getattr(model, "model_type", None) in _FAST_HEAD_TYPES and hasattr(model, "model"):
        h = _hidden(model, tokens, cache)[:, -1, :]
        logits = model.lm_head(h) if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear(h)
    else:  # other architectures: the full call (projects every position)
        logits = model(tokens, cache=cache.layers)[:, -1, :]
    cache.layout.end(tokens.shape[1])
    return logits


def forward_hidden(model: nn.Module, tokens: mx.array, cache: BatchCache) -> None:
    """Fill the cache for `tokens` without projecting any logits (prefill chunks)."""
    if getattr(model, "model_type", None) in _FAST_HEAD_TYPES and hasattr(model, "model"):
        out = _hidden(model, tokens, cache)
    else:
        out = model(tokens, cache=cache.layers)
    cache.layout.end(tokens.shape[1])
    mx.eval(out, *cache.arrays())  # bound the lazy graph between chunks
