"""A lean forward pass for llama-family models: fewer, larger kernels per layer.

Owns: q/k/v and gate/up projections fused into one matmul each, the layer loop
using them, and a compiled one-token layer (DecodePlan). Why: a decode step of a
small model is bound by per-operation host cost, not FLOPs (an H200 step of
SmolLM2-135M at batch 325: ~490 kernels, ~2.5 ms of GPU work, ~6 ms of host
dispatch), so every operation per layer dropped is time saved on every step.
Fusing concatenates the weights once and then points the model's own layers at
slices of the fused arrays, so no second copy is kept (mlx-lm's forward, used
by the peers in `bench`, still works). Adapters (engine/lora.py) ride along: fused
projections take their concatenated updates, the compiled layer their arrays. Does not own: attention (attention.py),
the cache (kvcache.py), the backend choices (model_runner.py).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlxbatch.engine.attention import AttendOptions, additive, attend
from mlxbatch.engine.lora import apply, concat, unwrap
from mlxbatch.engine.shapes import compiled


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
        self.lora = None  # a lora.Delta when adapters target these layers (set by `fuse`)

    def arrays(self) -> list:
        extra = [self.scales, self.qbiases] if self.is_quantized else []
        return [a for a in (self.weight, self.bias, *extra) if a is not None]

    def __call__(self, x: mx.array) -> list:
        if self.is_quantized:
            y = mx.quantized_matmul(x, self.weight, self.scales, self.qbiases, transpose=True,
                                    group_size=self.group_size, bits=self.bits, mode=self.mode)
        else:
            y = x @ self.weight.T
        if self.lora is not None:  # each row's adapter update, before the bias (DoRA scales there)
            y = self.lora(x, y)
        if self.bias is not None:
            y = y + self.bias
        return mx.split(y, self.splits, axis=-1)


def _out_dims(layer) -> int:
    return layer.scales.shape[0] if isinstance(layer, nn.QuantizedLinear) else layer.weight.shape[0]


def is_eligible(model: nn.Module) -> bool:
    """The registry's fused families, without sliding-window layers (this layer loop has no window)."""
    from mlxbatch.engine.arch import family, layer_windows

    return family(model).fused and hasattr(model, "model") and not any(layer_windows(model))


def _point_at_slices(layers: list, fused: FusedProjection) -> None:
    """Each layer's arrays become views of the fused ones: same values, one copy in memory."""
    bounds = [0, *fused.splits, fused.weight.shape[0]]
    for layer, lo, hi in zip(layers, bounds, bounds[1:]):
        layer.weight = fused.weight[lo:hi]
        if fused.bias is not None:
            layer.bias = fused.bias[lo:hi]
        if fused.is_quantized:
            layer.scales = fused.scales[lo:hi]
            if fused.qbiases is not None:
                layer.biases = fused.qbiases[lo:hi]


def fuse(model: nn.Module) -> list | None:
    """Per layer (qkv, gate_up) projections; None if the model is not eligible."""
    if not is_eligible(model):
        return None
    out = []
    try:
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            pair = []
            for group in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
                group, deltas = zip(*(unwrap(m) for m in group))  # adapters wrap the layers (engine/lora.py)
                proj = FusedProjection(group)
                mx.eval(proj.arrays())
                if any(deltas):
                    proj.lora = concat(next(d for d in deltas if d).bank, deltas, [_out_dims(m) for m in group])
                _point_at_slices(group, proj)
                pair.append(proj)
            out.append(tuple(pair))
    except (ValueError, AttributeError):
        return None
    mx.eval(model.parameters())
    return out


def hidden_states(model: nn.Module, tokens: mx.array, caches: list, fused: list, *, opts: AttendOptions,
                  plan: "DecodePlan | None" = None) -> mx.array:
    """Same result as mlx-lm's `model.model(tokens, cache=caches)` for llama, fewer operations."""
    from mlx_lm.models.activations import swiglu

    inner = model.model
    h = inner.embed_tokens(tokens)
    B, L, _ = h.shape
    mask = caches[0].make_mask(L)
    groups = caches[0].layout.plan
    if L == 1 and (opts.one_query_matmul or groups is not None):  # additive once per step, not per layer
        mask = additive(mask, h.dtype)
    if L == 1 and plan is not None:
        return inner.norm(plan.run(h, mask, caches, groups))
    for i, (layer, cache, (qkv, gate_up)) in enumerate(zip(inner.layers, caches, fused)):
        attn = layer.self_attn
        q, k, v = qkv(layer.input_layernorm(h))
        q, k = _heads(q, B, L, attn.n_heads), _heads(k, B, L, attn.n_kv_heads)
        if hasattr(attn, "q_norm"):  # QK-norm (Qwen3): per head, before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = attn.rope(q, offset=cache.offset), attn.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, _heads(v, B, L, attn.n_kv_heads))
        h = h + attn.o_proj(attend(q, k, v, scale=attn.scale, mask=mask, groups=groups, opts=opts, layer=i))
        g, u = gate_up(layer.post_attention_layernorm(h))
        h = h + layer.mlp.down_proj(swiglu(g, u))
    return inner.norm(h)


class DecodePlan:
    """A one-token layer as compiled functions shared by every layer (weights are inputs):
    norm, q/k/v projection and RoPE before the cache write; (attention,) o-projection, MLP
    and residuals (added by the matmuls where `use_addmm`) after it. Why: building ~20
    operations per layer in Python every step costs more host time than the device needs
    for a small model; a compiled call replays them from C++, and is traced again only
    when the batch changes.
    """

    def __init__(self, model: nn.Module, fused: list, opts: AttendOptions, *, bucketed: bool, use_addmm: bool,
                 dense_q: bool = False):
        first = model.model.layers[0]
        attn, eps = first.self_attn, first.input_layernorm.eps
        self.weights, self.loras = [], []  # per layer; loras: the adapters' (qkv, o, gate_up, down) arrays
        self.has_qk_norm = hasattr(attn, "q_norm")
        qk_eps = attn.q_norm.eps if self.has_qk_norm else 0.0
        for layer, (qkv, gate_up) in zip(model.model.layers, fused):
            (o, d_o), (down, d_down) = unwrap(layer.self_attn.o_proj), unwrap(layer.mlp.down_proj)
            qk_norm = (layer.self_attn.q_norm.weight, layer.self_attn.k_norm.weight) if self.has_qk_norm else None
            self.weights.append((layer.input_layernorm.weight, qkv.weight, qk_norm, o.weight,
                                 layer.post_attention_layernorm.weight, gate_up.weight, down.weight))
            deltas = (qkv.lora, d_o, gate_up.lora, d_down)
            self.loras.append(tuple(d.arrays if d else None for d in deltas) if any(deltas) else None)
        banks = [d.bank for pair in fused for p in pair for d in [p.lora] if d] + [
            unwrap(m)[1].bank for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj) if unwrap(m)[1]]
        self.bank = banks[0] if banks else None
        mode = self.bank.mode if self.bank else "dense"
        self.opts, self.scale, self.bucketed = opts, attn.scale, bucketed
        self.pre = compiled(partial(_pre, heads=(attn.n_heads, attn.n_kv_heads), eps=eps, qk_eps=qk_eps,
                                    rope=attn.rope, dense_q=dense_q, mode=mode), "decode_pre")
        self.post = compiled(partial(_post, eps=eps, use_addmm=use_addmm, mode=mode), "decode_post")
        self.attend_post = compiled(partial(_attend_post, eps=eps, scale=attn.scale, opts=opts, use_addmm=use_addmm,
                                            mode=mode), "decode_attend_post")

    @classmethod
    def build(cls, model: nn.Module, fused: list | None, opts: AttendOptions, *, bucketed: bool, use_addmm: bool,
              dense_q: bool = False):
        """For models whose projections are plain bias-free matrices with gate and up of equal
        width; None otherwise (quantized weights keep the general path)."""
        if fused is None:
            return None
        layers = model.model.layers
        plain = all(type(m) is nn.Linear and "bias" not in m for layer in layers
                    for m in (unwrap(layer.self_attn.o_proj)[0], unwrap(layer.mlp.down_proj)[0]))
        plain = plain and all(not p.is_quantized and p.bias is None for pair in fused for p in pair)
        plain = plain and all(len(gu.splits) == 1 and 2 * gu.splits[0] == gu.weight.shape[0] for _, gu in fused)
        return cls(model, fused, opts, bucketed=bucketed, use_addmm=use_addmm, dense_q=dense_q) if plain else None

    def run(self, h: mx.array, mask: mx.array, caches: list, groups) -> mx.array:
        # Attention joins the compiled call only where the cache keeps its shape for a whole
        # bucket (GPUs) and no row shares a prefix (the cascade's shape follows the groups).
        fold = self.bucketed and groups is None
        rows = self.bank.rows.arrays if self.bank is not None and self.bank.rows is not None else None
        for i, ((ln1, wqkv, qk_norm, wo, ln2, wgu, wd), lora, cache) in enumerate(zip(self.weights, self.loras, caches)):
            lora = lora if rows is not None else None  # (qkv, o, gate_up, down) updates, with the rows' adapters
            lq, lrest = (lora[0], (*lora[1:], rows)) if lora else (None, None)
            q, k, v = self.pre(h, ln1, wqkv, qk_norm, cache.offset, lq, rows)
            k, v = cache.update_and_fetch(k, v)  # outside: an in-place write into the cache buffer
            if fold:
                h = self.attend_post(h, q, k, v, mask, wo, ln2, wgu, wd, lrest)
            else:
                o = attend(q, k, v, scale=self.scale, mask=mask, groups=groups, opts=self.opts, layer=i)
                h = self.post(h, o, wo, ln2, wgu, wd, lrest)
        return h


def _project(x, w, lora, rows, mode: str):
    """x @ w.T plus the rows' adapter updates where the layer has them."""
    y = x @ w.T
    return y if lora is None else apply(x, y, lora, rows, mode=mode)


def _pre(h, ln1, wqkv, qk_norm, offset, lq, rows, *, heads, eps, qk_eps, rope, dense_q: bool, mode: str):
    nq, nk = heads
    B = h.shape[0]
    y = _project(mx.fast.rms_norm(h, ln1, eps), wqkv, lq, rows, mode)
    qk_cols = y.shape[-1] * (nq + nk) // (nq + 2 * nk)
    qk = y[..., :qk_cols].reshape(B, nq + nk, 1, -1)
    if qk_norm is not None:  # QK-norm (Qwen3): q and k heads each by their own weight
        qn, kn = qk_norm
        qk = mx.concatenate([mx.fast.rms_norm(qk[:, :nq], qn, qk_eps), mx.fast.rms_norm(qk[:, nq:], kn, qk_eps)], axis=1)
    qk = rope(qk, offset=offset)  # q and k heads in one call
    q = mx.contiguous(qk[:, :nq]) if dense_q else qk[:, :nq]  # dense: one strided batch in the score matmul
    return q, qk[:, nq:], y[..., qk_cols:].reshape(B, nk, 1, -1)


def _post(h, o, wo, ln2, wgu, wd, lrest=None, *, eps, use_addmm, mode: str = "dense"):
    from mlx_lm.models.activations import swiglu

    if lrest is None:
        h = _residual(h, o, wo, use_addmm)
        g, u = mx.split(mx.fast.rms_norm(h, ln2, eps) @ wgu.T, 2, axis=-1)
        return _residual(h, swiglu(g, u), wd, use_addmm)
    lo, lgu, ld, rows = lrest  # adapters: each update joins its projection before the residual
    h = h + _project(o, wo, lo, rows, mode)
    g, u = mx.split(_project(mx.fast.rms_norm(h, ln2, eps), wgu, lgu, rows, mode), 2, axis=-1)
    return h + _project(swiglu(g, u), wd, ld, rows, mode)


def _residual(h, x, w, use_addmm: bool):
    return mx.addmm(h, x, w.T) if use_addmm else h + x @ w.T


def _attend_post(h, q, k, v, mask, wo, ln2, wgu, wd, lrest=None, *, eps, scale, opts, use_addmm, mode: str):
    o = attend(q, k, v, scale=scale, mask=mask, groups=None, opts=opts, layer=0)
    return _post(h, o, wo, ln2, wgu, wd, lrest, eps=eps, use_addmm=use_addmm, mode=mode)


def _heads(x: mx.array, B: int, L: int, n: int) -> mx.array:
    """[B, L, n * dim] -> [B, n, L, dim]; for one token a reshape (same order, no transpose)."""
    if L == 1:
        return x.reshape(B, n, 1, -1)
    return x.reshape(B, L, n, -1).transpose(0, 2, 1, 3)
