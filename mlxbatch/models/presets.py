"""`random:<preset>` models: the presets' shapes and the config a `random:` spec names.

Owns: RANDOM_PRESETS (named architectures at their real shapes, all with SmolLM2's vocabulary so
its tokenizer fits) and `random:<preset>:<layers>`, the same shapes with their first layers only
(for smaller machines). Does not own: building or loading the model (models/__init__.py).
"""

from __future__ import annotations

from mlxbatch.errors import ModelError

_LLAMA = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 49152}
# Shapes of named architectures; all use SmolLM2's tokenizer (hence its vocab).
RANDOM_PRESETS = {
    "tiny": dict(_LLAMA, hidden_size=128, num_hidden_layers=4, intermediate_size=256,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                 tie_word_embeddings=False),  # untied: tied random weights just repeat the last token
    "smollm2-135m": dict(_LLAMA, hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-1b": dict(_LLAMA, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                     max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-8b": dict(_LLAMA, hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                     max_position_embeddings=131072, tie_word_embeddings=False),
    # Real shapes of released models (their own config.json), vocab cut to SmolLM2's.
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, num_hidden_layers=36, intermediate_size=9728,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=True, vocab_size=49152),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[],
                          norm_topk_prob=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                          max_position_embeddings=40960, tie_word_embeddings=False, vocab_size=49152),
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, num_hidden_layers=26, intermediate_size=6912,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=512, sliding_window_pattern=6, rope_theta=1_000_000.0,
                      rope_local_base_freq=10_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                      vocab_size=49152),
    "gemma3-4b": dict(model_type="gemma3_text", hidden_size=2560, num_hidden_layers=34, intermediate_size=10240,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=1024, sliding_window_pattern=6, rope_theta=1_000_000.0,
                      rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                      rms_norm_eps=1e-6, max_position_embeddings=131072, vocab_size=49152),
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden_size=2880, num_hidden_layers=24, intermediate_size=2880,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, sliding_window=128, rope_theta=150000,
                        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "original_max_position_embeddings": 4096, "truncate": False},
                        layer_types=["sliding_attention", "full_attention"] * 12, rms_norm_eps=1e-5,
                        max_position_embeddings=131072, vocab_size=49152),
    # A 14B class (Qwen2.5-14B's shapes, q/k/v biases): ~25 GB in bf16, for streaming under a cap.
    "qwen2.5-14b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=48, intermediate_size=13824,
                        num_attention_heads=40, num_key_value_heads=8, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                        max_position_embeddings=32768, tie_word_embeddings=False, vocab_size=49152),
    # mlx-lm loads model_type "mistral" with its llama class (Mistral-7B-Instruct-v0.3's shapes)
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=32768, tie_word_embeddings=False, vocab_size=49152),
}


def random_config(preset: str) -> dict:
    """The config of `random:<preset>` or `random:<preset>:<layers>` (`preset` is what follows `random:`):
    the preset's shapes, with its first <layers> layers only when a count is given."""
    name, cut, layers = preset.partition(":")
    if name not in RANDOM_PRESETS:
        raise ModelError(f"unknown random preset {name!r} (presets: {', '.join(RANDOM_PRESETS)})")
    config = dict(RANDOM_PRESETS[name])
    return _cut_layers(name, config, layers) if cut else config


def _cut_layers(name: str, config: dict, layers: str) -> dict:
    full = config["num_hidden_layers"]
    if not layers.isdigit() or not 1 <= int(layers) <= full:
        raise ModelError(f"random:{name}:{layers}: the layer count must be a whole number from 1 to {full}")
    n = int(layers)
    kinds = _layer_kinds(config)
    if set(kinds[:n]) != set(kinds):  # mlx-lm's model indexes a layer of each kind (gemma3: the 6th is global)
        least = max(kinds.index(k) for k in set(kinds)) + 1
        raise ModelError(f"random:{name}:{n} would drop its {', '.join(sorted(set(kinds) - set(kinds[:n])))} "
                         f"layers: cut it to {least} layers or more")
    config["num_hidden_layers"] = n
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:n]
    if "mlp_only_layers" in config:
        config["mlp_only_layers"] = [i for i in config["mlp_only_layers"] if i < n]
    return config


def _layer_kinds(config: dict) -> list[str]:
    """Each layer's attention kind, as the mlx-lm model decides it."""
    n = config["num_hidden_layers"]
    if "layer_types" in config:
        return list(config["layer_types"])
    if pattern := config.get("sliding_window_pattern"):
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    return ["full_attention"] * n
