"""Attention of a batch whose rows may share a prefix stored once (cascade attention).

Owns: how queries attend, in MLX operations only (one code path for Metal, CUDA
and CPU). Each row attends to its own columns in the batch cache (masked: gaps,
padding, causality) and, when it belongs to a group, to its group's shared
prefix, stored once. The two softmax parts are merged by their log-sum-exp
(FlashInfer's cascade attention, the Hydragen paper). Queries are grouped under
their KV head (GQA), so one matmul reads each KV byte once for all the query
heads that share it; the shared part stacks every row of a group into one
matmul, so a prefix is read once per step, not once per row.
Does not own: the cache layout (kvcache.py) or the choice of form (model_runner.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx

from mlxbatch.engine import shapes
from mlxbatch.engine.kvquant import KVQuant, first, is_packed, scores, weighted


@dataclass(frozen=True)
class AttendOptions:
    """How attention is computed on this backend (chosen once, by the model runner)."""

    one_query_matmul: bool = False  # one query as matmuls (CUDA: MLX's masked one-query sdpa is a slow gemv)
    compiled: bool = False  # one-token cascade as one compiled call (where cache shapes are bucketed)
    # Score elements when every row's query meets every stored prefix in one matmul (float32:
    # 64 MB); above it, one matmul per group: more operations, but no row scored against other
    # groups' columns (H200, 1B shared-prefix, 4 groups, 50M scores: 4.2-4.5x mlx-lm blocked
    # in 4 runs vs 6.8x looped in 1).
    max_blocked_scores: int = 1 << 24
    kv: KVQuant | None = None  # keys/values stored packed (kvquant.py); None: the model dtype


def additive(mask: mx.array, dtype) -> mx.array:
    """Boolean mask -> 0 / -inf in the activations' dtype."""
    return mx.where(mask, mx.array(0, dtype), mx.array(-mx.inf, dtype))


def attend(q, k, v, *, scale: float, mask: mx.array, groups, opts: AttendOptions, layer: int) -> mx.array:
    """`attend_heads` with the heads last: [B, L, heads * dim] (what an o-projection reads)."""
    return _heads_last(attend_heads(q, k, v, scale=scale, mask=mask, groups=groups, opts=opts, layer=layer))


def attend_heads(q, k, v, *, scale: float, mask: mx.array, groups, opts: AttendOptions, layer: int,
                 sinks: mx.array | None = None, prefix_mask: list | None = None) -> mx.array:
    """Attention output [B, H, L, D] of queries q [B, H, L, D] over the row's own keys/values
    k, v [B, Hkv, S, D] (mask: bool or additive, [B, 1, L|1, S]) and, for rows in a group, the
    group's stored prefix (`groups`: a GroupPlan, or None); `sinks` [H]: per-head logits that
    join every softmax's denominator (gpt-oss); `prefix_mask`: [] or a sliding-window layer's mask of
    the shared prefixes (LayerCache._prefix_window), which also takes the blocked form's group mask."""
    B, H, L, D = q.shape
    if groups is None:
        if is_packed(k):
            return _packed(q, k, v, scale, mask, opts, sinks)
        if L == 1 and opts.one_query_matmul:
            return _one_query(q, k, v, scale, mask, opts, sinks).reshape(B, H, 1, -1)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    extra = [] if sinks is None else [sinks]
    windowed = bool(prefix_mask)
    # Dozens of small operations per layer: replayed from one compiled call where shapes hold.
    # A window's prefix mask is laid out for the blocked form, which one query a row then always takes.
    if L == 1 and (windowed or B * H * groups.total_length <= opts.max_blocked_scores):
        fn = groups.function(scale, opts, compiled=opts.compiled, blocked=True, windowed=windowed)
        return fn(q, k, v, mask, groups.joined(layer), prefix_mask or groups.block_mask, extra)
    fn = groups.function(scale, opts, compiled=opts.compiled and L == 1, blocked=False, windowed=windowed)
    return fn(q, k, v, mask, [p.kv[layer] for p in groups.prefixes], groups.rows, groups.perm, extra, prefix_mask or [])


def blocked_cascade(q, k, v, mask, kv, block_mask, sinks, *, scale: float, opts: AttendOptions) -> mx.array:
    """One query per row; every group's prefix in one matmul: the stored prefixes side by side
    (`kv`), each row masked to its own group's columns (`block_mask`: [] when the one group is
    every row, else [[1, B, 1, P]] additive). Reads each prefix once with a few operations,
    whatever the number of groups; costs B x P scores."""
    B, H, _, D = q.shape
    Hkv = first(k).shape[1]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G, D)
    own = _part(qg, k, v, scale, mask if mask.dtype != mx.bool_ else additive(mask, q.dtype), opts)
    pk, pv = kv
    P = first(pk).shape[2]
    stacked = qg.transpose(1, 0, 2, 3).reshape(1, Hkv, B * G, D)
    s = (scores(stacked, pk, opts.kv).astype(mx.float32) * scale).reshape(Hkv, B, G, P)
    if block_mask:
        s = s + block_mask[0]
    m = mx.max(s, axis=-1, keepdims=True)
    p = mx.exp(s - mx.where(m == -mx.inf, 0, m))  # a row outside every group: all zeros
    o = weighted(p.reshape(1, Hkv, B * G, P), pv, opts.kv)
    back = lambda x: x.reshape(Hkv, B, G, -1).transpose(1, 0, 2, 3)  # noqa: E731
    shared = (back(o), back(m), back(mx.sum(p, axis=-1, keepdims=True)))
    return _merge(own, shared, sink=_sink(sinks, Hkv, 1)).astype(q.dtype).reshape(B, H, 1, D)


def cascade(q, k, v, mask, kvs, rows, perm, sinks, prefix_mask, *, scale: float, opts: AttendOptions,
            has_rows: tuple, num_ungrouped: int) -> mx.array:
    """Own columns and shared prefixes, merged; `kvs` per group, `rows` for groups that are
    not the whole batch in order (`has_rows`), `perm` ([] or [batch row -> part position])."""
    B, H, L, D = q.shape
    qg, mask = _grouped(q, first(k).shape[1], mask)
    own = _part(qg, k, v, scale, mask, opts, many=L > 1)
    row_iter = iter(rows)
    picked = [next(row_iter) if r else None for r in has_rows]
    shared = _shared(qg, kvs, picked, num_ungrouped, perm[0] if perm else None, scale, opts, many=L > 1,
                     mask=prefix_mask[0] if prefix_mask else None)
    merged = _merge(own, shared, sink=_sink(sinks, first(k).shape[1], L))
    return merged.astype(q.dtype).reshape(B, H, L, D)


def _grouped(q, Hkv: int, mask):
    """q [B, H, L, D] -> [B, Hkv, G * L, D], rows ordered (query head in group, position), and the
    mask (additive) repeated to match: the query heads that share a KV head read it in one matmul."""
    B, H, L, D = q.shape
    M = (H // Hkv) * L
    mask = mask if mask.dtype != mx.bool_ else additive(mask, q.dtype)
    if L > 1:  # the same [L, S] mask for every query head of a group
        mask = mx.broadcast_to(mask[:, :, None], (B, 1, H // Hkv, L, mask.shape[-1])).reshape(B, 1, M, -1)
    return q.reshape(B, Hkv, M, D), mask


def _packed(q, k, v, scale: float, mask, opts: AttendOptions, sinks=None) -> mx.array:
    """Attention over packed keys/values (no shared prefix): the products read the packed cache
    (kvquant.scores / weighted), scores and softmax in float32."""
    B, H, L, D = q.shape
    Hkv = first(k).shape[1]
    qg, mask = _grouped(q, Hkv, mask)
    if sinks is not None:
        o = _merge(_part(qg, k, v, scale, mask, opts, many=L > 1), sink=_sink([sinks], Hkv, L))
        return o.astype(q.dtype).reshape(B, H, L, -1)
    s = scores(qg, k, opts.kv, L > 1).astype(mx.float32) * scale + mask
    o = weighted(mx.softmax(s, axis=-1), v, opts.kv, L > 1)
    return o.astype(q.dtype).reshape(B, H, L, -1)


def _heads_last(o: mx.array) -> mx.array:
    B, H, L, D = o.shape
    return o.reshape(B, 1, H * D) if L == 1 else o.transpose(0, 2, 1, 3).reshape(B, L, H * D)


def _one_query(q, k, v, scale, mask, opts, sinks=None):
    """One query per row as two batched matmuls, query heads grouped under their KV head."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D)
    mask = mask if mask.dtype != mx.bool_ else additive(mask, q.dtype)
    if sinks is not None:
        return _merge(_part(qg, k, v, scale, mask, opts), sink=_sink([sinks], Hkv, 1)).astype(q.dtype)
    scores = (qg @ k.swapaxes(-1, -2)) * scale + mask
    return mx.softmax(scores, axis=-1, precise=True) @ v


def _part(qg, k, v, scale: float, mask, opts, many: bool = False, guard: bool = False):
    """Unnormalised softmax part: (p @ v, row max, row sum), scores in float32."""
    if mask is None:
        s = scores(qg, k, opts.kv, many).astype(mx.float32) * scale
    else:
        s = scores(qg, k, opts.kv, many).astype(mx.float32) * scale + mask
    m = mx.max(s, axis=-1, keepdims=True)
    p = mx.exp(s - (mx.where(m == -mx.inf, 0, m) if guard else m))  # guard: a row may see none of a prefix
    return weighted(p, v, opts.kv, many), m, mx.sum(p, axis=-1, keepdims=True)


def _shared(qg, kvs, rows, num_ungrouped: int, perm, scale: float, opts, many: bool = False, mask=None):
    """The shared-prefix part of every row (rows outside any group contribute nothing); `mask`: a
    sliding window's, for one group that is every row ([1, 1, B * M, P])."""
    _, Hkv, M, D = qg.shape
    outs, maxes, sums = [], [], []
    for (pk, pv), picked in zip(kvs, rows):
        qr = qg if picked is None else qg[picked]
        n = qr.shape[0]
        stacked = qr.transpose(1, 0, 2, 3).reshape(1, Hkv, n * M, D)  # all rows of the group in one matmul
        o, m, s = _part(stacked, pk, pv, scale, mask, opts, many, guard=mask is not None)
        outs.append(_unstack(o, n))
        maxes.append(_unstack(m, n))
        sums.append(_unstack(s, n))
    if num_ungrouped:
        shape = (num_ungrouped, Hkv, M)
        outs.append(mx.zeros((*shape, D), outs[0].dtype))
        maxes.append(mx.full((*shape, 1), -mx.inf, mx.float32))
        sums.append(mx.zeros((*shape, 1), mx.float32))
    parts = [mx.concatenate(x) if len(x) > 1 else x[0] for x in (outs, maxes, sums)]
    if perm is not None:
        parts = [x[perm] for x in parts]
    return parts


def _unstack(x: mx.array, n: int) -> mx.array:
    """[1, Hkv, n * M, d] -> [n, Hkv, M, d]."""
    _, Hkv, nM, d = x.shape
    return x.reshape(Hkv, n, nM // n, d).transpose(1, 0, 2, 3)


def _merge(a, b=None, sink=None) -> mx.array:
    """Combine softmax parts by their log-sum-exp; `sink`: logits [1, Hkv, M, 1] that join
    the denominator only (attention sinks)."""
    (oa, ma, sa) = a
    m = ma if b is None else mx.maximum(ma, b[1])
    m = m if sink is None else mx.maximum(m, sink)
    wa = mx.exp(ma - m)
    num, den = oa * wa, sa * wa
    if b is not None:
        (ob, _, sb), wb = b, mx.exp(b[1] - m)
        num, den = num + ob * wb, den + sb * wb
    if sink is not None:
        den = den + mx.exp(sink - m)
    return num / den


def _sink(sinks: list, Hkv: int, L: int):
    """None without sinks, else the per-head sink logits laid out as the grouped queries' rows
    (query head in group, then position): [1, Hkv, G * L, 1]."""
    if not sinks:
        return None
    s = sinks[0].astype(mx.float32).reshape(1, Hkv, -1, 1)
    return mx.repeat(s, L, axis=2) if L > 1 else s


def cascade_function(plan, scale: float, opts: AttendOptions, *, compiled: bool, blocked: bool):
    """`cascade` or `blocked_cascade` with the plan's structure fixed. Compiled ones are kept per
    structure, not per plan: a plan is rebuilt whenever the batch's rows change, and a new compiled
    function traces again (on a GPU: kernel builds inside the step) even for shapes seen before."""
    if blocked:
        key = (scale, opts, True)
        fn = partial(blocked_cascade, scale=scale, opts=opts)
    else:
        key = (scale, opts, plan.has_rows, plan.num_ungrouped)
        fn = partial(cascade, scale=scale, opts=opts, has_rows=plan.has_rows, num_ungrouped=plan.num_ungrouped)
    if not compiled:
        return fn
    if key not in _COMPILED:
        _COMPILED[key] = shapes.compiled(fn, "cascade_blocked" if blocked else "cascade")
    return _COMPILED[key]


_COMPILED: dict = {}  # cascade structure -> its compiled function (see cascade_function)
