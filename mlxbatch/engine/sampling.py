"""Vectorized per-row sampling: one call samples the whole batch.

Owns: temperature, top-k, top-p, min-p per row, greedy and sampled rows mixed,
and a counter-based random stream per row (seed, token index, vocab index), so
a row's samples do not depend on which batch it lands in. Does not own: stop
detection (engine/core.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

_NEG_INF = float("-inf")


@dataclass
class RowParams:
    """Device arrays of per-row sampling settings, aligned with the batch rows."""

    temperature: mx.array  # float32 [B]; 0 means greedy
    top_p: mx.array  # float32 [B]; 1 means off
    top_k: mx.array  # int32 [B]; 0 means off
    min_p: mx.array  # float32 [B]; 0 means off
    seed: mx.array  # uint32 [B]
    counter: mx.array  # uint32 [B]: tokens sampled so far, the stream position
    is_sampled: bool  # any row with temperature > 0 (host-side, skips work)
    is_filtered: bool  # any row using top-k or top-p

    @classmethod
    def build(cls, rows: list) -> "RowParams":
        """From a list of objects with temperature/top_p/top_k/min_p/seed attributes."""
        f32 = lambda xs: mx.array(xs, dtype=mx.float32)  # noqa: E731
        return cls(
            temperature=f32([r.temperature for r in rows]),
            top_p=f32([r.top_p for r in rows]),
            top_k=mx.array([r.top_k for r in rows], dtype=mx.int32),
            min_p=f32([r.min_p for r in rows]),
            seed=mx.array([r.seed & 0xFFFFFFFF for r in rows], dtype=mx.uint32),
            counter=mx.zeros((len(rows),), dtype=mx.uint32),
            is_sampled=any(r.temperature > 0 for r in rows),
            is_filtered=any(r.temperature > 0 and (r.top_k > 0 or r.top_p < 1) for r in rows),
        )

    def arrays(self) -> list:
        return [self.temperature, self.top_p, self.top_k, self.min_p, self.seed, self.counter]

    def take(self, index: mx.array) -> "RowParams":
        t, p, k, m, s, c = (a[index] for a in self.arrays())
        return RowParams(t, p, k, m, s, c, self.is_sampled, self.is_filtered)

    def concat(self, other: "RowParams") -> "RowParams":
        t, p, k, m, s, c = (mx.concatenate([a, b]) for a, b in zip(self.arrays(), other.arrays()))
        return RowParams(t, p, k, m, s, c, self.is_sampled or other.is_sampled,
                         self.is_filtered or other.is_filtered)


def _fmix32(h: mx.array) -> mx.array:
    # murmur3's finalizer: a cheap, well-mixed 32-bit hash in plain array ops.
    h = h ^ (h >> 16)
    h = h * mx.array(0x85EBCA6B, dtype=mx.uint32)
    h = h ^ (h >> 13)
    h = h * mx.array(0xC2B2AE35, dtype=mx.uint32)
    return h ^ (h >> 16)


def gumbel_noise(seed: mx.array, counter: mx.array, vocab: int) -> mx.array:
    """Gumbel(0, 1) noise [B, vocab], a pure function of (seed, counter, vocab index)."""
    golden = mx.array(0x9E3779B9, dtype=mx.uint32)
    row = _fmix32(seed ^ _fmix32(counter * golden + golden))
    cols = mx.arange(vocab, dtype=mx.uint32) * mx.array(0xCC9E2D51, dtype=mx.uint32)
    bits = _fmix32(row[:, None] ^ cols[None, :])
    u = ((bits >> 8).astype(mx.float32) + 0.5) * (1.0 / (1 << 24))
    return -mx.log(-mx.log(u))


def _filter(scaled: mx.array, p: RowParams) -> mx.array:
    """Mask (to -inf) what top-k, top-p and min-p exclude, per row."""
    vocab = scaled.shape[-1]
    if p.is_filtered:
        desc = -mx.sort(-scaled, axis=-1)
        k = mx.where(p.top_k > 0, mx.minimum(p.top_k, vocab), vocab) - 1
        kth = mx.take_along_axis(desc, k[:, None], axis=-1)
        probs = mx.softmax(desc, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        kept = mx.maximum((before < p.top_p[:, None]).sum(axis=-1), 1) - 1
        pth = mx.take_along_axis(desc, kept[:, None].astype(mx.int32), axis=-1)
        scaled = mx.where(scaled < mx.maximum(kth, pth), _NEG_INF, scaled)
    floor = mx.max(scaled, axis=-1, keepdims=True) + mx.log(mx.maximum(p.min_p, 1e-30))[:, None]
    return mx.where((p.min_p[:, None] > 0) & (scaled < floor), _NEG_INF, scaled)


def allowed_tokens(words: mx.array, vocab: int) -> mx.array:
    """A uint32 bitmask [B, W] (bit j of word w is token 32w + j) as bool [B, vocab]; tokens
    past the mask's width are not allowed."""
    bits = (words[:, :, None] >> mx.arange(32, dtype=mx.uint32)) & 1
    flat = bits.reshape(words.shape[0], -1).astype(mx.bool_)
    if flat.shape[1] < vocab:
        flat = mx.concatenate([flat, mx.zeros((flat.shape[0], vocab - flat.shape[1]), dtype=mx.bool_)], axis=1)
    return flat[:, :vocab]


def _masked(logits: mx.array, allowed: mx.array | None) -> mx.array:
    return logits if allowed is None else mx.where(allowed, logits, _NEG_INF)


def sample(logits: mx.array, p: RowParams, *, with_logprobs: bool = False,
           allowed: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
    """Next token per row, and the log-probabilities [B, vocab] when asked for.

    Normalising costs a pass over the vocabulary (more than the projection on a
    CPU with a small model), and argmax, Gumbel-max, top-k and min-p are all
    shift-invariant, so it is skipped unless logprobs are wanted. `allowed`
    (bool [B, vocab], from grammars) limits what is drawn; logprobs stay the model's.
    """
    if not (p.is_sampled or with_logprobs):
        return mx.argmax(_masked(logits, allowed), axis=-1), None  # no float32 widening: same argmax, one op less
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True) if with_logprobs else None
    logits = _masked(logits, allowed)
    greedy = mx.argmax(logits, axis=-1)
    if not p.is_sampled:
        return greedy, logprobs
    temp = mx.where(p.temperature > 0, p.temperature, 1.0)
    scaled = _filter(logits / temp[:, None], p)
    drawn = mx.argmax(scaled + gumbel_noise(p.seed, p.counter, logits.shape[-1]), axis=-1)
    return mx.where(p.temperature > 0, drawn, greedy), logprobs
