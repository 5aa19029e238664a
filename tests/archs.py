"""Tiny random-weight configs of mlx-lm architectures, for the conformance suite.

Every config keeps its architecture's features (sliding windows SMALL so prompts cross them,
MoE routing, attention sinks, softcapping, MLA, hybrid state layers) at toy sizes: hidden 128,
2-4 layers, 4 heads of 32 (a head dim of 32 so 8-bit KV packs in groups of 32), vocab 512.
Models are built from mlx-lm's own classes (`Model(ModelArgs.from_dict(cfg))`) under a fixed
seed, float32, with mlx's default init (Linear fan-in scaled, Embedding N(0, 1/dims)).

`STATUS[arch]`: "supported" (the engine must match mlx-lm token for token) or "refused" (the
engine must raise a clear UsageError/ModelError naming the model type before running).
"""

from __future__ import annotations

import mlx.core as mx

VOCAB = 512
WINDOW = 8  # sliding window of every windowed architecture: prompts of 5..40 tokens cross it

_BASE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
             max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)


def _cfg(model_type, **kw):
    return dict(_BASE, model_type=model_type, **kw)


SL, FA = "sliding_attention", "full_attention"

CONFIGS: dict[str, dict] = {
    "llama": _cfg("llama"),
    # llama's ModelArgs take layer_types + sliding_window (mlx-lm builds RotatingKVCache for them).
    "llama_sliding": _cfg("llama", num_hidden_layers=4, layer_types=[SL, FA, SL, FA], sliding_window=WINDOW),
    # "mistral" is remapped to llama by mlx-lm (utils.MODEL_REMAPPING); a window of its own.
    "mistral": _cfg("mistral", num_hidden_layers=3, layer_types=[SL, SL, FA], sliding_window=WINDOW),
    "qwen2": _cfg("qwen2"),
    "qwen3": _cfg("qwen3"),
    "qwen3_moe": _cfg("qwen3_moe", num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                      mlp_only_layers=[], moe_intermediate_size=64, norm_topk_prob=True),
    "mixtral": _cfg("mixtral", num_local_experts=4, num_experts_per_tok=2),
    "phi3": _cfg("phi3", partial_rotary_factor=0.5),
    "gemma": _cfg("gemma"),  # always tied embeddings, (1 + w) norms, sqrt(hidden) embedding scale
    "gemma2": _cfg("gemma2", query_pre_attn_scalar=32, attn_logit_softcapping=20.0,
                   final_logit_softcapping=15.0),  # softcaps that bite at these weights, unsaturated
    "gemma3_text": _cfg("gemma3_text", num_hidden_layers=4, sliding_window=WINDOW, sliding_window_pattern=2,
                        query_pre_attn_scalar=32, rope_local_base_freq=10000.0, rope_theta=1e6),
    "gpt_oss": _cfg("gpt_oss", num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
                    sliding_window=WINDOW, layer_types=[SL, FA]),
    "olmo2": _cfg("olmo2"),
    "olmo3": _cfg("olmo3", num_hidden_layers=4, sliding_window=WINDOW, layer_types=[SL, SL, SL, FA]),
    "smollm3": _cfg("smollm3", num_hidden_layers=4, no_rope_layer_interval=2),  # NoPE every 2nd layer
    "glm4": _cfg("glm4", attention_bias=True, partial_rotary_factor=0.5),
    "ernie4_5": _cfg("ernie4_5", use_bias=False),
    "cohere": _cfg("cohere", layer_norm_eps=1e-5, logit_scale=0.5, use_qk_norm=True),
    "cohere2": _cfg("cohere2", num_hidden_layers=4, layer_norm_eps=1e-5, logit_scale=0.5, sliding_window=WINDOW,
                    sliding_window_pattern=2),
    "starcoder2": _cfg("starcoder2", norm_epsilon=1e-5),
    "exaone4": _cfg("exaone4", num_hidden_layers=4, rope_scaling=None, sliding_window=WINDOW,
                    sliding_window_pattern="LLLG"),
    # Mistral 3's llama-4 attention scaling grows with log(position / original_max): 16 makes it
    # change inside these prompts.
    "ministral3": _cfg("ministral3", num_hidden_layers=4, layer_types=[SL, FA, SL, FA], sliding_window=WINDOW,
                       rope_parameters={"rope_theta": 10000.0, "rope_type": "default",
                                        "llama_4_scaling_beta": 0.5, "original_max_position_embeddings": 16}),
    # MLA (compressed KV), q without lora, one dense layer then MoE with a shared expert.
    "deepseek_v3": _cfg("deepseek_v3", num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=64,
                        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=32,
                        q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
                        topk_method="noaux_tc", scoring_func="sigmoid", n_group=1, topk_group=1,
                        routed_scaling_factor=1.0, moe_layer_freq=1, first_k_dense_replace=1),
    "granite": _cfg("granite", logits_scaling=2.0, attention_multiplier=0.2, embedding_multiplier=4.0,
                    residual_multiplier=0.5, attention_bias=False, mlp_bias=False),
    # Hybrids: short-convolution / gated-delta / mamba state layers beside attention layers.
    "lfm2": _cfg("lfm2", num_hidden_layers=4, norm_eps=1e-5, conv_bias=False, conv_L_cache=3, block_dim=128,
                 block_multiple_of=32, block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False,
                 block_ff_dim=256, layer_types=["conv", FA, "conv", FA]),
    "qwen3_next": _cfg("qwen3_next", num_hidden_layers=4, full_attention_interval=2, linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=32, linear_value_head_dim=32,
                       linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                       shared_expert_intermediate_size=64, mlp_only_layers=[], moe_intermediate_size=64,
                       partial_rotary_factor=0.5, norm_topk_prob=True),
    "granitemoehybrid": _cfg("granitemoehybrid", num_hidden_layers=4, attention_bias=False, embedding_multiplier=4.0,
                             attention_multiplier=0.2, logits_scaling=2.0, residual_multiplier=0.5,
                             layer_types=["mamba", "attention", "mamba", "attention"], num_local_experts=4,
                             num_experts_per_tok=2, shared_intermediate_size=128, mamba_n_heads=8, mamba_d_head=16,
                             mamba_proj_bias=False, mamba_d_state=16, mamba_d_conv=4, mamba_n_groups=1,
                             mamba_conv_bias=True, position_embedding_type="rope", tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", n_ctx=1024, n_embd=128, n_head=4, n_layer=2, n_positions=1024,
                 layer_norm_epsilon=1e-5, vocab_size=VOCAB),
    "mamba2": dict(model_type="mamba2", num_heads=8, head_dim=32, vocab_size=VOCAB, hidden_size=128,
                   intermediate_size=256, state_size=16, num_hidden_layers=2, layer_norm_epsilon=1e-5,
                   conv_kernel=4, n_groups=1, use_bias=False, use_conv_bias=True, tie_word_embeddings=False,
                   time_step_limit=(0.0, float("inf")), time_step_rank=8),
}

# What the engine must do with each: "supported" (match mlx-lm) or "refused" (a clear error first).
STATUS: dict[str, str] = {
    "llama": "supported",
    "llama_sliding": "supported",
    "mistral": "supported",
    "qwen2": "supported",
    "qwen3": "supported",
    "qwen3_moe": "supported",
    "mixtral": "supported",
    "phi3": "supported",
    "gemma": "supported",
    "gemma2": "supported",
    "gemma3_text": "supported",
    "gpt_oss": "supported",
    "olmo2": "supported",
    "olmo3": "supported",
    "smollm3": "supported",
    "glm4": "supported",
    "ernie4_5": "supported",
    "cohere": "supported",
    "cohere2": "supported",
    "starcoder2": "supported",
    "exaone4": "supported",
    "ministral3": "supported",
    "deepseek_v3": "supported",
    "granite": "supported",
    "lfm2": "supported",  # hybrid: state layers beside attention
    "qwen3_next": "supported",  # hybrid: state layers beside attention
    "granitemoehybrid": "supported",  # hybrid: state layers beside attention
    "gpt2": "supported",
    "mamba2": "supported",  # state-space only
}
# Architectures whose layers compute attention themselves (gemma2's soft-capping, MLA's rope scores
# passed as the mask): --kv-bits is a usage error for them.
PACKED_KV_REFUSED = {"gemma2", "deepseek_v3"}

assert set(STATUS) == set(CONFIGS) and set(STATUS.values()) <= {"supported", "refused"}


# gemma2 post-norms its branches (unit scale): its embeddings, times sqrt(hidden), must be unit scale too.
EMBED_STD: dict[str, float] = {"gemma2": 128 ** -0.5}
# Tied heads see the input embedding through the residual: stronger layers make outputs depend on context.
LINEAR_GAIN: dict[str, float] = {n: 4.0 for n in ("gemma", "gemma2", "cohere", "cohere2", "lfm2")}


def _after_init(name: str, model) -> None:
    """Embeddings N(0, 1) (mlx's N(0, 1/dims) makes many of these models repeat one token, hiding
    bugs), and parameters mlx-lm initializes to constants that would hide a feature set random."""
    import mlx.nn as nn

    gain = LINEAR_GAIN.get(name, 1.0)
    for _, module in model.named_modules():
        if gain != 1.0 and isinstance(module, nn.Linear):
            module.weight = module.weight * gain
        if isinstance(module, nn.Embedding):
            module.weight = mx.random.normal(module.weight.shape) * EMBED_STD.get(name, 1.0)
        elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None \
                and module.weight.ndim == 1:
            # Gains of ones keep a tied head's logits on the input token (h . e_last): the model
            # then repeats its last token. Random gains (of mean 0, also for gemma's 1 + w) don't.
            shift = -1.0 if _adds_one(type(module)) else 0.0
            module.weight = mx.random.normal(module.weight.shape) + shift
    if name == "gpt_oss":  # attention sinks start at 0: a sink of 0 still counts, random ones test more
        for layer in model.model.layers:
            layer.self_attn.sinks = mx.random.normal(layer.self_attn.sinks.shape)


def _adds_one(cls) -> bool:
    """Whether a norm scales by (1 + weight), as gemma's do."""
    import inspect

    try:
        src = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False
    return "1.0 + self.weight" in src or "1 + self.weight" in src


def build(name: str, seed: int = 0):
    """A fresh float32 model of `name` (the same weights for the same seed, every call)."""
    from mlxbatch.models import weights as weights_io

    config = dict(CONFIGS[name])
    model_cls, args_cls = weights_io.model_classes(config)
    hi, lo = mx.random.state[0].tolist()
    mx.random.seed(seed)
    try:
        model = model_cls(args_cls.from_dict(config))
        _after_init(name, model)
    finally:
        mx.random.seed(hi << 32 | lo)  # the caller's RNG as it was
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def quantizable(group_size: int):
    """class_predicate for nn.quantize: layers whose input dim the group size divides."""
    def predicate(path, module):
        w = getattr(module, "weight", None)
        return hasattr(module, "to_quantized") and w is not None and w.shape[-1] % group_size == 0
    return predicate
