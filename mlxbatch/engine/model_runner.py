"""The model runner: owns the forward pass and every backend choice it depends on.

Owns: the choices made once when a model is loaded (how attention is computed,
whether the cache is bucketed, fused projections, the compiled decode layer,
whether rows may share a stored prefix, the job's adapters attached before
fusing and each row's adapter set per forward), running the model for hidden states
and projecting only the positions wanted, and the KV bytes per token. Choices
come from the backend (`ForwardOptions.for_backend`) and can be overridden by
argument (tests do). Does not own: which rows run (core.py) or the cache layout.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxbatch.engine import arch
from mlxbatch.engine.attention import AttendOptions
from mlxbatch.engine.fused import DecodePlan, fuse, hidden_states
from mlxbatch.engine.kvcache import BatchCache, CacheFormat, StateLayer
from mlxbatch.engine.kvquant import KVQuant, first, nbytes
from mlxbatch.engine.lora import Bank


@dataclass(frozen=True)
class ForwardOptions:
    full_buffer: bool = False  # attend over the bucketed buffer: shapes change per bucket, not per step
    one_query_matmul: bool = False  # see AttendOptions
    use_addmm: bool = False  # residuals added by the matmuls (one kernel instead of two)
    fused: bool = True  # fused q/k/v and gate/up projections (llama)
    compiled_decode: bool = True  # the compiled one-token layer (plain llama weights)
    dense_q: bool = False  # q copied dense: its score matmul is one strided batch, not a pointer array
    shared_prefix: bool = True  # rows of a group attend to one stored copy of their prefix
    min_shared_tokens: int = 32  # shorter common prefixes are copied into each row instead
    small_model_bytes: int = 0  # below it a model is bound by operations per step: it copies prefixes
    # while the copies fit the KV budget
    max_blocked_scores: int = AttendOptions.max_blocked_scores  # see AttendOptions
    adapter_mode: str = "auto"  # rows' adapter updates: dense | gather | auto (engine/lora.py)
    fuse_adapter: bool = True  # a lone adapter (no base rows) folded into float weights at load
    kv_bits: int = 0  # keys (and values) stored packed at 4 or 8 bits (kvquant.py); 0: the model dtype
    kv_value_bits: int = 0  # values at other bits than keys; 0: as keys
    kv_group_size: int = 64
    # Attention reads the packed cache with MLX's quantized matmul; False: each product dequantizes
    # its operand first. For one query a row (decode), and for prefill chunks (KV_QUANTIZED_MATMUL).
    kv_quantized_matmul: bool = True
    kv_prefill_quantized_matmul: bool = True

    @classmethod
    def for_backend(cls, backend: str, **overrides) -> "ForwardOptions":
        """Measured choices (FINDINGS.md, docs/bench): MLX's CUDA attention has no one-query
        kernel that takes a mask (it falls back to a slow batched gemv), so there one query is
        matmuls; MLX's CPU addmm is ~15x slower than a BLAS matmul plus an add; GPUs build a
        kernel plan per shape, so they attend over the bucketed buffer. On a GPU the cascade's
        extra operations per layer cost more than re-reading a short prefix (H200, parallm-325's
        ~45 shared tokens: 16.0 vs 14.5 ms a step at 8B), so only long prefixes are shared, and
        a model under 1 GB (bound by operations per step) copies even those while the copies
        fit the KV budget (SmolLM2-135M, shared-prefix: 10.4 vs 16.3 ms a step). On CUDA q is
        copied dense before its score matmul (H200 parallm-325: 1B 3.54-3.67 vs 3.71-3.82 ms a
        step, 8B 14.14 vs 14.22-14.33; SmolLM2 within its run-to-run noise either way)."""
        gpu, cuda = backend != "cpu", backend == "cuda"
        return replace(cls(full_buffer=gpu, one_query_matmul=cuda, use_addmm=cuda, dense_q=cuda,
                           kv_quantized_matmul=KV_QUANTIZED_MATMUL[backend][0],
                           kv_prefill_quantized_matmul=KV_QUANTIZED_MATMUL[backend][1],
                           min_shared_tokens=256 if gpu else 32,
                           small_model_bytes=10**9 if cuda else 0), **overrides)

    @property
    def attend(self) -> AttendOptions:
        return AttendOptions(one_query_matmul=self.one_query_matmul,
                             compiled=self.full_buffer and self.compiled_decode,
                             max_blocked_scores=self.max_blocked_scores, kv=self.kv)

    @property
    def kv(self) -> KVQuant | None:
        if not self.kv_bits:
            return None
        return KVQuant(self.kv_bits, self.kv_value_bits or self.kv_bits, self.kv_group_size,
                       self.kv_quantized_matmul, self.kv_prefill_quantized_matmul)


# Per backend, (decode, prefill): read the packed KV with quantized_matmul (True) or dequantize each
# operand, then matmul (False). CPU (scripts/kv_attention_probe.py, 64 rows x 512 columns, SmolLM2
# heads, fp32; a loaded 2-core host): decode 81 ms quantized_matmul vs 305 dequantize (8-bit), a
# 64-query prefill chunk 6.9 s vs 1.0 s. Metal and CUDA keep MLX's quantized kernels (mlx-lm's
# choice) until scripts/gpu/kv.sh's probe says otherwise.
KV_QUANTIZED_MATMUL = {"cpu": (True, False), "metal": (True, True), "cuda": (True, True)}


def env_overrides() -> dict:
    """Choices from MLXBATCH_FORWARD (e.g. "dense_q=1,min_shared_tokens=32"), so a backend's
    variants can be measured (or tuned on a machine nobody here has) without code changes."""
    text = os.environ.get("MLXBATCH_FORWARD", "").strip()
    if not text:
        return {}
    types = {f.name: type(f.default) for f in fields(ForwardOptions)}
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in types:
            raise ValueError(f"MLXBATCH_FORWARD: unknown choice {name!r} (choices: {', '.join(types)})")
        out[name] = value.strip().lower() in ("1", "true", "yes") if types[name] is bool else types[name](value)
    return out


def default_options() -> ForwardOptions:
    """This backend's measured choices, with MLXBATCH_FORWARD's overrides."""
    return ForwardOptions.for_backend(device_backend(), **env_overrides())


def device_backend() -> str:
    """Which backend runs arrays by default: 'metal', 'cuda' or 'cpu'."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda" if mx.cuda.is_available() else "cpu"


class ModelRunner:
    """Runs one model over a BatchCache; built once per engine."""

    def __init__(self, model: nn.Module, options: ForwardOptions | None = None, adapters: list | None = None):
        self.model = model
        self.options = options or default_options()
        self.adapters = adapters
        self.bank = None
        if adapters:  # before fusing: fused q/k/v and gate/up take the wrapped layers' updates along
            self.bank = Bank(model, adapters, mode=self.options.adapter_mode)
            self.bank.attach(fuse_single=self.options.fuse_adapter)
        self.family = arch.family(model)
        arch.check(model, self.options.kv)  # refuses, by model type, what the engine cannot batch
        windows = arch.layer_windows(model)
        self.is_fast_head = self.family.fast_head and hasattr(model, "model")
        self.routes_attention = arch.routes_attention(model)
        if self.routes_attention:
            arch.install(model)
        self.fused = fuse(model) if self.options.fused else None
        self.weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        self.is_small = self.weight_bytes < self.options.small_model_bytes
        self.plan = (DecodePlan.build(model, self.fused, self.options.attend, bucketed=self.options.full_buffer,
                                      use_addmm=self.options.use_addmm, dense_q=self.options.dense_q)
                     if self.options.compiled_decode else None)
        # A state layer's convolution window would slide over pads in the middle of a row (after a
        # copied prefix, before a shorter suffix): such models compute whole prompts, left-padded,
        # unless a unit's suffixes have one length (no pads: core.Engine._reuses_prefix).
        self.has_state = any(isinstance(w, StateLayer) for w in windows)
        # Cascade attention: in our own layer loop, or through mlx-lm's attention call (sliding-window
        # layers mask the shared prefix per row); a state cannot be stored once for a group.
        self.can_share_prefix = (self.options.shared_prefix and (self.fused is not None or self.routes_attention)
                                 and not self.has_state)
        self.can_reuse_prefix = not self.has_state
        self.num_layers = len(windows)
        self.cache_format = CacheFormat(windows, full_buffer=self.options.full_buffer, kv=self.options.kv,
                                        attend=self.options.attend, mask_per_kv_head=self.family.mask_per_kv_head)
        self._kv_bytes, self._state_bytes = self._measure_kv_bytes()

    def describe(self) -> str:
        """One line for the log: what runs and why."""
        unused = {"fused": self.fused is None, "compiled_decode": self.plan is None,
                  "shared_prefix": not self.can_share_prefix}  # asked for, but this family does not get it
        on = [k for k, v in asdict(self.options).items() if v is True and not k.startswith("kv_") and not unused.get(k)]
        on = [f"{k} (from {self.options.min_shared_tokens} tokens)" if k == "shared_prefix" else k for k in on]
        path = "compiled decode" if self.plan else "fused layers" if self.fused else "mlx-lm layers"
        path += f" ({arch.module_name(self.model)}" + (", the engine attends" if self.routes_attention else "") + ")"
        kv = self.options.kv
        form = lambda qmm: "quantized_matmul" if qmm else "dequantize"  # noqa: E731
        packed = (f"; KV {kv.describe()}, read by {form(kv.quantized_matmul)} (decode), "
                  f"{form(kv.prefill_quantized_matmul)} (prefill)") if kv else ""
        return f"forward: {path}; " + ", ".join(on) + (f"; {self.bank.describe()}" if self.bank else "") + packed

    def close(self) -> None:
        """Give the model back as it was loaded (adapter wrappers removed, fused adapter weights restored)."""
        if self.bank is not None:
            self.bank.detach()
            self.bank = None

    def _begin(self, tokens: mx.array, adapters: list[int] | None) -> None:
        """Each row's adapter for this forward (the job's first when not given); only a per-row bank
        reads them: a fused lone adapter is already in the weights."""
        if self.bank is not None and not self.bank.is_fused:
            self.bank.begin(adapters if adapters is not None else [0] * tokens.shape[0])

    def new_cache(self, batch: int) -> BatchCache:
        return BatchCache(self.cache_format, batch)

    def kv_bytes_per_token(self) -> int:
        return self._kv_bytes

    def state_bytes_per_row(self) -> int:
        """Bytes a row's state layers hold, whatever its length."""
        return self._state_bytes

    def _measure_kv_bytes(self) -> tuple[int, int]:
        """(bytes one token adds to a row's cache, bytes of a row's states), read off a one-token
        forward: every architecture's layers say for themselves what they store (heads, head sizes,
        MLA's compressed keys, packing, state shapes)."""
        cache = self.new_cache(1)
        cache.layout.begin(mx.ones((1, 1), dtype=mx.bool_))
        self.forward_hidden(mx.zeros((1, 1), dtype=mx.int32), cache)
        per_token = sum((nbytes(c.keys) + nbytes(c.values)) // first(c.keys).shape[2]
                        for c in cache.kv_layers if c.keys is not None)
        return int(per_token), int(sum(c.nbytes for c in cache.state_layers))

    def _hidden(self, tokens: mx.array, cache: BatchCache) -> mx.array:
        if self.fused is not None:
            return hidden_states(self.model, tokens, cache.layers, self.fused, opts=self.options.attend,
                                 plan=self.plan)
        return self.model.model(tokens, cache=cache.layers)

    def forward_last(self, tokens: mx.array, cache: BatchCache, adapters: list[int] | None = None) -> mx.array:
        """Logits [B, vocab] of the last column only, advancing the cache by the input width.

        The caller has already declared the new columns' validity with `layout.begin`;
        `adapters`: each row's adapter index (engine/lora.py) where the model has adapters.
        """
        self._begin(tokens, adapters)
        if self.is_fast_head:
            h = self._hidden(tokens, cache)[:, -1, :]
            m = self.model
            logits = m.lm_head(h) if hasattr(m, "lm_head") else m.model.embed_tokens.as_linear(h)
        else:  # other architectures: the full call (projects every position)
            logits = self.model(tokens, cache=cache.layers)[:, -1, :]
        cache.layout.end(tokens.shape[1])
        if self.bank is not None:
            self.bank.end()
        return logits

    def forward_hidden(self, tokens: mx.array, cache: BatchCache, adapters: list[int] | None = None) -> None:
        """Fill the cache for `tokens` without projecting any logits (prefill chunks)."""
        self._begin(tokens, adapters)
        out = self._hidden(tokens, cache) if self.is_fast_head else self.model(tokens, cache=cache.layers)
        cache.layout.end(tokens.shape[1])
        if self.bank is not None:
            self.bank.end()
        mx.eval(out, *cache.arrays())  # bound the lazy graph between chunks
