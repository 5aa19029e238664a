"""The batched KV cache the engine drives, and the seam to mlx-lm's models.

Owns: per-layer key/value buffers of a batch of rows that share one column
layout (a boolean `valid` mask says which columns each row may attend to), the
per-row RoPE positions, shared prefixes stored once (a group's rows attend to one
copy; see attention.py), merging batches, dropping rows and trimming columns.
With a `KVQuant` format, keys and values are packed as they are written (kvquant.py): every
buffer is then a (words, scales, biases) triple, handled part by part with the same indexing.
Unlike mlx-lm's BatchKVCache (left padding only), gaps may sit anywhere, so a
shared prefix can be followed by right-aligned suffixes of different lengths.
Does not own: running the model (model_runner.py), which rows run (scheduler.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlxbatch.engine.attention import AttendOptions, attend_heads, cascade_function
from mlxbatch.engine.kvquant import KVQuant, each, each2, first, nbytes, zeros_like_cols

_GROW = 256  # columns added at a time to long rows, as mlx-lm's caches do
# With `full_buffer`, attention runs over the whole buffer (unused columns masked), so its
# shapes change once per bucket instead of every step: backends that build a kernel or plan
# per shape (MLX's CUDA attention) would otherwise pay that cost at every step of a cold run.
# On the CPU there is no per-shape cost and masked columns are pure waste: exact shapes.


COARSE_STEP = 64  # column step of `full_buffer` caches up to _GROW columns


def capacity(columns: int, *, fine: bool = True) -> int:
    # Finer steps for short rows (rows that share a prefix hold only a short suffix each);
    # coarser where every new width costs a kernel plan and a trace (`full_buffer` backends).
    small = 16 if fine else COARSE_STEP
    step = small if columns <= 4 * small else COARSE_STEP if columns <= _GROW else _GROW
    return ((columns + step - 1) // step) * step


@dataclass(eq=False)
class SharedPrefix:
    """A prompt prefix's keys/values, stored once (batch 1, per layer), for a group of rows."""

    key: bytes
    kv: list  # per layer (keys, values), each [1, Hkv, length, D] (packed: triples)
    length: int

    @property
    def nbytes(self) -> int:  # an entry per layer: (keys, values), or a state layer's arrays
        return sum(nbytes(x) for entry in self.kv for x in entry)


class GroupPlan:
    """Which rows attend to which shared prefix; rebuilt when the batch's rows change."""

    def __init__(self, prefixes: list, row_group: list[int], previous: "GroupPlan | None"):
        self.prefixes = list(prefixes)  # SharedPrefix per group (a copy: the layout's list changes)
        self.total_length = sum(p.length for p in prefixes)
        members: dict[int, list[int]] = {}
        for row, g in enumerate(row_group):
            members.setdefault(g, []).append(row)
        self.is_whole = len(members) == 1  # one group, every row
        used = sorted(k for k in members if k >= 0)
        row_arrays = [None] if self.is_whole else [mx.array(members[g], dtype=mx.int32) for g in used]
        self.has_rows = tuple(r is not None for r in row_arrays)  # False: the group is every row, in order
        self.rows = [r for r in row_arrays if r is not None]
        self.num_ungrouped = len(members.get(-1, []))
        order = [r for g in used for r in members[g]] + members.get(-1, [])
        self.perm = [] if order == list(range(len(order))) else [_inverse(order)]
        self.block_mask = [] if self.is_whole else [self._block_mask(row_group)]
        starts = [sum(p.length for p in prefixes[:g]) for g in range(len(prefixes))]
        self.row_start = mx.array([starts[g] if g >= 0 else 0 for g in row_group], dtype=mx.int32)
        same = previous is not None and len(previous.prefixes) == len(prefixes) and all(
            a is b for a, b in zip(previous.prefixes, prefixes))
        self._joined: dict = previous._joined if same else {}  # per layer: the prefixes side by side
        self._functions: dict = {}

    def _block_mask(self, row_group: list[int]) -> mx.array:
        """[1, B, 1, total_length] float32: 0 on the columns of each row's own group, -inf elsewhere."""
        starts = [0]
        for p in self.prefixes:
            starts.append(starts[-1] + p.length)
        lo = mx.array([starts[g] if g >= 0 else 0 for g in row_group])[:, None]
        hi = mx.array([starts[g + 1] if g >= 0 else 0 for g in row_group])[:, None]
        cols = mx.arange(self.total_length)[None]
        inside = (cols >= lo) & (cols < hi)
        return mx.where(inside, 0.0, -mx.inf).astype(mx.float32)[None, :, None, :]

    def joined(self, layer: int) -> tuple:
        """The layer's prefixes side by side ([1, Hkv, total_length, D]); one group: its own arrays."""
        if len(self.prefixes) == 1:
            return self.prefixes[0].kv[layer]
        if layer not in self._joined:
            parts = [p.kv[layer] for p in self.prefixes]
            self._joined[layer] = tuple(_concat_cols([x[i] for x in parts]) for i in (0, 1))
        return self._joined[layer]

    @property
    def joined_bytes(self) -> int:
        return sum(nbytes(k) + nbytes(v) for k, v in self._joined.values())

    def function(self, scale: float, opts, *, compiled: bool, blocked: bool, windowed: bool = False):
        key = (scale, opts, compiled, blocked, windowed)  # windowed: a separate trace (its masks are inputs)
        if key not in self._functions:
            self._functions[key] = cascade_function(self, scale, opts, compiled=compiled, blocked=blocked)
        return self._functions[key]

    def window_mask(self, offset: mx.array, L: int, window: int) -> mx.array:
        """[B, L, total] additive float32: for a sliding-window layer, the query at position p of a
        row sees its group's prefix column j (position j) only while p - j < window."""
        cols = mx.arange(self.total_length)[None, None, :] - self.row_start[:, None, None]
        q = offset[:, None, None] + mx.arange(L)[None, :, None]
        return mx.where(q - cols < window, 0.0, -mx.inf).astype(mx.float32)


def _concat_cols(xs: list):
    if isinstance(xs[0], tuple):
        return tuple(mx.concatenate(parts, axis=2) for parts in zip(*xs))
    return mx.concatenate(xs, axis=2)


def _inverse(order: list[int]) -> mx.array:
    perm = [0] * len(order)
    for pos, row in enumerate(order):
        perm[row] = pos
    return mx.array(perm, dtype=mx.int32)


class Layout:
    """Column bookkeeping shared by every layer of one batch, and its rows' shared prefixes."""

    def __init__(self, batch: int, fmt: "CacheFormat"):
        self.format = fmt
        self.kv = fmt.kv  # the packed format of every layer's keys/values, or None (the model dtype)
        self.attend = fmt.attend  # how mlx-lm's layers attend through LayerCache.attend
        self.valid = mx.zeros((batch, 0), dtype=mx.bool_)
        self.offset = mx.zeros((batch,), dtype=mx.int32)  # RoPE position of the next column
        self.idx = 0  # columns in use
        self.full_buffer = fmt.full_buffer
        self.memo: dict = {}  # what every layer of one forward shares (sliding-window prefix masks)
        self.groups: list[SharedPrefix] = []
        self.row_group = [-1] * batch  # index into groups, -1: none
        self._plan: GroupPlan | None | bool = False  # False: not built yet
        self._last_plan: GroupPlan | None = None  # its joined prefixes are reused while the groups stay

    @property
    def plan(self) -> GroupPlan | None:
        if self._plan is False:
            has_group = any(g >= 0 for g in self.row_group)
            self._plan = GroupPlan(self.groups, self.row_group, self._last_plan) if has_group else None
            self._last_plan = self._plan or self._last_plan
        return self._plan

    def share(self, prefix: SharedPrefix) -> None:
        """Every row of this (new) batch attends to `prefix` before its own columns."""
        self.groups, self.row_group, self._plan = [prefix], [0] * self.batch, False

    def keep_groups(self, rows: list[int]) -> None:
        used = sorted({self.row_group[r] for r in rows if self.row_group[r] >= 0})
        remap = {g: i for i, g in enumerate(used)}
        self.groups = [self.groups[g] for g in used]
        self.row_group = [remap.get(self.row_group[r], -1) for r in rows]
        self._plan = False

    def merge_groups(self, other: "Layout") -> None:
        remap = {}
        for g, prefix in enumerate(other.groups):
            found = next((i for i, mine in enumerate(self.groups) if mine is prefix), None)
            if found is None:
                self.groups.append(prefix)
                found = len(self.groups) - 1
            remap[g] = found
        self.row_group = self.row_group + [remap.get(g, -1) for g in other.row_group]
        self._plan = False

    @property
    def joined_bytes(self) -> int:
        """The side-by-side copy of this batch's prefixes, while one exists."""
        return self._last_plan.joined_bytes if self._last_plan is not None and self.groups else 0

    @property
    def shared_bytes(self) -> int:
        return sum(p.nbytes for p in self.groups) + self.joined_bytes

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def begin(self, valid_cols: mx.array) -> None:
        """Declare which of the next columns are real for each row, before a forward."""
        self.valid = mx.concatenate([self.valid, valid_cols], axis=1)
        self.memo = {}

    def end(self, num_cols: int) -> None:
        self.idx += num_cols
        self.offset = self.offset + num_cols
        self.memo = {}


class LayerCache:
    """mlx-lm's cache protocol for one layer (offset, update_and_fetch, make_mask), and the
    attention of mlx-lm's layers over it (`attend`, reached through attention.install)."""

    def __init__(self, layout: Layout, index: int = 0, window: int | None = None):
        self.layout = layout
        self.index = index  # the layer's position: its slice of each shared prefix
        self.window = window  # a sliding-window layer's span (the model's own make_cache says), else None
        self.keys = None
        self.values = None

    # What mlx-lm's attention looks for to read a quantized cache (architectures that run mlx-lm's
    # own layers): present only while the buffers are packed, since its presence is the test.
    @property
    def bits(self) -> int:
        kv = self.layout.kv
        if kv is None or not isinstance(self.keys, tuple) or kv.bits != kv.value_bits:
            raise AttributeError("bits")
        return kv.bits

    @property
    def group_size(self) -> int:
        return self.layout.kv.group_size

    @property
    def offset(self):
        return self.layout.offset

    def attend(self, queries, keys, values, *, scale: float, mask, sinks=None) -> mx.array:
        """mlx-lm's scaled_dot_product_attention over this cache: [B, H, L, D]."""
        plan = self.layout.plan
        prefix_mask = self._prefix_window(plan, queries.shape) if plan is not None and self.window else []
        return attend_heads(queries, keys, values, scale=scale, mask=mask, groups=plan, opts=self.layout.attend,
                            layer=self.index, sinks=sinks, prefix_mask=prefix_mask)

    def _prefix_window(self, plan: GroupPlan, q_shape) -> list:
        """A sliding-window layer's mask of the shared prefixes, laid out as the cascade reads them:
        one query a row, [1, B, 1, total] with the other groups masked too; a prefill chunk (its
        unit's rows are one group), [1, 1, B * G * L, P] in the stacked order (row, head in group, query)."""
        B, H, L, _ = q_shape
        memo = self.layout.memo
        key = ("window", self.window, L)
        if key not in memo:
            m = plan.window_mask(self.layout.offset, L, self.window)
            if L == 1:
                m = m[None] + (plan.block_mask[0] if plan.block_mask else 0)
            elif plan.is_whole:
                G = H // first(self.keys).shape[1]
                m = mx.broadcast_to(m[:, None], (B, G, L, m.shape[-1])).reshape(1, 1, B * G * L, -1)
            else:
                raise RuntimeError("a prefill chunk's rows share one prefix")
            memo[key] = m
        return [memo[key]]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        start, n = self.layout.idx, keys.shape[2]
        if n > 1:  # padding columns hold zeros: a pad's keys/values may be inf or NaN (a position
            # below 0 where an architecture scales by position), and 0 x NaN would reach real rows
            real = self.layout.valid[:, None, start : start + n, None]
            keys, values = mx.where(real, keys, 0).astype(keys.dtype), mx.where(real, values, 0).astype(values.dtype)
        if self.layout.kv is not None:
            keys, values = self.layout.kv.pack(keys, values)
        if self.keys is None or start + n > first(self.keys).shape[2]:
            self._grow(keys, values, start + n)
        each2(lambda buf, new: buf.__setitem__((..., slice(start, start + n), slice(None)), new), self.keys, keys)
        each2(lambda buf, new: buf.__setitem__((..., slice(start, start + n), slice(None)), new), self.values, values)
        if self.layout.full_buffer:
            return self.keys, self.values
        return _cols(self.keys, 0, start + n), _cols(self.values, 0, start + n)

    def _grow(self, keys, values, needed: int) -> None:
        B = first(keys).shape[0]
        cols = capacity(needed, fine=not self.layout.full_buffer)
        new_k, new_v = zeros_like_cols(keys, B, cols), zeros_like_cols(values, B, cols)
        if self.keys is not None:
            used = self.layout.idx
            for new, old in ((new_k, self.keys), (new_v, self.values)):
                each2(lambda a, b: a.__setitem__((..., slice(0, used), slice(None)), b[..., :used, :]), new, old)
        self.keys, self.values = new_k, new_v

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """[B, 1, N, capacity]: real columns each row may see, causally and, for a sliding-window
        layer, within `window_size` positions; a padding query also sees itself so its softmax
        stays finite (its output is never used)."""
        lay = self.layout
        total = lay.idx + N
        cap = total
        if lay.full_buffer:
            cap = max(capacity(total, fine=False), first(self.keys).shape[2] if self.keys is not None else 0)
        valid = _pad_right(lay.valid[:, :total], cap - total)
        if window_size is not None:
            pos = _positions(valid, lay.offset + N)  # [B, cap]: each column's token position
            near = pos[:, lay.idx : total, None] - pos[:, None, :] < window_size  # [B, N, cap]
            valid = (valid[:, None, :] & near)[:, None]
        else:
            valid = valid[:, None, None, :]
        if lay.format.mask_per_kv_head:  # the layer reshapes queries [B, Hkv, repeats, L, D]
            valid = valid[:, None]
        if N == 1:
            return valid
        q = mx.arange(lay.idx, total)[:, None]
        k = mx.arange(cap)[None]
        return (valid & (q >= k)) | (q == k)

    def used(self):
        idx = self.layout.idx
        return _cols(self.keys, 0, idx), _cols(self.values, 0, idx)


@dataclass(frozen=True)
class StateLayer:
    """CacheFormat.windows entry of a layer that keeps a convolution / recurrent state (mlx-lm's
    ArraysCache of `size` arrays) instead of keys and values."""

    size: int


class StateCache:
    """mlx-lm's ArraysCache protocol for one state layer over the batch's Layout: a list of
    per-row state arrays (batch first); the new columns' validity is the model's mask, so a
    masked pad leaves a still-zero state zero (pads only ever lead a row: see
    ModelRunner.can_reuse_prefix)."""

    lengths = None  # no row ends before the batch's last column (no right padding)
    left_padding = None  # pads are masked through make_mask, from the layout

    def __init__(self, layout: Layout, size: int):
        self.layout = layout
        self.cache: list = [None] * size

    def __getitem__(self, i: int):
        return self.cache[i]

    def __setitem__(self, i: int, value) -> None:
        self.cache[i] = value

    def advance(self, n: int) -> None:
        pass  # the layout advances once per forward (Layout.end)

    def make_mask(self, N: int) -> mx.array:
        """[B, N]: which of the new columns are real (pads are masked out of the state)."""
        lay = self.layout
        return lay.valid[:, lay.idx : lay.idx + N]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.cache if a is not None)

    def arrays(self) -> list:
        return [a for a in self.cache if a is not None]

    def keep(self, index: mx.array) -> None:
        self.cache = [a[index] if a is not None else None for a in self.cache]

    def merge(self, other: "StateCache") -> None:
        """Append other's rows; a side that never ran (no state yet) gets zeros, as ArraysCache.extend."""
        na, nb = self.layout.batch, other.layout.batch  # the layouts' batches before merging
        self.cache = [_cat_state(a, b, na, nb) for a, b in zip(self.cache, other.cache)]

    def prefix(self) -> tuple:
        """Row 0's state (for the prefix cache)."""
        return tuple(a[:1] for a in self.cache)

    def start_from(self, state: tuple, batch: int) -> None:
        # A real copy per row, so later updates do not touch the cached prefix's state.
        self.cache = [mx.array(mx.broadcast_to(a, (batch, *a.shape[1:]))) for a in state]


def _cat_state(a, b, na: int, nb: int):
    if a is None and b is None:
        return None
    like = a if a is not None else b
    a = a if a is not None else mx.zeros((na, *like.shape[1:]), like.dtype)
    b = b if b is not None else mx.zeros((nb, *like.shape[1:]), like.dtype)
    return mx.concatenate([a, b])


@dataclass(frozen=True)
class CacheFormat:
    """How one model's batch caches are laid out; decided once by the model runner."""

    windows: tuple  # per layer: its sliding window, None (attends to every earlier position), or a StateLayer
    full_buffer: bool = False  # attention over the bucketed buffer (see `capacity`)
    kv: KVQuant | None = None
    attend: AttendOptions = AttendOptions()
    mask_per_kv_head: bool = False  # the architecture's attention wants masks [B, 1, 1, L, S]

    @classmethod
    def plain(cls, num_layers: int, **kw) -> "CacheFormat":
        return cls((None,) * num_layers, **kw)


class BatchCache:
    """All layers' caches of one batch plus their shared layout."""

    def __init__(self, fmt: CacheFormat, batch: int):
        self.layout = Layout(batch, fmt)
        self.layers = [StateCache(self.layout, w.size) if isinstance(w, StateLayer) else LayerCache(self.layout, i, w)
                       for i, w in enumerate(fmt.windows)]

    @property
    def kv_layers(self) -> list:
        return [c for c in self.layers if isinstance(c, LayerCache)]

    @property
    def state_layers(self) -> list:
        return [c for c in self.layers if isinstance(c, StateCache)]

    @property
    def batch(self) -> int:
        return self.layout.batch

    @property
    def columns(self) -> int:
        return self.layout.idx

    def arrays(self) -> list:
        out = [self.layout.valid, self.layout.offset]
        for c in self.kv_layers:
            if c.keys is not None:
                out += [*_parts(c.keys), *_parts(c.values)]
        for c in self.state_layers:
            out += c.arrays()
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of this batch's own buffers and states (shared prefixes not included)."""
        kv = sum(nbytes(c.keys) + nbytes(c.values) for c in self.kv_layers if c.keys is not None)
        return kv + sum(c.nbytes for c in self.state_layers)

    @classmethod
    def from_prefix(cls, fmt: CacheFormat, prefix_kv: list, batch: int, length: int) -> "BatchCache":
        """A batch whose rows all start with a copy of the same computed prefix."""
        bc = cls(fmt, batch)
        if length == 0:
            return bc
        # A real buffer, so later writes do not touch the cached prefix.
        copy = lambda x: mx.array(mx.broadcast_to(x, (batch, *x.shape[1:])))  # noqa: E731
        for c, entry in zip(bc.layers, prefix_kv):
            if isinstance(c, StateCache):
                c.start_from(entry, batch)
            else:
                c.keys, c.values = each(copy, entry[0]), each(copy, entry[1])
        bc.layout.valid = mx.ones((batch, length), dtype=mx.bool_)
        bc.layout.offset = mx.full((batch,), length, dtype=mx.int32)
        bc.layout.idx = length
        return bc

    def prefix_kv(self) -> list:
        """Row 0's keys/values of every layer, a state layer's state (for the prefix cache)."""
        return [c.prefix() if isinstance(c, StateCache) else tuple(each(lambda a: a[:1], x) for x in c.used())
                for c in self.layers]

    def keep(self, rows: list[int], *, trim: bool = False, stepwise: bool = False, blank: int = 0) -> None:
        """Drop every row not listed; with `trim`, also the leading columns no row uses
        (that reads a value back from the device, so only where a sync happens anyway).
        `stepwise`: layer by layer, so the old buffers of one layer at a time sit beside the new
        ones (a sync per layer: only where a whole copy would not fit the KV budget). The last `blank`
        rows keep no valid column (padding rows: their old columns must not hold back a trim)."""
        index = mx.array(rows, dtype=mx.int32)
        lay = self.layout
        valid = lay.valid[index]
        if blank:
            valid = mx.concatenate([valid[: len(rows) - blank], mx.zeros((blank, valid.shape[1]), dtype=mx.bool_)])
        start = int(mx.argmax(valid.any(axis=0)).item()) if trim and lay.idx else 0
        lay.valid = valid[:, start:]
        lay.offset = lay.offset[index]
        lay.keep_groups(rows)
        for c in self.state_layers:
            c.keep(index)
        for c in self.kv_layers:
            if c.keys is not None:
                c.keys = each(lambda a: a[index, :, start : lay.idx, :], c.keys)
                c.values = each(lambda a: a[index, :, start : lay.idx, :], c.values)
                if stepwise:
                    mx.eval(*_parts(c.keys), *_parts(c.values))
        lay.idx -= start

    def merge(self, other: "BatchCache", *, stepwise: bool = False) -> None:
        """Append other's rows; the shorter side gets invalid columns on the left. `other` is
        used up; `stepwise`: its buffers are let go layer by layer, so the copy held beside both
        sides is one layer's, not the whole cache's (a sync per layer: only where memory is tight)."""
        cols = max(self.columns, other.columns)
        a_pad, b_pad = cols - self.columns, cols - other.columns
        lay, olay = self.layout, other.layout
        for c, o in zip(self.state_layers, other.state_layers):  # before the layout's batch changes
            c.merge(o)
        lay.valid = mx.concatenate([_pad_cols(lay.valid[:, : self.columns], a_pad),
                                    _pad_cols(olay.valid[:, : other.columns], b_pad)], axis=0)
        lay.offset = mx.concatenate([lay.offset, olay.offset])
        lay.merge_groups(olay)
        for c, o in zip(self.kv_layers, other.kv_layers):
            (ak, av), (bk, bv) = _used_or_empty(c, o), _used_or_empty(o, c)
            c.keys = each2(lambda a, b: mx.concatenate([_pad_kv(a, a_pad), _pad_kv(b, b_pad)], axis=0), ak, bk)
            c.values = each2(lambda a, b: mx.concatenate([_pad_kv(a, a_pad), _pad_kv(b, b_pad)], axis=0), av, bv)
            o.keys = o.values = ak = av = bk = bv = None
            if stepwise:
                mx.eval(*_parts(c.keys), *_parts(c.values))
        lay.idx = cols


def _positions(valid: mx.array, after: mx.array) -> mx.array:
    """[B, S] token position of each column: a row's real columns hold consecutive positions
    ending at `after` - 1 (gaps and padding skipped; values there are never read)."""
    count = mx.cumsum(valid.astype(mx.int32)[:, ::-1], axis=1)[:, ::-1]  # real columns from here to the end
    return after[:, None] - count


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
    B = c.layout.batch
    return zeros_like_cols(like.keys, B, 0), zeros_like_cols(like.values, B, 0)


def _cols(x, lo: int, hi: int):
    return each(lambda a: a[..., lo:hi, :], x)


def _parts(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)
