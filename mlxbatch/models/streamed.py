"""Loading a model under a memory cap: resident where it fits, layers streamed where it does not.

Owns: the cap (`--max-memory-gb`, or a default from the machine: Metal's recommended working set,
else 90% of memory), the model's sizes read off a lazy copy (weights mapped by `mx.load`, never
read), the plan (engine/offload.py) and, when it streams, a model whose resident weights are read
once and whose streamed layers read theirs every pass (engine/streaming.py). `random:` presets
stream from a safetensors folder written once into the model cache, one shard per layer, from the
same seeded weights (so outputs and the manifest's weights hash equal the resident run's).
Does not own: the resident load (models/__init__.py `load`), running the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxbatch.engine.offload import ModelSizes, OffloadPlan
from mlxbatch.engine.streaming import Streamer, Tensor, install, measure_bandwidth
from mlxbatch.errors import UsageError

DEFAULT_CAP_SHARE = 0.9  # of the machine's memory, where the device gives no working-set size
PLANNED_PROMPT_TOKENS = 256  # a row's prompt, as the plan assumes it (its KV: prompt + max_tokens)
FORMAT = "mlxbatch streamed random v1"


@dataclass
class Offload:
    """A loaded model's plan and its streamer (None when nothing streams)."""

    plan: OffloadPlan
    streamer: Streamer | None = None
    files: tuple = ()


def default_cap_bytes() -> int:
    info = mx.device_info()
    if info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"])
    total = info.get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * DEFAULT_CAP_SHARE)


def load(spec) -> object | None:
    """The job's model under its cap: None where it loads as today (fits, and no cap was given),
    else a LoadedModel carrying its Offload (tokenizer, EOS ids and weights hash as models.load's)."""
    from mlxbatch import models

    explicit = spec.max_memory_gb is not None
    if not explicit and spec.model.startswith("random:"):
        return None  # a random preset is written to disk to stream only when a cap is asked for
    dtype = models.resolve_dtype(spec.dtype)
    folder, config = _source(spec.model, dtype)
    if config is None:
        if explicit:
            raise UsageError(f"--max-memory-gb: {spec.model} has no safetensors that can be memory-mapped "
                             "(a folder of model*.safetensors that this loader reads as stored)")
        return None
    plan, model, weights = _plan(spec, folder, config, dtype, explicit=explicit)
    if plan is None or not plan.streamed and not explicit:
        return None
    if not plan.streamed:
        lm = models.load(spec.model, dtype=spec.dtype, ignore_eos=spec.ignore_eos)
        lm.offload = Offload(plan)
        return lm
    if folder is None or weights is None:
        folder = materialize_random(spec.model, dtype)
        model, weights = _lazy_model(folder, config)
    streamer, files = _stream(model, weights, plan.streamed, dtype, folder)
    plan = plan.with_bandwidth(measure_bandwidth(streamer))
    print(f"mlxbatch: {plan.describe()}", file=sys.stderr, flush=True)
    lm = models.load(spec.model, dtype=spec.dtype, ignore_eos=spec.ignore_eos, weights=False)
    lm.model = model
    lm.offload = Offload(plan, streamer, files)
    return lm


def _plan(spec, folder: Path | None, config: dict, dtype: str, *, explicit: bool):
    """(plan, lazy model, its tensors' origins); (None, ...) where the default cap's sizing fails
    (the model then loads as today: a default must never stop a job that ran before)."""
    try:
        model, weights = _lazy_model(folder, config)
        sizes = model_sizes(model, config, _mx_dtype(dtype), kv_bits=spec.kv_bits)
        cap = int(spec.max_memory_gb * 1e9) if explicit else default_cap_bytes()
        plan = OffloadPlan.make(sizes, cap_bytes=cap, row_tokens=_row_tokens(spec, config),
                                max_batch=spec.batch_size or _default_batch(), max_prefill_tokens=_default_prefill(),
                                max_kv_bytes=int(spec.max_kv_gb * 1e9) if spec.max_kv_gb else None)
    except Exception:
        if explicit:
            raise
        return None, None, None
    return plan, model, weights


def _source(name: str, dtype: str) -> tuple[Path | None, dict | None]:
    """(folder or None for a random preset, config); (None, None) where streaming cannot apply."""
    from mlxbatch import models
    from mlxbatch.models import weights as weights_io

    if name.startswith("random:"):
        return None, models.random_config(name.split(":", 1)[1])
    folder = models.local_path(name, dtype=dtype)
    config = weights_io.load_config(folder)
    if weights_io.needs_mlx_lm(folder, config) or not list(folder.glob("model*.safetensors")):
        return None, None
    return folder, config


def _lazy_model(folder: Path | None, config: dict) -> tuple[nn.Module, dict | None]:
    """The model with lazy weights: mapped from the folder's safetensors, or (random) never drawn."""
    from mlxbatch.models import weights as weights_io

    model_cls, args_cls = weights_io.model_classes(config)
    model = model_cls(args_cls.from_dict(config))
    if folder is None:
        return model, None
    weights = {}
    for f in sorted(folder.glob("model*.safetensors")):
        weights.update({k: (v, str(f), k) for k, v in mx.load(str(f)).items()})
    arrays = {k: v[0] for k, v in weights.items()}
    if hasattr(model, "sanitize"):
        arrays = model.sanitize(arrays)
    if (quantization := config.get("quantization")) is not None:
        weights_io._quantize(model, quantization, arrays)
    model.eval()
    model.load_weights(list(arrays.items()), strict=True)
    origin = {id(v[0]): v for v in weights.values()}
    return model, {name: origin.get(id(a)) for name, a in tree_flatten(model.parameters())}


def model_sizes(model: nn.Module, config: dict, dtype, *, kv_bits: int | None = None) -> ModelSizes:
    layers = _layers(model)
    per_layer = tuple(_nbytes(layer, dtype) for layer in layers)
    total = _nbytes(model, dtype)
    item = dtype.size if dtype is not None else 2
    hidden, ffn = config.get("hidden_size", 4096), config.get("intermediate_size") or 4 * config.get("hidden_size", 4096)
    from mlxbatch.engine.arch import head_dim

    kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads") or 1
    per_elem = (kv_bits / 8 + 4 / 64) if kv_bits and kv_bits < 16 else item
    kv = int(2 * len(layers) * kv_heads * (head_dim(config) or 128) * per_elem)
    act = (8 * hidden + 3 * ffn) * max(item, 4)  # a prefill token's activations in a layer, float32 on the CPU
    logits = 4 * 4 * config.get("vocab_size", 32000)  # logits, log-softmax, sampling copies, float32
    return ModelSizes(total - sum(per_layer), per_layer, kv, act, logits)


def _nbytes(module: nn.Module, dtype) -> int:
    out = 0
    for _, a in tree_flatten(module.parameters()):
        is_float = mx.issubdtype(a.dtype, mx.floating)
        out += a.size * dtype.size if is_float and dtype is not None else a.nbytes
    return out


def _layers(model: nn.Module) -> list:
    inner = getattr(model, "model", model)
    return list(getattr(inner, "layers", None) or model.layers)


def _stream(model: nn.Module, weights: dict, streamed: tuple, dtype: str, folder: Path) -> tuple[Streamer, tuple]:
    """Streamed layers installed, the resident weights cast and read; (the streamer, the shard files)."""
    target = _mx_dtype(dtype)
    has_quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    if has_quantized and target is not None:
        raise UsageError(f"--max-memory-gb streams a quantized checkpoint as it is stored: add --dtype native "
                         f"(asked for {dtype})")
    if target is not None:
        model.set_dtype(target)  # lazy: nothing is read here
    names = {id(m): n for n, m in model.named_modules()}
    streamer = Streamer()
    for i in streamed:
        layer = _layers(model)[i]
        install(layer, streamer, _tensors(layer, names[id(layer)], weights, target))
    streaming = {names[id(_layers(model)[i])] + "." for i in streamed}
    resident = [a for n, a in tree_flatten(model.parameters()) if not any(n.startswith(p) for p in streaming)]
    mx.eval(resident)
    return streamer, tuple(sorted({v[1] for v in weights.values() if v}))


def _tensors(layer: nn.Module, prefix: str, weights: dict, target) -> list:
    out = []
    for mod_name, module in layer.named_modules():
        for name, a in module.items():
            if not isinstance(a, mx.array):
                continue
            full = ".".join(p for p in (prefix, mod_name, name) if p)
            origin = weights.get(full)
            if origin is None:
                raise UsageError(f"cannot stream {full}: the checkpoint's tensor is changed on load (renamed, "
                                 "stacked or split by the architecture's sanitize), so it cannot be read as stored")
            cast = target if mx.issubdtype(a.dtype, mx.floating) else None
            out.append(Tensor(module, name, origin[1], origin[2], cast))
    return out


def _mx_dtype(dtype: str):
    return {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}.get(dtype)


def _row_tokens(spec, config: dict) -> int:
    ctx = int(config.get("max_position_embeddings") or 2048)
    return min(ctx, spec.sampling.max_tokens + PLANNED_PROMPT_TOKENS)


def _default_batch() -> int:
    from mlxbatch.engine.core import CPU_MAX_BATCH, GPU_MAX_BATCH
    from mlxbatch.models import backend

    return CPU_MAX_BATCH if backend() == "cpu" else GPU_MAX_BATCH


def _default_prefill() -> int:
    from mlxbatch.models import backend

    return 4096 if backend() == "cpu" else 32768


def materialize_random(name: str, dtype: str) -> Path:
    """`random:<preset>` as a safetensors folder in the model cache (one shard per layer, written
    one layer at a time, so writing needs one layer's memory), the same weights as the resident load."""
    from mlxbatch import models

    preset = name.split(":", 1)[1]
    config = models.random_config(preset)
    key = hashlib.sha256(json.dumps([config, dtype, FORMAT], sort_keys=True).encode()).hexdigest()[:12]
    dest = models.models_dir() / f"random-{preset.replace(':', '-')}-{dtype}-{key}"
    if (dest / "config.json").exists():
        return dest
    return models._install_dir(lambda target: _write_random(preset, config, dtype, target), dest)


def _write_random(preset: str, config: dict, dtype: str, target: Path) -> None:
    from mlxbatch import models
    from mlxbatch.models import weights as weights_io

    target.mkdir()
    model_cls, args_cls = weights_io.model_classes(config)
    with models._seeded(0):  # as models._load_random: the same preset, the same weights
        model = model_cls(args_cls.from_dict(config))
    cast = _mx_dtype(dtype) or mx.float32  # "native": as drawn
    num_layers = len(_layers(model))
    flat = dict(tree_flatten(model.parameters()))
    del model  # `flat` holds the only references: each layer's arrays go once written
    groups = [[k for k in flat if k.startswith(f"model.layers.{i}.")] for i in range(num_layers)]
    rest = [k for k in flat if not any(k in g for g in groups)]
    for n, keys in enumerate([rest, *groups]):
        part = {k: flat[k].astype(cast) for k in keys}
        mx.eval(part)
        mx.save_safetensors(str(target / f"model-{n:05d}-of-{len(groups) + 1:05d}.safetensors"), part)
        for k in keys:
            del flat[k]
        del part
    (target / "config.json").write_text(json.dumps(config))
    tok = models.random_tokenizer_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (target / f).write_bytes((tok / f).read_bytes())
