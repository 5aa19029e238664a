"""A compressed KV cache: keys and values stored as MLX affine group quantization, and read packed.

Owns: the format (`KVQuant`: key bits, value bits, group size), packing new columns as they are
written (`mx.quantize`: per group of `group_size` elements of a head dimension, a scale and a bias
in the model dtype beside the packed uint32 words), the two products attention needs over packed
keys/values (`scores`: q.K^T, `weighted`: p.V) in one of two forms chosen per backend
(`quantized_matmul`: MLX's quantized matmul reads the packed words directly, as mlx-lm's quantized
SDPA does; else each operand is dequantized to the model dtype just before its matmul), the bytes a
token takes, and the small helpers that let the cache treat a packed triple like one array.
A packed tensor is a tuple (words, scales, biases) whose first three axes are those of the array
it replaces ([B, Hkv, S, ...]), so slicing, indexing and concatenation on them apply to each part.
Does not own: the cache layout (kvcache.py), attention's structure (attention.py), the settings'
checks (job/spec.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

BITS = (4, 8)  # what `--kv-bits` accepts (16: the model dtype, i.e. off)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # mlx-lm's default for `--kv-group-size`


@dataclass(frozen=True)
class KVQuant:
    bits: int  # keys
    value_bits: int
    group_size: int
    # How attention reads the packed words: MLX's quantized matmul (True), or dequantize, then matmul;
    # for one query a row (decode) and for chunks of queries (prefill): the fastest form differs.
    quantized_matmul: bool = True
    prefill_quantized_matmul: bool = True

    def reads_packed(self, many: bool) -> bool:
        return self.prefill_quantized_matmul if many else self.quantized_matmul

    def pack(self, keys: mx.array, values: mx.array) -> tuple:
        return (tuple(mx.quantize(keys, group_size=self.group_size, bits=self.bits)),
                tuple(mx.quantize(values, group_size=self.group_size, bits=self.value_bits)))

    def unpack(self, x: tuple, *, is_value: bool = False) -> mx.array:
        bits = self.value_bits if is_value else self.bits
        return mx.dequantize(*x, group_size=self.group_size, bits=bits)

    def bytes_per_token(self, head_dim: int, itemsize: int) -> float:
        """Bytes of one head's key plus value for one token: packed words, then a scale and a bias a group."""
        side = 2 * itemsize * head_dim / self.group_size
        return head_dim * (self.bits + self.value_bits) / 8 + 2 * side

    def describe(self) -> str:
        bits = f"{self.bits}-bit" if self.bits == self.value_bits else f"{self.bits}-bit keys, {self.value_bits}-bit values"
        return f"{bits}, groups of {self.group_size}"


def make(bits: int | None, value_bits: int | None = None, group_size: int | None = None, *,
         head_dim: int | None = None) -> KVQuant | None:
    """The format for the settings (None: off); raises ValueError on values MLX or the model cannot take."""
    if not bits or bits == 16:
        if value_bits and value_bits != 16:
            raise ValueError("--kv-value-bits needs --kv-bits")
        return None
    value_bits = value_bits or bits
    for name, b in (("--kv-bits", bits), ("--kv-value-bits", value_bits)):
        if b not in BITS:
            raise ValueError(f"{name} must be one of 4, 8 or 16 (off), got {b}")
    group = group_size or default_group_size(head_dim)
    if group not in GROUP_SIZES:
        raise ValueError(f"--kv-group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group}")
    if head_dim is not None and head_dim % group:
        raise ValueError(f"--kv-group-size {group} does not divide this model's head dimension ({head_dim})")
    return KVQuant(bits, value_bits, group)


def default_group_size(head_dim: int | None) -> int:
    """mlx-lm's 64 where it divides the head dimension, else the largest that does (tiny heads)."""
    if head_dim is None or head_dim % DEFAULT_GROUP_SIZE == 0:
        return DEFAULT_GROUP_SIZE
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if head_dim % g == 0), DEFAULT_GROUP_SIZE)


def is_packed(x) -> bool:
    return isinstance(x, tuple)


def each(fn, x):
    """`fn` on an array, or on every part of a packed one."""
    return tuple(fn(a) for a in x) if isinstance(x, tuple) else fn(x)


def each2(fn, x, y):
    """`fn(x, y)` part by part (both packed alike, or both plain)."""
    return tuple(fn(a, b) for a, b in zip(x, y)) if isinstance(x, tuple) else fn(x, y)


def first(x) -> mx.array:
    """The array whose first three axes ([B, Hkv, S]) every part shares."""
    return x[0] if isinstance(x, tuple) else x


def nbytes(x) -> int:
    return sum(a.nbytes for a in x) if isinstance(x, tuple) else x.nbytes


def zeros_like_cols(x, batch: int, cols: int):
    """Zeros of x's format with `batch` rows and `cols` columns (a packed zero dequantizes to 0)."""
    return each(lambda a: mx.zeros((batch, a.shape[1], cols, a.shape[3]), a.dtype), x)


def scores(q: mx.array, k, kv: KVQuant | None, many: bool = False) -> mx.array:
    """q [.., M, D] times K^T ([.., S, D], plain or packed): [.., M, S]; `many`: several queries a row."""
    if not is_packed(k):
        return q @ k.swapaxes(-1, -2)
    if kv.reads_packed(many):
        return mx.quantized_matmul(q.astype(k[1].dtype), *k, transpose=True, group_size=kv.group_size, bits=kv.bits)
    return q @ kv.unpack(k).swapaxes(-1, -2)


def weighted(p: mx.array, v, kv: KVQuant | None, many: bool = False) -> mx.array:
    """Softmax weights p [.., M, S] times V ([.., S, D], plain or packed): [.., M, D] in V's dtype."""
    if not is_packed(v):
        return p.astype(v.dtype) @ v
    p = p.astype(v[1].dtype)
    if kv.reads_packed(many):
        return mx.quantized_matmul(p, *v, transpose=False, group_size=kv.group_size, bits=kv.value_bits)
    return p @ kv.unpack(v, is_value=True)
