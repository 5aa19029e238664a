"""GGUF import: a llama.cpp .gguf file -> an mlx-lm model folder.

Owns: reading GGUF metadata and tensors (through `mx.load`), renaming them to
Hugging Face / mlx-lm names, undoing llama.cpp's Q/K row permutation, building
the tokenizer and writing config, weights and tokenizer files. Does not own:
where the folder lives or when to convert (models.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from .errors import ModelError

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TENSOR_TYPES = "F32, F16, Q8_0, Q4_0, Q4_1"
SUPPORTED_TOKENIZERS = ("gpt2",)
FORMAT = "mlxbatch-gguf-import v1"

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def read_gguf(path: Path) -> tuple[dict, dict]:
    """Tensors and metadata, or a ModelError naming what is unsupported."""
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mx.load raises bare RuntimeError/ValueError
        raise ModelError(
            f"{path}: cannot read this GGUF file ({exc}). mlxbatch reads GGUF "
            f"tensors of type {SUPPORTED_TENSOR_TYPES}; K-quants (Q4_K, Q6_K, ...) "
            "are not supported yet."
        ) from exc


def _meta(md: dict, key: str, default=None):
    value = md.get(key, default)
    if value is None:
        raise ModelError(f"GGUF metadata lacks {key!r}")
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _hf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        layer, part = m.groups()
        if part not in _LAYER_NAMES:
            raise ModelError(f"GGUF tensor {name!r} has no llama counterpart")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    if base not in _TOP_NAMES:
        raise ModelError(f"GGUF tensor {name!r} has no llama counterpart")
    return f"{_TOP_NAMES[base]}.{suffix}"


def _unpermute(x: mx.array, n_head: int) -> mx.array:
    # llama.cpp interleaves the two RoPE halves of each head's rows; undo it.
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def convert_weights(tensors: dict, md: dict) -> dict:
    n_head = _meta(md, "llama.attention.head_count")
    n_kv = _meta(md, "llama.attention.head_count_kv", n_head)
    out = {}
    for name, x in tensors.items():
        if ".attn_q." in name:
            x = _unpermute(x, n_head)
        elif ".attn_k." in name:
            x = _unpermute(x, n_kv)
        out[_hf_name(name)] = x
    return out


def _quantization(tensors: dict) -> dict | None:
    # GGUF quant blocks hold 32 weights; bits differ per tensor (token_embd is
    # 8-bit in Q4_1 files) and mlx-lm infers them per layer from the shapes.
    if any(name.endswith(".scales") for name in tensors):
        return {"group_size": 32, "bits": 4}
    return None


def build_config(md: dict, tensors: dict) -> dict:
    if (arch := _meta(md, "general.architecture")) not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    hidden = _meta(md, "llama.embedding_length")
    n_head = _meta(md, "llama.attention.head_count")
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": _meta(md, "llama.block_count"),
        "intermediate_size": _meta(md, "llama.feed_forward_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": _meta(md, "llama.attention.head_count_kv", n_head),
        "rms_norm_eps": _meta(md, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _meta(md, "llama.rope.freq_base", 10000.0),
        "max_position_embeddings": _meta(md, "llama.context_length", 2048),
        "vocab_size": len(_meta(md, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _meta(md, "tokenizer.ggml.bos_token_id", 1),
        "eos_token_id": _meta(md, "tokenizer.ggml.eos_token_id", 2),
    }
    if "llama.attention.key_length" in md:
        config["head_dim"] = _meta(md, "llama.attention.key_length")
    if quant := _quantization(tensors):
        config["quantization"] = quant
    return config


def build_tokenizer(md: dict):
    """A `tokenizers.Tokenizer` equal to llama.cpp's for BPE ("gpt2") vocabularies."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _meta(md, "tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise ModelError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: {', '.join(SUPPORTED_TOKENIZERS)})"
        )
    tokens = _meta(md, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _meta(md, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    # llama.cpp's "smollm"/"gpt2" pre-tokenizers: digits split one by one (smollm), then GPT-2 regex.
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if md.get("tokenizer.ggml.pre") == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    types = _meta(md, "tokenizer.ggml.token_type", [1] * len(tokens))
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    tok.add_special_tokens(specials)
    return tok


def tokenizer_config(md: dict) -> dict:
    tokens = _meta(md, "tokenizer.ggml.tokens")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[_meta(md, "tokenizer.ggml.bos_token_id", 1)],
        "eos_token": tokens[_meta(md, "tokenizer.ggml.eos_token_id", 2)],
        "unk_token": tokens[_meta(md, "tokenizer.ggml.unknown_token_id", 0)],
        "add_bos_token": bool(_meta(md, "tokenizer.ggml.add_bos_token", False)),
        "model_max_length": _meta(md, "llama.context_length", 2048),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.ggml.padding_token_id" in md:
        config["pad_token"] = tokens[_meta(md, "tokenizer.ggml.padding_token_id")]
    if "tokenizer.chat_template" in md:
        config["chat_template"] = md["tokenizer.chat_template"]
    return config


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(src: Path, dest: Path, *, source_sha256: str) -> None:
    """Write an mlx-lm model folder for `src` into `dest` (which must not exist yet)."""
    tensors, md = read_gguf(src)
    config = build_config(md, tensors)
    tok = build_tokenizer(md)
    weights = convert_weights(tensors, md)
    dest.mkdir(parents=True)
    # Sorted keys and fixed metadata: the same GGUF gives the same bytes.
    mx.save_safetensors(str(dest / "model.safetensors"), dict(sorted(weights.items())), metadata={"format": "mlx"})
    _write_json(dest / "config.json", config)
    tok.save(str(dest / "tokenizer.json"))
    _write_json(dest / "tokenizer_config.json", tokenizer_config(md))
    _write_json(dest / "mlxbatch.json", {"format": FORMAT, "source": src.name, "source_sha256": source_sha256})
