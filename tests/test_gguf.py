"""GGUF import: small random models written with llama.cpp's own `gguf` writer, one per
architecture and covering every supported tensor type, imported back and compared
with mlx-lm's model built from the same (dequantized) weights; refusals."""

import itertools
import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from conftest import cli
from gguf import GGMLQuantizationType as Q
from gguf_names import gguf_name, permute
from mlx.utils import tree_flatten

from mlxbatch import models
from mlxbatch.errors import ModelError
from mlxbatch.models.gguf import arch as gguf_arch
from mlxbatch.models.gguf import tokenizer as gguf_tokenizer

VOCAB = 320
_BASE = dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB, max_position_embeddings=4096)
# HF-style configs for mlx-lm; K-quant blocks hold 256 weights, so rows are 256 or 512 wide.
CASES = {
    "llama": (dict(_BASE, model_type="llama", rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
              [Q.Q4_K, Q.Q8_0, Q.Q4_0, Q.Q6_K]),
    "qwen2": (dict(_BASE, model_type="qwen2", rope_theta=1e6, tie_word_embeddings=True), [Q.Q5_K, Q.Q4_1, Q.F16]),
    "qwen3": (dict(_BASE, model_type="qwen3", rope_theta=1e6, head_dim=64, tie_word_embeddings=True),
              [Q.Q3_K, Q.Q5_0, Q.BF16]),
    "gemma2": (dict(_BASE, model_type="gemma2", head_dim=64, rope_theta=10000.0, query_pre_attn_scalar=64,
                    attn_logit_softcapping=20.0, final_logit_softcapping=10.0), [Q.Q2_K, Q.Q5_1, Q.Q8_K]),
    # 6 layers: mlx-lm's gemma3 indexes layer 5 (the first global one) for its mask
    "gemma3": (dict(_BASE, model_type="gemma3_text", num_hidden_layers=6, head_dim=64, rope_theta=1e6, query_pre_attn_scalar=64,
                    sliding_window=8, sliding_window_pattern=6, rope_local_base_freq=10000.0),
               [Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0]),
    "phi3": (dict(_BASE, model_type="phi3", rope_theta=10000.0, tie_word_embeddings=False), [Q.Q6_K, Q.Q4_K, Q.F32]),
}
NATIVE = [Q.Q4_0, Q.Q8_0, Q.Q4_1, Q.F16]  # what mx.load reads itself
# Byte offsets of the float16 super-block scales (d, dmin) in the K-quant blocks.
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXBATCH_HOME", str(tmp_path / "home"))  # imports land here, not in the user's cache


def _encode(x: np.ndarray, kind: Q, rng) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF data, the float32 values it stands for)."""
    if kind == Q.F32:
        return x, x
    if kind == Q.F16:
        return x.astype(np.float16), x.astype(np.float16).astype(np.float32)
    if kind not in _K_SCALES and kind != Q.Q8_K:  # gguf has numpy quantizers for these
        raw = gguf.quants.quantize(x, kind)
        return raw, gguf.quants.dequantize(raw, kind)
    # K-quants: no numpy quantizer in gguf, so random blocks with small, sane scales.
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    if kind == Q.Q8_K:  # d is float32 here: value = d * int8
        blocks[:, :4] = np.full((len(blocks), 1), 2e-3, np.float32).view(np.uint8)
        q = blocks[:, 4:260].view(np.int8).astype(np.float32)
        return raw, (2e-3 * q).reshape(x.shape)
    for off in _K_SCALES[kind]:
        blocks[:, off:off + 2] = np.full((len(blocks), 1), 4e-4, np.float16).view(np.uint8)
    return raw, gguf.quants.dequantize(raw, kind)


def _tokenizer_meta(w: gguf.GGUFWriter, spm: bool) -> None:
    if spm:  # SentencePiece: <unk>, <s>, </s>, 256 byte pieces, then pieces ranked by score
        pieces = list("abcdefgh") + ["▁", "▁a", "▁ab"] + ["".join(p) for p in itertools.product("abcdefgh", repeat=2)]
        tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces)[:VOCAB]
        types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
        w.add_tokenizer_model("llama")
        w.add_token_scores([-float(i) for i in range(len(tokens))])
    else:  # byte-level BPE: the 256 byte symbols, two specials, then merges of letter pairs
        from tokenizers.pre_tokenizers import ByteLevel

        chars = sorted(ByteLevel.alphabet())
        pairs = ["".join(p) for p in itertools.product("abcdefgh", repeat=2)][: VOCAB - 258]
        tokens, types = chars + ["<|endoftext|>", "<|im_end|>"] + pairs, [1] * 256 + [3, 3] + [1] * len(pairs)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_merges([f"{p[0]} {p[1]}" for p in pairs])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(1 if spm else 256)
    w.add_eos_token_id(2 if spm else 257)


def _metadata(w: gguf.GGUFWriter, arch: str, cfg: dict) -> None:
    u32 = lambda key, v: w.add_uint32(f"{arch}.{key}", v)  # noqa: E731
    u32("embedding_length", cfg["hidden_size"])
    u32("block_count", cfg["num_hidden_layers"])
    u32("feed_forward_length", cfg["intermediate_size"])
    u32("attention.head_count", cfg["num_attention_heads"])
    u32("attention.head_count_kv", cfg["num_key_value_heads"])
    u32("context_length", cfg["max_position_embeddings"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_float32(f"{arch}.rope.freq_base", cfg["rope_theta"])
    if "head_dim" in cfg:
        u32("attention.key_length", cfg["head_dim"])
        u32("attention.value_length", cfg["head_dim"])
    if "sliding_window" in cfg:
        u32("attention.sliding_window", cfg["sliding_window"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if key in cfg:
            w.add_float32(f"{arch}.{key}", cfg[key])
    if arch == "phi3":
        u32("rope.dimension_count", cfg["hidden_size"] // cfg["num_attention_heads"])


def write_model(path, arch: str, kinds: list, *, seed: int = 0):
    """A random mlx-lm model written as llama.cpp would; returns the model holding the
    values the file stands for (dequantized), which an import must reproduce."""
    from mlx_lm.utils import _get_classes

    cfg, spec = CASES[arch][0], gguf_arch.ARCHITECTURES[arch]
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(cfg))
    rng, cycle = np.random.default_rng(seed), itertools.cycle(kinds)
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, arch, cfg)
    _tokenizer_meta(w, spm=arch in ("llama", "gemma2", "gemma3", "phi3"))
    ref = {}
    for hf, p in tree_flatten(model.parameters()):
        x = np.array(p, dtype=np.float32)
        if x.ndim == 1:  # norms and biases stay F32, as llama.cpp writes them
            x = ((1.0 if "norm" in hf else 0.0) + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)
            raw, value, kind = x + spec.norm_offset * ("norm" in hf), x, None
        else:
            kind = next(cycle)
            x = (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
            raw, value = _encode(x, kind, rng)
        ref[hf] = value
        if spec.permute_qk and ".q_proj." in hf:
            raw = permute(raw, cfg["num_attention_heads"])
        elif spec.permute_qk and ".k_proj." in hf:
            raw = permute(raw, cfg["num_key_value_heads"])
        w.add_tensor(gguf_name(hf, spec), raw, raw_dtype=kind if kind not in (None, Q.F32, Q.F16) else None)
    if "rope_scaling" in cfg:  # llama.cpp writes Llama 3's rope scaling as a factor table
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        w.add_tensor("rope_freqs.weight", np.array(gguf_arch.llama3_factors(head_dim, cfg["rope_theta"], 8.0),
                                                   dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model.load_weights([(k, mx.array(v)) for k, v in ref.items()])
    return model


def _logits(model, seed=1):
    tokens = mx.array(np.random.default_rng(seed).integers(3, VOCAB, (2, 24)))
    return model(tokens).astype(mx.float32)


@pytest.mark.parametrize("arch", list(CASES))
def test_architecture_round_trip(tmp_path, arch):
    """Every architecture, with at least one K-quant: the import reproduces mlx-lm's logits
    for the file's (dequantized) weights up to float32 rounding."""
    path = tmp_path / f"{arch}.gguf"
    ref = write_model(path, arch, CASES[arch][1])
    lm = models.load(str(path), dtype="fp32")
    assert type(lm.model).__module__ == type(ref).__module__
    a, b = _logits(lm.model), _logits(ref)
    assert mx.abs(a - b).max().item() < 1e-3 * max(1.0, mx.abs(b).max().item())
    text = "ab ba 12 🚀 café"
    assert lm.tokenizer.decode(lm.tokenizer.encode(text, add_special_tokens=False)) == text
    info = json.loads((lm.path / "mlxbatch.json").read_text())
    assert info["architecture"] == arch and set(info["tensor_types"]) >= {k.name for k in CASES[arch][1]}


def test_native_types_take_mx_load_and_stay_quantized(tmp_path):
    """A file of only mx.load's types is read by MLX itself (quantized triples kept)."""
    path = tmp_path / "native.gguf"
    ref = write_model(path, "qwen2", NATIVE)
    folder = models.import_gguf(path, dtype="fp32")
    info = json.loads((folder / "mlxbatch.json").read_text())
    assert info["storage"] == "native" and "mx.load" in info["conversion"]["Q4_0"]
    assert "quantization" in json.loads((folder / "config.json").read_text())
    lm = models.load(str(path), dtype="fp32")
    a, b = _logits(lm.model), _logits(ref)
    # MLX keeps scales and biases in float16, so its weights are float16-rounded: ~1e-3 relative.
    assert mx.abs(a - b).max().item() < 1e-2 * max(1.0, mx.abs(b).max().item())


@pytest.mark.parametrize("dtype,stored", [("bf16", "bfloat16"), ("q4", "uint32")])
def test_dequantized_tensors_stored_per_dtype(tmp_path, dtype, stored):
    path = tmp_path / "g.gguf"
    write_model(path, "gemma3", [Q.Q4_K])
    folder = models.import_gguf(path, dtype=dtype)
    assert folder.name.endswith(f"-{dtype}")
    weights = mx.load(str(folder / "model.safetensors"))
    assert str(weights["model.layers.0.mlp.up_proj.weight"].dtype).endswith(stored)


def test_conversion_is_deterministic(tmp_path):
    from mlxbatch.models import gguf as mgguf

    path = tmp_path / "d.gguf"
    write_model(path, "llama", [Q.Q4_K, Q.Q5_0])
    for out in ("a", "b"):
        mgguf.convert_gguf(path, tmp_path / out, source_sha256="x", storage="fp32")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "mlxbatch.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_progress_callback_reaches_total(tmp_path):
    from mlxbatch.models import gguf as mgguf

    path = tmp_path / "p.gguf"
    write_model(path, "qwen3", [Q.Q6_K])
    seen = []
    mgguf.convert_gguf(path, tmp_path / "out", source_sha256="x", progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)


def _write(path, arch="llama", tensors=(), meta=()):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta:
        w.add_string(key, value)
    for name, raw, kind in tensors:
        w.add_tensor(name, raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_refusals_are_one_clear_message(tmp_path):
    iq = _write(tmp_path / "iq.gguf", tensors=[("token_embd.weight", np.zeros((4, 66), np.uint8), Q.IQ2_XXS)])
    with pytest.raises(ModelError, match=r"tensor type IQ2_XXS is not supported.*Supported: F32"):
        models.import_gguf(iq)
    f32 = ("token_embd.weight", np.zeros((4, 8), np.float32), None)
    with pytest.raises(ModelError, match=r"architecture 'mamba' is not supported \(supported: llama, qwen2"):
        models.import_gguf(_write(tmp_path / "a.gguf", "mamba", [f32]))
    bert = _write(tmp_path / "t.gguf", tensors=[f32], meta=[("tokenizer.ggml.model", "bert")])
    with pytest.raises(ModelError, match=r"tokenizer model 'bert' is not supported \(supported: gpt2, llama\)"):
        models.import_gguf(bert)
    r = cli("models", "import", iq)
    assert r.exit_code == 1 and "IQ2_XXS" in r.output and "Traceback" not in r.output


def test_models_info_shows_tensor_types_and_conversion(tmp_path):
    path = tmp_path / "info.gguf"
    write_model(path, "phi3", [Q.Q6_K, Q.F32])
    r = cli("models", "info", path, "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    assert "gguf_architecture: phi3" in r.output and "Q6_K x" in r.output
    assert "converted Q6_K: dequantized (gguf numpy) to float32" in r.output


def test_spm_merges_rank_by_piece_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    merges = gguf_tokenizer.spm_merges(tokens, [0, 0, 0, -5.0, -1.0, -2.0], [1] * 6)
    assert merges == [("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]
