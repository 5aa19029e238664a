"""A lean forward pass for small llama-family models: fewer, larger kernels per layer.

Owns: q/k/v and gate/up projections fused into one matmul each (weights
concatenated once per model), and the layer loop using them. Why: a decode step
of a small model is bound by per-operation overhead, not FLOPs (FINDINGS.md:
~7 ms per step on an H200 whatever the batch), so three fewer operations per
layer is time saved on every step. Concatenation copies those weights, so it is
only done for models under `MAX_FUSED_BYTES`; others keep mlx-lm's own forward.
Does not own: the cache (kvcache.py) or the vocabulary projection.
"""

from __future__ import annotations

import weakref

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

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


def hidden_states(model: nn.Module, tokens: mx.array, caches: list, fused: list) -> mx.array:
    """Same result as mlx-lm's `model.model(tokens, cache=caches)` for llama, fewer operations."""
    from mlx_lm.models.activations import swiglu

    inner = model.model
    h = inner.embed_tokens(tokens)
    B, L, _ = h.shape
    mask = caches[0].make_mask(L)
    for layer, cache, (qkv, gate_up) in zip(inner.layers, caches, fused):
        attn = layer.self_attn
        q, k, v = qkv(layer.input_layernorm(h))
        q = attn.rope(q.reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3), offset=cache.offset)
        k = attn.rope(k.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3), offset=cache.offset)
        v = v.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        k, v = cache.update_and_fetch(k, v)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=attn.scale, mask=mask)
        h = h + attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
        g, u = gate_up(layer.post_attention_layernorm(h))
        h = h + layer.mlp.down_proj(swiglu(g, u))
    return inner.norm(h)
