"""Model weights from a folder into an mlx-lm architecture, without mlx-lm's `utils` module.

Owns: reading config.json (+ generation_config.json's EOS ids), choosing the mlx-lm class,
loading the safetensors (`mx.load` maps them lazily; one `load_weights` and one eval, no
per-tensor Python work beyond the quantize predicate) and dequantizing. `mlx_lm.utils`
imports transformers (mlx-lm's tokenizer code), so its `load_model` is used only for the
checkpoints this module does not handle itself (custom code, AWQ/GPTQ/ModelOpt/fp8/bitnet
configs, activation quantization): `needs_mlx_lm` names them. Does not own: where the
folder comes from, the tokenizer (models/tokenizer.py), or the weight dtype choice.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

_FLOAT_TAGS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def load_config(path: Path) -> dict:
    """config.json as mlx-lm reads it: tagged non-finite floats decoded, generation_config's EOS ids win."""
    config = json.loads((path / "config.json").read_text(), object_hook=_float_tag)
    try:
        generation = json.loads((path / "generation_config.json").read_text())
    except (FileNotFoundError, ValueError):
        generation = {}
    if eos := generation.get("eos_token_id", False):
        config["eos_token_id"] = eos
    return config


def _float_tag(obj: dict):
    if set(obj) == {"__float__"} and obj["__float__"] in _FLOAT_TAGS:
        return _FLOAT_TAGS[obj["__float__"]]
    return obj


def needs_mlx_lm(path: Path, config: dict) -> str | None:
    """Why this checkpoint needs mlx-lm's own loader (which imports transformers), or None."""
    if "model_file" in config:
        return "a custom model file"
    if "quantization" not in config and ("quantization_config" in config
                                         or "quantization_config" in (config.get("text_config") or {})
                                         or (path / "hf_quant_config.json").exists()):
        return "a quantization_config checkpoint"
    if config.get("quantize_activations"):
        return "activation quantization"
    return None


@lru_cache(maxsize=1)
def _remapping() -> tuple[dict, dict]:
    """mlx-lm's model-type remapping tables, read from the installed mlx_lm/utils.py without importing it."""
    spec = importlib.util.find_spec("mlx_lm.utils")
    tree = ast.parse(Path(spec.origin).read_text())
    tables = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name)}
    def get(name):
        return ast.literal_eval(tables[name]) if name in tables else {}
    return get("MODEL_REMAPPING"), get("MODEL_ARCHITECTURE_REMAPPING")


def model_classes(config: dict):
    """The architecture module's (Model, ModelArgs), as mlx-lm's `_get_classes` picks them."""
    remap, by_arch = _remapping()
    model_type = config["model_type"]
    archs = config.get("architectures") or ()
    archs = (archs,) if isinstance(archs, str) else archs
    chosen = next((by_arch[(model_type, a)] for a in archs if (model_type, a) in by_arch), None)
    model_type = chosen or remap.get(model_type, model_type)
    try:
        arch = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError as exc:
        raise ValueError(f"Model type {model_type} not supported.") from exc
    return arch.Model, arch.ModelArgs


def load_model(path: Path, *, trust_remote_code: bool = False) -> tuple[nn.Module, dict]:
    config = load_config(path)
    if needs_mlx_lm(path, config):
        from mlx_lm.utils import load_model as mlx_lm_load_model

        return mlx_lm_load_model(path, trust_remote_code=trust_remote_code)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors found in {path}")
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))  # lazy: bytes are read at the eval below
    model_cls, args_cls = model_classes(config)
    model = model_cls(args_cls.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if (quantization := config.get("quantization")) is not None:
        _quantize(model, quantization, weights)
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model, config


def _quantize(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Quantized layers where the weights have scales; per-layer settings as mlx-lm infers them."""
    def predicate(p, m):
        if p in quantization:
            return quantization[p]
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
            return False
        params = _infer_quant(p, m, weights)
        if f"{p}.global_scale" in weights and "global_scale" in inspect.signature(m.to_quantized).parameters:
            params["global_scale"] = True
        return params

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def _infer_quant(path: str, module: nn.Module, weights: dict) -> dict:
    """mlx-lm's `infer_quant_config`: group size, bits and mode from the packed shapes."""
    scales = weights[f"{path}.scales"]
    in_dims = module.weight.shape[-1]
    group_size = in_dims // scales.shape[-1]
    bits = (weights[f"{path}.weight"].shape[-1] * 32) // in_dims
    if scales.dtype != mx.uint8:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    modes = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}
    if (bits, group_size) not in modes:
        raise ValueError(f"Cannot infer the quantization mode of {path}: {bits} bits with group size {group_size}.")
    return {"group_size": group_size, "bits": bits, "mode": modes[(bits, group_size)]}


def dequantize(model: nn.Module) -> nn.Module:
    """mlx-lm's `dequantize_model`: every quantized layer back to a float one, in place."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    layers = []
    for name, module in model.named_modules():
        bias = "bias" in module
        if isinstance(module, nn.QuantizedLinear):
            cls, kwargs = nn.Linear, {"bias": bias}
        elif isinstance(module, nn.QuantizedEmbedding):
            cls, kwargs = nn.Embedding, {}
        elif isinstance(module, QuantizedSwitchLinear):
            cls, kwargs = SwitchLinear, {"bias": bias}
        else:
            continue
        weight = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits,
                               module.mode)
        m = cls(*weight.shape[::-1], **kwargs)
        if bias:
            m.bias = module.bias
        m.weight = weight
        layers.append((name, m))
    if layers:
        model.update_modules(tree_unflatten(layers))
    return model
