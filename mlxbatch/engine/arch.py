"""The architecture registry: what each mlx-lm model family gets from the engine.

Owns: the one table of families (keyed by the mlx-lm module that defines the model
class, so Mistral, which mlx-lm loads as llama, is llama here too), each layer's
cache kind read from the model's own `make_cache()` (plain, sliding window, a
convolution / recurrent state, or refused by name), whether the model's attention goes through mlx-lm's
`scaled_dot_product_attention` (then the engine attends for it: shared prefixes
stored once, packed KV, sinks), and the check made from a config before any
weights load. Does not own: running the model (model_runner.py) or the cache (kvcache.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.nn as nn

from mlxbatch.errors import UsageError


@dataclass(frozen=True)
class Family:
    """What one architecture family gets beyond the generic path (mlx-lm's own layers and
    attention over the engine's batch cache, which every batchable architecture has)."""

    attends: bool = False  # its layers' attention is one mlx-lm scaled_dot_product_attention call over
    # the cached keys/values: the engine computes it (shared prefixes stored once, packed KV, sinks)
    fast_head: bool = False  # logits = head(model.model(x)[:, -1]): prefill projects one position
    fused: bool = False  # fused projections and the compiled one-token layer (engine/fused.py)
    mask_per_kv_head: bool = False  # its attention reshapes queries [B, Hkv, repeats, L, D]


_BOTH = Family(attends=True, fast_head=True)
# Keyed by module name under mlx_lm.models; each entry is checked by tests/test_conformance.py.
# Families not listed run the generic path (correct where mlx-lm's layers are, no cascade or packed KV).
FAMILIES = {
    **{name: Family(attends=True, fast_head=True, fused=True) for name in ("llama", "qwen2", "qwen3")},
    **{name: _BOTH for name in ("qwen3_moe", "smollm3", "olmo2", "olmo3", "mixtral", "phi3",
                                "exaone4", "glm4", "gemma3_text", "ministral3", "gpt_oss", "ernie4_5", "starcoder2")},
    **{name: Family(attends=True) for name in ("gemma", "cohere", "cohere2", "granite", "gpt2")},
    "gemma2": Family(mask_per_kv_head=True),  # soft-caps its scores in its own attention code
    "deepseek_v3": Family(fast_head=True),  # MLA: its rope scores reach attention as the mask
    # Hybrids: state layers (kvcache.StateCache) beside attention layers the engine attends for;
    # granitemoehybrid divides its logits by a scale after the head (no fast_head).
    "lfm2": _BOTH,
    "qwen3_next": _BOTH,
    "granitemoehybrid": Family(attends=True),
}

# What mlx-lm calls its cache classes, by what the engine makes of them.
_PLAIN, _WINDOWED = {"KVCache"}, {"RotatingKVCache"}
_STATE = {"ArraysCache", "MambaCache"}


def module_name(model: nn.Module) -> str:
    return type(model).__module__.rsplit(".", 1)[-1]


def family(model: nn.Module) -> Family:
    return FAMILIES.get(module_name(model), Family())


def model_type(model: nn.Module) -> str:
    return getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None) or module_name(model)


def layer_windows(model: nn.Module) -> tuple:
    """Per layer of the model's cache: its sliding window, None for a plain layer, or a StateLayer
    (a convolution / recurrent state). A kind the engine cannot batch is a usage error naming the
    model type and the kind."""
    from mlxbatch.engine.kvcache import StateLayer

    if not hasattr(model, "make_cache"):
        return (None,) * len(model.layers)
    out = []
    for c in model.make_cache():
        kind = type(c).__name__
        if kind in _PLAIN:
            out.append(None)
        elif kind in _WINDOWED and not getattr(c, "keep", 0):
            out.append(c.max_size)
        elif kind in _STATE and hasattr(c, "cache"):
            out.append(StateLayer(len(c.cache)))
        else:
            raise UsageError(_refusal(model_type(model), kind))
    return tuple(out)


def _refusal(name: str, kind: str) -> str:
    return (f"model type {name!r} is not supported yet: its layers keep a cache the engine cannot batch ({kind}); "
            "docs/models.md lists the supported architectures")


def routes_attention(model: nn.Module) -> bool:
    """True when the engine computes the model's attention (its family says so and its modules
    call mlx-lm's `scaled_dot_product_attention`)."""
    from mlx_lm.models import base

    if not family(model).attends:
        return False
    mods = {sys.modules[type(m).__module__] for _, m in model.named_modules()}
    return any(getattr(m, "scaled_dot_product_attention", None) in (base.scaled_dot_product_attention, _dispatch)
               for m in mods)


def install(model: nn.Module) -> None:
    """Point the model's modules at `_dispatch` (only for families that `attends`): a LayerCache
    attends itself, any other cache (a peer's, in `bench`) gets mlx-lm's own function."""
    from mlx_lm.models import base

    for _, m in model.named_modules():
        mod = sys.modules[type(m).__module__]
        if getattr(mod, "scaled_dot_product_attention", None) is base.scaled_dot_product_attention:
            mod.scaled_dot_product_attention = _dispatch


def _dispatch(queries, keys, values, cache, scale: float, mask, sinks=None):
    attend = getattr(cache, "attend", None)
    if attend is not None:
        return attend(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
    from mlx_lm.models import base

    return base.scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def head_dim(config) -> int | None:
    """Attention head size from a config dict or ModelArgs, under each family's names; None if unknown."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    if get("head_dim"):
        return get("head_dim")
    hidden = next((get(k) for k in ("hidden_size", "n_embd", "d_model") if get(k)), None)
    heads = next((get(k) for k in ("num_attention_heads", "n_head") if get(k)), None)
    return hidden // heads if hidden and heads else None


def check(model: nn.Module, kv=None) -> None:
    """Refuse, by model type, what the engine cannot run: a cache kind it cannot batch, or packed
    KV (`kv`: a KVQuant) where the architecture computes attention itself."""
    from mlxbatch.engine.kvcache import StateLayer

    has_kv = any(not isinstance(w, StateLayer) for w in layer_windows(model))  # else nothing to pack
    if kv is not None and has_kv and not (routes_attention(model) or family(model).fused):
        raise UsageError(f"--kv-bits: model type {model_type(model)!r} computes its attention itself (not through "
                         "mlx-lm's scaled_dot_product_attention), so it cannot read packed keys and values")


def check_config(config: dict, kv=None) -> None:
    """`check` before the weights load: the model is built from its config with lazy (never
    computed) weights."""
    from mlxbatch.models import weights as weights_io

    try:
        model_cls, args_cls = weights_io.model_classes(config)
    except ValueError as exc:
        raise UsageError(f"model type {config.get('model_type')!r} is not supported: {exc}") from None
    try:
        model = model_cls(args_cls.from_dict(config))
    except Exception:  # noqa: BLE001 - an odd config: the loader reports it with its own words
        return
    check(model, kv)
