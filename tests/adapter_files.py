"""Helpers for adapter tests: a tiny model folder in mlx-lm's format and random adapters beside it."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ALL_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_config(**over) -> dict:
    from mlxbatch import models

    return {**models.RANDOM_PRESETS["tiny"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, **over}


def write_model_dir(folder: Path, *, seed: int = 0, **over) -> Path:
    """config.json + model.safetensors + SmolLM2's tokenizer: a folder mlx-lm's load and trainer read."""
    from mlx_lm.utils import _get_classes

    from mlxbatch import models

    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**over)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    for f in models.random_tokenizer_dir().iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def write_adapter(folder: Path, model, *, rank: int = 4, kind: str = "lora", seed: int = 1, keys=ALL_KEYS,
                  num_layers: int = -1, scale: float = 10.0, name: str = "adapters.safetensors") -> Path:
    """A random adapter as mlx_lm.lora writes it (B not zero, so it changes the outputs)."""
    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    layers = model.model.layers
    chosen = range(len(layers))[-max(num_layers, 0):]
    weights = {}
    for i in chosen:
        modules = dict(layers[i].named_modules())
        for key in keys:
            out_dims, in_dims = modules[key].weight.shape
            p = f"model.layers.{i}.{key}"
            weights[p + ".lora_a"] = mx.random.uniform(-0.3, 0.3, (in_dims, rank))
            weights[p + ".lora_b"] = mx.random.normal((rank, out_dims)) * 0.05
            if kind == "dora":
                norms = mx.linalg.norm(modules[key].weight, axis=1)
                weights[p + ".m"] = norms * (1 + 0.2 * mx.random.uniform(-1, 1, norms.shape))
    mx.save_safetensors(str(folder / name), weights)
    config = {"fine_tune_type": kind, "num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
