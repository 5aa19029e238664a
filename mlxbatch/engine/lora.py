"""Per-row low-rank updates: rows of different adapters decoded in one batch.

Owns: the job's adapters stacked per target module (one slot per adapter; a base-model slot
is zeros), the per-row update `y += (x A_row) B_row` with the scale folded into B, DoRA's
per-row magnitude (`m / ||W + s B^T A^T||` per output, applied before any bias), wrapping a
model's Linear layers so every forward path (fused, mlx-lm's layers) applies it, the
concatenated form for fused q/k/v and gate/up (A side by side, B block-diagonal), and fusing
a lone adapter into the weights. Two ways to gather each row's A/B (`mode`):
- "dense": every adapter's A at once (x @ [in, S*r]), a per-row 0/1 mask, then B: plain
  matmuls, S times the low-rank FLOPs (small beside the base matmul while S*r << in).
- "gather": `mx.gather_mm` over each row's own A and B: r columns per row whatever S.
Does not own: reading adapter files (models/adapters.py) or which row uses which adapter
(engine/core.py passes one adapter index per row to each forward).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

MODES = ("dense", "gather")
DENSE_MAX_SLOTS = 8  # above it "auto" gathers: dense costs grow with the number of adapters


class Rows:
    """Which adapter each row of one forward uses: indices [B] and their one-hot [B, S] (built once a forward)."""

    def __init__(self, ids: list[int], num_slots: int):
        self.ids = mx.array(ids, dtype=mx.uint32)
        self.onehot = (self.ids[:, None] == mx.arange(num_slots, dtype=mx.uint32)[None]).astype(mx.float32)

    @property
    def arrays(self) -> tuple[mx.array, mx.array]:
        return self.ids, self.onehot


def apply(x: mx.array, y: mx.array, arrays: tuple, rows: tuple, *, mode: str) -> mx.array:
    """y plus each row's own update of x; a pure function of arrays, so compiled layers call it too.
    `arrays`: a Delta's (A, B, gains or None); `rows`: Rows.arrays."""
    a, b, gains = arrays
    ids, onehot = rows
    if mode == "dense":  # a [in, S*r]: every adapter at once, then keep the row's own r columns
        mask = mx.repeat(onehot.astype(x.dtype), a.shape[-1] // onehot.shape[-1], axis=1)[:, None, :]
        z = ((x @ a) * mask) @ b
    else:  # a [S, in, r]: each row's own A and B
        z = mx.gather_mm(mx.gather_mm(x, a, rhs_indices=ids), b, rhs_indices=ids)
    y = y + z.astype(y.dtype)
    if gains is not None:
        y = y * gains[ids][:, None, :]
    return y


class Delta:
    """One target (or a fused group of them): A [S, in, r], B [S, r, out] (scale folded in), gains [S, out]."""

    def __init__(self, bank: "Bank", a: mx.array, b: mx.array, gains: mx.array | None):
        self.bank, self.gains = bank, gains
        self.rank = a.shape[-1]
        if bank.mode == "dense":
            self.a = mx.contiguous(a.transpose(1, 0, 2).reshape(a.shape[1], -1))  # [in, S*r], adapter-major
            self.b = b.reshape(-1, b.shape[-1])  # [S*r, out]
        else:
            self.a, self.b = a, b
        mx.eval(self.a, self.b, *([gains] if gains is not None else []))

    @property
    def arrays(self) -> tuple:
        return self.a, self.b, self.gains

    def __call__(self, x: mx.array, y: mx.array) -> mx.array:
        rows = self.bank.rows
        if rows is None:  # a forward outside the engine (mlx-lm's, the peers'): the base model
            return y
        return apply(x, y, self.arrays, rows.arrays, mode=self.bank.mode)


class LoRALinear(nn.Module):
    """A model's Linear with the bank's per-row update added; the base layer alone when no rows are set."""

    def __init__(self, linear: nn.Module, delta: Delta):
        super().__init__()
        self.linear = linear
        self.delta = delta  # a plain attribute: not among the model's parameters

    def __call__(self, x: mx.array) -> mx.array:
        if self.delta.gains is not None and "bias" in self.linear:  # DoRA scales before the bias
            return self.delta(x, self.linear(x) - self.linear.bias) + self.linear.bias
        return self.delta(x, self.linear(x))


def unwrap(layer) -> tuple[nn.Module, Delta | None]:
    return (layer.linear, layer.delta) if isinstance(layer, LoRALinear) else (layer, None)


def _dense_weight(linear) -> mx.array:
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.biases, group_size=linear.group_size,
                             bits=linear.bits, mode=linear.mode)
    return linear.weight


def _gains(adapter, arrays: dict, weight: mx.array) -> mx.array:
    """DoRA's per-output magnitude over the adapted row norms (mlx-lm's DoRALinear, in float32)."""
    w = weight.astype(mx.float32)
    a, b = arrays["lora_a"].astype(mx.float32), arrays["lora_b"].astype(mx.float32)
    adapted = w + (adapter.scale * b.T) @ a.T
    return arrays["m"].astype(mx.float32) / mx.linalg.norm(adapted, axis=1)


class Bank:
    """The job's adapters, stacked per target module; `begin(ids)` sets each row's adapter for a forward."""

    def __init__(self, model: nn.Module, adapters: list, *, mode: str = "auto"):
        if mode == "auto":
            mode = "dense" if len(adapters) <= DENSE_MAX_SLOTS else "gather"
        if mode not in MODES:
            raise ValueError(f"adapter mode must be one of auto, {', '.join(MODES)}, not {mode!r}")
        self.model, self.adapters, self.mode = model, adapters, mode
        self.num_slots = len(adapters)
        self.rows: Rows | None = None
        self._wrapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original)
        self._fused_weights: list[tuple[nn.Module, mx.array]] = []
        self.is_fused = False

    def describe(self) -> str:
        kinds = ", ".join(f"{a.name} ({a.kind}{f' r{a.rank}' if a.rank else ''})" for a in self.adapters)
        how = "fused into the weights" if self.is_fused else f"per row, {self.mode}"
        return f"adapters: {kinds}; {how}"

    # ------------------------------------------------------------ attach / detach
    def attach(self, *, fuse_single: bool = True) -> None:
        """Wrap every targeted Linear (or fold a lone adapter into float weights)."""
        targets = sorted({m for a in self.adapters for m in a.weights})
        modules = dict(self.model.named_modules())
        if fuse_single and self._can_fuse(targets, modules):
            self._fuse_into_weights(targets, modules)
            return
        for path in targets:
            parent_path, _, attr = path.rpartition(".")
            parent, linear = modules[parent_path], modules[path]
            setattr(parent, attr, LoRALinear(linear, self._delta(path, linear)))
            self._wrapped.append((parent, attr, linear))

    def detach(self) -> None:
        """The model as it was: wrappers removed, fused weights restored."""
        for parent, attr, linear in reversed(self._wrapped):
            setattr(parent, attr, linear)
        for linear, weight in self._fused_weights:
            linear.weight = weight
        self._wrapped, self._fused_weights, self.is_fused = [], [], False

    def _can_fuse(self, targets: list, modules: dict) -> bool:
        # One adapter and no base rows: the update is a fixed change of the weights. Quantized
        # weights keep the per-row update (requantizing W + dW would change its rounding).
        return (len(self.adapters) == 1 and not self.adapters[0].is_base
                and all(type(modules[p]) is nn.Linear for p in targets))

    def _fuse_into_weights(self, targets: list, modules: dict) -> None:
        adapter = self.adapters[0]
        for path in targets:
            linear, arrays = modules[path], adapter.weights[path]
            w = linear.weight
            delta = (adapter.scale * arrays["lora_b"].T.astype(mx.float32)) @ arrays["lora_a"].T.astype(mx.float32)
            fused = w.astype(mx.float32) + delta
            if adapter.kind == "dora":
                fused = _gains(adapter, arrays, w)[:, None] * fused
            self._fused_weights.append((linear, w))
            linear.weight = fused.astype(w.dtype)
        mx.eval([m.weight for m, _ in self._fused_weights])
        self.is_fused = True

    def _delta(self, path: str, linear: nn.Module) -> Delta:
        """The stacked A/B (and DoRA gains) of every slot for one module; zeros where a slot has none."""
        weight = _dense_weight(linear)
        out_dims, in_dims = weight.shape
        dtype = weight.dtype if mx.issubdtype(weight.dtype, mx.floating) else mx.float32
        rank = max(a.rank for a in self.adapters if path in a.weights)
        a_s, b_s, g_s, has_gains = [], [], [], False
        for adapter in self.adapters:
            arrays = adapter.weights.get(path)
            if arrays is None:
                a_s.append(mx.zeros((in_dims, rank), dtype))
                b_s.append(mx.zeros((rank, out_dims), dtype))
                g_s.append(mx.ones((out_dims,), mx.float32))
                continue
            pad = rank - adapter.rank  # zero columns of A and rows of B change nothing
            a_s.append(mx.pad(arrays["lora_a"].astype(dtype), [(0, 0), (0, pad)]))
            b_s.append(mx.pad((adapter.scale * arrays["lora_b"].astype(mx.float32)).astype(dtype), [(0, pad), (0, 0)]))
            if adapter.kind == "dora":
                has_gains = True
                g_s.append(_gains(adapter, arrays, weight))
            else:
                g_s.append(mx.ones((out_dims,), mx.float32))
        gains = mx.stack(g_s).astype(dtype) if has_gains else None
        return Delta(self, mx.stack(a_s), mx.stack(b_s), gains)

    # ------------------------------------------------------------ per forward
    def begin(self, ids: list[int] | None) -> None:
        self.rows = Rows(ids, self.num_slots) if ids is not None else None

    def end(self) -> None:
        self.rows = None


def concat(bank: Bank, deltas: list, out_dims: list[int]) -> Delta | None:
    """One Delta for a fused projection: A side by side, B block-diagonal, gains side by side.
    `deltas` follows the fused layers' order; None where a layer has no adapter."""
    if all(d is None for d in deltas):
        return None
    first = next(d for d in deltas if d is not None)
    S = bank.num_slots
    a_s, b_rows, g_s = [], [], []
    total, before = sum(out_dims), 0
    for d, out in zip(deltas, out_dims):
        if d is not None:
            a, b = _stacked(d)
            a_s.append(a)
            b_rows.append(mx.pad(b, [(0, 0), (0, 0), (before, total - before - out)]))
        gains = d.gains if d is not None else None
        g_s.append(gains if gains is not None else mx.ones((S, out), first.b.dtype))
        before += out
    has_gains = any(d is not None and d.gains is not None for d in deltas)
    return Delta(bank, mx.concatenate(a_s, axis=-1), mx.concatenate(b_rows, axis=1),
                 mx.concatenate(g_s, axis=-1) if has_gains else None)


def _stacked(d: Delta) -> tuple[mx.array, mx.array]:
    """A [S, in, r] and B [S, r, out] of a Delta, whichever mode stored it."""
    if d.bank.mode == "gather":
        return d.a, d.b
    S = d.bank.num_slots
    return d.a.reshape(d.a.shape[0], S, d.rank).transpose(1, 0, 2), d.b.reshape(S, d.rank, -1)
