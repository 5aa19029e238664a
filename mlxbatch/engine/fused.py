"""A lean forward pass for small llama-family models: fewer, larger kernels per layer.

Owns: q/k/v and gate/up projections fused into one matmul each (weights
concatenated once per model), the layer loop using them, and a compiled
one-token layer (DecodePlan). Why: a decode step of a small model is bound by
per-operation host cost, not FLOPs (an H200 step of SmolLM2-135M at batch 325:
~490 kernels, ~2.5 ms of GPU work, ~6 ms of host dispatch), so every operation
per layer dropped is time saved on every step. Also picks, per backend, how one
query attends (CUDA: two matmuls, see DECODE_MATMUL). Concatenation copies
weights, so it is only done for models under `MAX_FUSED_BYTES`; others keep
mlx-lm's own forward. Does not own: the cache (kvcache.py) or the vocabulary
projection.
"""

from __future__ import annotations

import weakref
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..models import backend

MAX_FUSED_BYTES = 2 * 1024**3
_CACHE: dict[int, list | None] = {}  # id(model) -> per-layer fused projections (None: not eligible)


class FusedProjection:
    """Several Linear (or same-format QuantizedLinear) layers on one input, as one matmul."""

    def __init__(self, layers: list):
        first = layers[0]
        self.splits = []
        total = 0
        for layer in layers[:-1]:
            total += _out_dims(layer)
            self.splits.append(total)
        self.is_quantized = isinstance(first, nn.QuantizedLinear)
        if self.is_quantized:
            fmt = {(m.group_size, m.bits, m.mode) for m in layers}
            if len(fmt) != 1 or not all(isinstance(m, nn.QuantizedLinear) for m in layers):
                raise ValueError("mixed quantization formats")
            self.group_size, self.bits, self.mode = fmt.pop()
            self.scales = mx.concatenate([m.scales for m in layers])
            self.qbiases = mx.concatenate([m.biases for m in layers]) if first.biases is not None else None
        elif not all(type(m) is nn.Linear for m in layers):
            raise ValueError("not plain Linear layers")
        self.weight = mx.concatenate([m.weight for m in layers])
        has_bias = ["bias" in m for m in layers]
        if any(has_bias) and not all(has_bias):
            raise ValueError("some layers have a bias and some do not")
        self.bias = mx.concatenate([m.bias for m in layers]) if all(has_bias) else None

    def arrays(self) -> list:
        extra = [self.scales, self.qbiases] if self.is_quantized else []
        return [a for a in (self.weight, self.bias, *extra) if a is not None]

    def __call__(self, x: mx.array) -> list:
        if self.is_quantized:
            y = mx.quantized_matmul(x, self.weight, self.scales, self.qbiases, transpose=True,
                                    group_size=self.group_size, bits=self.bits, mode=self.mode)
        else:
            y = x @ self.weight.T
        if self.bias is not None:
            y = y + self.bias
        return mx.split(y, self.splits, axis=-1)


def _out_dims(layer) -> int:
    return layer.scales.shape[0] if isinstance(layer, nn.QuantizedLinear) else layer.weight.shape[0]


def _eligible(model: nn.Module) -> bool:
    if getattr(model, "model_type", None) != "llama" or not hasattr(model, "model"):
        return False
    if any(getattr(layer, "use_sliding", False) for layer in model.model.layers):
        return False
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return size <= MAX_FUSED_BYTES


def fused_layers(model: nn.Module) -> list | None:
    """Per layer (qkv, gate_up) projections, built on first use; None if not eligible."""
    key = id(model)
    if key not in _CACHE:
        fused = None
        if _eligible(model):
            try:
                fused = [(FusedProjection([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]),
                          FusedProjection([l.mlp.gate_proj, l.mlp.up_proj])) for l in model.model.layers]
                mx.eval([p.arrays() for pair in fused for p in pair])
            except (ValueError, AttributeError):
                fused = None
        _CACHE[key] = fused
        weakref.finalize(model, _CACHE.pop, key, None)  # ids are reused after a model is freed
    return _CACHE[key]


_ON_CUDA = backend() == "cuda" and mx.default_device() == mx.gpu
# MLX's CUDA attention has no single-query kernel that takes a mask: it falls back to a
# batched gemv (~5 of a ~9 ms step at batch 325 on an H200), so there one query is two
# matmuls. Metal's single-query kernel takes masks; the CPU has no fused kernel at all.
DECODE_MATMUL = _ON_CUDA
# Residual adds folded into the matmuls (C + A @ B, one kernel instead of two) where measured
# faster; MLX's CPU addmm is ~15x slower than a BLAS matmul plus an add.
RESIDUAL_ADDMM = _ON_CUDA
COMPILED_DECODE = True  # tests switch it off to compare the two decode paths


def hidden_states(model: nn.Module, tokens: mx.array, caches: list, fused: list) -> mx.array:
    """Same result as mlx-lm's `model.model(tokens, cache=caches)` for llama, fewer operations."""
    from mlx_lm.models.activations import swiglu

    inner = model.model
    h = inner.embed_tokens(tokens)
    B, L, _ = h.shape
    mask = caches[0].make_mask(L)
    if L == 1 and DECODE_MATMUL:  # additive, converted once per step instead of in every layer
        mask = mx.where(mask, mx.array(0, h.dtype), mx.array(-mx.inf, h.dtype))
    if L == 1 and COMPILED_DECODE and (plan := decode_plan(model, fused)) is not None:
        return inner.norm(plan.run(h, mask, caches))
    for layer, cache, (qkv, gate_up) in zip(inner.layers, caches, fused):
        attn = layer.self_attn
        q, k, v = qkv(layer.input_layernorm(h))
        q = attn.rope(_heads(q, B, L, attn.n_heads), offset=cache.offset)
        k = attn.rope(_heads(k, B, L, attn.n_kv_heads), offset=cache.offset)
        k, v = cache.update_and_fetch(k, _heads(v, B, L, attn.n_kv_heads))
        h = h + attn.o_proj(_attend(q, k, v, attn.scale, mask))
        g, u = gate_up(layer.post_attention_layernorm(h))
        h = h + layer.mlp.down_proj(swiglu(g, u))
    return inner.norm(h)


class DecodePlan:
    """A one-token layer as two compiled functions shared by every layer (weights are inputs):
    norm, q/k/v projection and RoPE before the cache write; (attention,) o-projection, MLP
    and residuals (added by the matmuls on CUDA) after it. Why: building ~20 operations per
    layer in Python every step costs more host time than the device needs for a small model;
    a compiled call replays them from C++, and is traced again only when the batch changes.
    """

    def __init__(self, model: nn.Module, fused: list):
        first = model.model.layers[0]
        attn, eps = first.self_attn, first.input_layernorm.eps
        self.weights = [(layer.input_layernorm.weight, qkv.weight, layer.self_attn.o_proj.weight,
                         layer.post_attention_layernorm.weight, gate_up.weight, layer.mlp.down_proj.weight)
                        for layer, (qkv, gate_up) in zip(model.model.layers, fused)]
        self.pre = mx.compile(partial(_pre, heads=(attn.n_heads, attn.n_kv_heads), eps=eps, rope=attn.rope))
        self.scale = attn.scale
        self.post = mx.compile(partial(_post, eps=eps))
        self.attend_post = mx.compile(partial(_attend_post, eps=eps, scale=attn.scale))

    def run(self, h: mx.array, mask: mx.array, caches: list) -> mx.array:
        from . import kvcache

        # Attention joins the compiled call only where the cache keeps its shape for 256
        # steps (GPUs); with exact shapes (CPU) it would be traced again at every step.
        bucketed = kvcache.ATTEND_FULL_BUFFER
        for (ln1, wqkv, wo, ln2, wgu, wd), cache in zip(self.weights, caches):
            q, k, v = self.pre(h, ln1, wqkv, cache.offset)
            k, v = cache.update_and_fetch(k, v)  # outside: an in-place write into the cache buffer
            if bucketed:
                h = self.attend_post(h, q, k, v, mask, wo, ln2, wgu, wd)
            else:
                h = self.post(h, _attend(q, k, v, self.scale, mask), wo, ln2, wgu, wd)
        return h


def _pre(h, ln1, wqkv, offset, *, heads, eps, rope):
    nq, nk = heads
    B = h.shape[0]
    y = mx.fast.rms_norm(h, ln1, eps) @ wqkv.T
    qk_cols = y.shape[-1] * (nq + nk) // (nq + 2 * nk)
    qk = rope(y[..., :qk_cols].reshape(B, nq + nk, 1, -1), offset=offset)  # q and k heads in one call
    return qk[:, :nq], qk[:, nq:], y[..., qk_cols:].reshape(B, nk, 1, -1)


def _post(h, o, wo, ln2, wgu, wd, *, eps):
    from mlx_lm.models.activations import swiglu

    h = _residual(h, o, wo)
    g, u = mx.split(mx.fast.rms_norm(h, ln2, eps) @ wgu.T, 2, axis=-1)
    return _residual(h, swiglu(g, u), wd)


def _residual(h, x, w):
    return mx.addmm(h, x, w.T) if RESIDUAL_ADDMM else h + x @ w.T


def _attend_post(h, q, k, v, mask, wo, ln2, wgu, wd, *, eps, scale):
    return _post(h, _attend(q, k, v, scale, mask), wo, ln2, wgu, wd, eps=eps)


_PLANS: dict[int, DecodePlan | None] = {}


def decode_plan(model: nn.Module, fused: list) -> DecodePlan | None:
    """The compiled one-token path, for models whose projections are plain bias-free matrices
    with gate and up of equal width (quantized weights keep the general path)."""
    key = id(model)
    if key not in _PLANS:
        layers = model.model.layers
        plain = all(type(m) is nn.Linear and "bias" not in m for l in layers
                    for m in (l.self_attn.o_proj, l.mlp.down_proj))
        plain = plain and all(not p.is_quantized and p.bias is None for pair in fused for p in pair)
        plain = plain and all(len(gu.splits) == 1 and 2 * gu.splits[0] == gu.weight.shape[0] for _, gu in fused)
        _PLANS[key] = DecodePlan(model, fused) if plain else None
        weakref.finalize(model, _PLANS.pop, key, None)
    return _PLANS[key]


def _attend(q, k, v, scale: float, mask: mx.array) -> mx.array:
    """Attention output as [B, L, heads * dim]."""
    B, _, L, _ = q.shape
    if L == 1 and DECODE_MATMUL:
        return _attend_one(q, k, v, scale, mask)
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return o.reshape(B, 1, -1) if L == 1 else o.transpose(0, 2, 1, 3).reshape(B, L, -1)


def _heads(x: mx.array, B: int, L: int, n: int) -> mx.array:
    """[B, L, n * dim] -> [B, n, L, dim]; for one token a reshape (same order, no transpose)."""
    if L == 1:
        return x.reshape(B, n, 1, -1)
    return x.reshape(B, L, n, -1).transpose(0, 2, 1, 3)


def _attend_one(q, k, v, scale: float, mask: mx.array) -> mx.array:
    """Attention of one query per row as two batched matmuls: [B, 1, heads * dim]."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D)  # query heads grouped under their shared key head
    scores = mx.addmm(mx.broadcast_to(mask, (B, Hkv, H // Hkv, k.shape[2])), qg, k.swapaxes(-1, -2), alpha=scale)
    o = mx.softmax(scores, axis=-1, precise=True) @ v
    return o.reshape(B, 1, H * D)
