"""GGUF architectures: llama.cpp's names, layouts and metadata -> mlx-lm's model classes.

Owns: per-architecture tensor renaming, the layout fixes llama.cpp's converter
applied (llama's Q/K row permutation, Gemma's `1 + w` norms), and config.json
built from `{arch}.*` metadata (rope scaling, sliding windows, soft-capping,
QK-norm, tied embeddings). Does not own: reading or dequantizing tensors (models/gguf/__init__.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import mlx.core as mx

from mlxbatch.errors import ModelError

_COMMON = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA = dict(_COMMON, ffn_norm="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
              post_ffw_norm="post_feedforward_layernorm")
_PHI3 = dict(_COMMON, attn_qkv="self_attn.qkv_proj", ffn_up="mlp.gate_up_proj")
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors that become config values (rope frequency factors), not weights.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class Arch:
    model_type: str
    layer_names: dict = field(default_factory=lambda: dict(_COMMON))
    permute_qk: bool = False  # llama.cpp reorders llama's Q/K rows for its RoPE kernel
    norm_offset: float = 0.0  # llama.cpp stores Gemma's norms as 1 + w; mlx-lm adds the 1 itself


ARCHITECTURES = {
    "llama": Arch("llama", permute_qk=True),  # Mistral files say "llama" too
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3", dict(_COMMON, **_QK_NORM)),
    "gemma2": Arch("gemma2", dict(_GEMMA), norm_offset=1.0),
    "gemma3": Arch("gemma3_text", dict(_GEMMA, **_QK_NORM), norm_offset=1.0),
    "phi3": Arch("phi3", dict(_PHI3)),
}


def arch_of(md: dict) -> tuple[str, Arch]:
    name = md.get("general.architecture")
    if name not in ARCHITECTURES:
        raise ModelError(f"GGUF architecture {name!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)}; Mistral files are 'llama')")
    return name, ARCHITECTURES[name]


class Meta:
    """`m("block_count")` reads `{arch}.block_count`; a missing required key is a ModelError."""

    def __init__(self, md: dict, arch: str):
        self.md, self.arch = md, arch

    def __call__(self, key: str, default=...):
        full = f"{self.arch}.{key}"
        if full in self.md:
            return self.md[full]
        if default is ...:
            raise ModelError(f"GGUF metadata lacks {full!r}")
        return default


def hf_name(name: str, arch: Arch) -> str:
    base, _, suffix = name.rpartition(".")
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        layer, part = m.groups()
        if part not in arch.layer_names:
            raise ModelError(f"GGUF tensor {name!r} has no {arch.model_type} counterpart in mlx-lm")
        return f"model.layers.{layer}.{arch.layer_names[part]}.{suffix}"
    if base not in TOP_NAMES:
        raise ModelError(f"GGUF tensor {name!r} has no {arch.model_type} counterpart in mlx-lm")
    return f"{TOP_NAMES[base]}.{suffix}"


def unpermute(x: mx.array, n_head: int) -> mx.array:
    # llama.cpp interleaves the two RoPE halves of each head's rows; undo it.
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def fix_tensor(name: str, x: mx.array, arch: Arch, md: dict, arch_name: str) -> mx.array:
    """Undo what llama.cpp's converter did to this tensor (on scales/biases too)."""
    m = Meta(md, arch_name)
    if arch.permute_qk and ".attn_q." in name:
        return unpermute(x, m("attention.head_count"))
    if arch.permute_qk and ".attn_k." in name:
        n_head = m("attention.head_count")
        return unpermute(x, m("attention.head_count_kv", n_head))
    if arch.norm_offset and name.endswith("norm.weight"):
        return x - arch.norm_offset
    return x


def build_config(md: dict, *, has_output: bool, rope_tensors: dict) -> dict:
    arch_name, arch = arch_of(md)
    m = Meta(md, arch_name)
    n_head = m("attention.head_count")
    hidden = m("embedding_length")
    config = {
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": m("block_count"),
        "intermediate_size": m("feed_forward_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": m("attention.head_count_kv", n_head),
        "rms_norm_eps": m("attention.layer_norm_rms_epsilon"),
        "rope_theta": m("rope.freq_base", 10000.0),
        "max_position_embeddings": m("context_length", 2048),
        "vocab_size": len(md["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": not has_output,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id", 1),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id", 2),
    }
    head_dim = m("attention.key_length", None)
    if head_dim is not None:
        config["head_dim"] = head_dim
    if scaling := _rope_scaling(m, rope_tensors, head_dim or hidden // n_head):
        config["rope_scaling"] = scaling
    config.update(_EXTRA[arch_name](m, config))
    return config


def _rope_scaling(m: Meta, rope_tensors: dict, head_dim: int) -> dict | None:
    if "rope_freqs.weight" in rope_tensors:
        return _llama3_scaling(m, rope_tensors["rope_freqs.weight"], head_dim)
    if "rope_factors_long.weight" in rope_tensors:  # Phi-3 "longrope"
        return {"type": "longrope", "long_factor": rope_tensors["rope_factors_long.weight"],
                "short_factor": rope_tensors["rope_factors_short.weight"]}
    kind = m("rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ModelError(f"GGUF rope scaling {kind!r} is not supported (supported: linear, yarn, llama3, longrope)")
    scaling = {"type": kind, "rope_type": kind, "factor": float(m("rope.scaling.factor"))}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = m("rope.scaling.original_context_length")
    return scaling


def llama3_factors(head_dim: int, base: float, factor: float, low: float = 1.0, high: float = 4.0,
                   original: int = 8192) -> list[float]:
    """The wavelength factors llama.cpp's converter writes as `rope_freqs` for Llama 3.1+."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _llama3_scaling(m: Meta, freqs: list[float], head_dim: int) -> dict:
    # GGUF keeps only the computed factors; recover Llama 3's parameters from them.
    factor = max(freqs)
    expected = llama3_factors(head_dim, m("rope.freq_base", 10000.0), factor)
    if len(expected) != len(freqs) or any(abs(a - b) > 1e-3 * factor for a, b in zip(expected, freqs)):
        raise ModelError("GGUF rope_freqs tensor does not match Llama 3 rope scaling "
                         "(low 1, high 4, original 8192); other rope frequency tables are not supported")
    return {"rope_type": "llama3", "type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _gemma_scalar(m: Meta, config: dict) -> float:
    # llama.cpp: the 27B models scale queries by hidden/heads, the others by head_dim.
    if m("block_count") in (46, 62):
        return config["hidden_size"] // config["num_attention_heads"]
    return config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])


def _gemma2(m: Meta, config: dict) -> dict:
    return {"head_dim": config.get("head_dim", 256), "query_pre_attn_scalar": _gemma_scalar(m, config),
            "attn_logit_softcapping": m("attn_logit_softcapping", 50.0),
            "final_logit_softcapping": m("final_logit_softcapping", 30.0),
            "sliding_window": m("attention.sliding_window", 4096)}


def _gemma3(m: Meta, config: dict) -> dict:
    # llama.cpp hard-codes these two for Gemma 3: every 6th layer global, local rope base 10k.
    return {"query_pre_attn_scalar": _gemma_scalar(m, config), "sliding_window": m("attention.sliding_window", 512),
            "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0}


def _phi3(m: Meta, config: dict) -> dict:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    extra = {"partial_rotary_factor": m("rope.dimension_count", head_dim) / head_dim,
             "original_max_position_embeddings": m("rope.scaling.original_context_length",
                                                   config["max_position_embeddings"])}
    return extra


def _qwen3(m: Meta, config: dict) -> dict:
    return {"head_dim": config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])}


_EXTRA = {"llama": lambda m, c: {}, "qwen2": lambda m, c: {}, "qwen3": _qwen3,
          "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3}
