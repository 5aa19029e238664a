"""LoRA and DoRA adapters as mlx-lm's trainer (`mlx_lm.lora`) writes them: find, read, check.

Owns: what an `--adapter` value names (an adapter folder holding adapter_config.json and
adapters.safetensors, one `*_adapters.safetensors` checkpoint beside its adapter_config.json,
or `none` for the base model), reading the config and weights, the checks that turn a bad
adapter into a message naming the file and key before the model runs (not an adapter, a full
finetune, a rank or shape that does not match, a target the engine cannot apply), and each
adapter's sha256 for the manifest. Does not own: applying adapters (engine/lora.py) or the
`--adapter` option's syntax (job/spec.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mlxbatch.errors import ModelError

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
KINDS = ("lora", "dora")
_LEAVES = {"lora": ("lora_a", "lora_b"), "dora": ("lora_a", "lora_b", "m")}


@dataclass
class Adapter:
    """One named adapter of a job: its files, settings and (once loaded) its weights by module.

    `weights` maps a module path inside the model ("model.layers.3.self_attn.q_proj") to its
    arrays: lora_a [in, r], lora_b [r, out] and, for DoRA, m [out] (the learned row norms).
    """

    name: str
    path: Path | None  # None: the base model (`NAME=none`)
    kind: str = "base"  # "base" | "lora" | "dora"
    rank: int = 0
    scale: float = 0.0
    config_file: Path | None = None
    weights_file: Path | None = None
    sha256: str = ""  # of the weights file
    config_sha256: str = ""
    weights: dict = field(default_factory=dict, repr=False)

    @property
    def is_base(self) -> bool:
        return self.path is None

    def manifest_entry(self) -> dict:
        """What a resume must match: the files by content, and where they were read from."""
        if self.is_base:
            return {"name": self.name, "path": None}
        return {"name": self.name, "path": str(self.weights_file), "type": self.kind, "rank": self.rank,
                "scale": self.scale, "sha256": self.sha256, "config_sha256": self.config_sha256}


def _sha256(path: Path) -> str:
    from mlxbatch.models import sha256_file

    return sha256_file(path)


def files_of(path: Path) -> tuple[Path, Path]:
    """(adapter_config.json, weights file) for a folder or a checkpoint file; ModelError if neither."""
    if path.is_dir():
        config, weights = path / CONFIG, path / WEIGHTS
        if not config.is_file():
            raise ModelError(f"{path}: not an mlx-lm adapter folder (no {CONFIG}; `mlx_lm.lora --train` writes "
                             f"one beside {WEIGHTS})")
        if not weights.is_file():
            found = sorted(p.name for p in path.glob("*_adapters.safetensors"))
            hint = f"; checkpoints here: {', '.join(found[:4])} (give one as the path)" if found else ""
            raise ModelError(f"{path}: no {WEIGHTS}{hint}")
        return config, weights
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise ModelError(f"{path}: not an adapter (expected an adapter folder or a *_adapters.safetensors file)")
        config = path.parent / CONFIG
        if not config.is_file():
            raise ModelError(f"{path}: no {CONFIG} beside this checkpoint (it says the rank, scale and layers)")
        return config, path
    raise ModelError(f"{path}: no such adapter folder or file")


def read_config(config_file: Path) -> dict:
    """adapter_config.json, checked for what applying it needs."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{config_file}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: not a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise ModelError(f"{config_file}: fine_tune_type is \"full\": that is a whole model, not an adapter; "
                         "give its folder as --model")
    if kind not in KINDS:
        raise ModelError(f"{config_file}: fine_tune_type {kind!r} is not one mlxbatch applies ({', '.join(KINDS)})")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise ModelError(f"{config_file}: no lora_parameters object (rank, scale)")
    for key in ("rank", "scale"):
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 and key == "rank":
            hint = " (mlx-lm's configs use 'scale', not 'alpha')" if key == "scale" and "alpha" in params else ""
            raise ModelError(f"{config_file}: lora_parameters.{key} must be a number, got {value!r}{hint}")
    if not isinstance(params["rank"], int):
        raise ModelError(f"{config_file}: lora_parameters.rank must be an integer, got {params['rank']!r}")
    return config


def open_adapter(name: str, path: str | Path | None) -> Adapter:
    """An adapter's files found and its config checked (no weights read: the model is not loaded yet)."""
    if path is None:
        return Adapter(name, None)
    path = Path(path).expanduser()
    config_file, weights_file = files_of(path)
    config = read_config(config_file)
    params = config["lora_parameters"]
    return Adapter(name, path, config.get("fine_tune_type", "lora"), params["rank"], float(params["scale"]),
                   config_file, weights_file.resolve(), _sha256(weights_file), _sha256(config_file))


def open_all(pairs) -> list[Adapter]:
    """Every `(name, path)` of a job opened, in order (the first is a row's default)."""
    return [open_adapter(name, path) for name, path in pairs]


def load_weights(adapter: Adapter, model) -> None:
    """Read the adapter's arrays and check each against the module it targets in `model`."""
    import mlx.core as mx

    if adapter.is_base:
        return
    try:
        flat = mx.load(str(adapter.weights_file))
    except Exception as exc:
        raise ModelError(f"{adapter.weights_file}: not a readable safetensors file ({exc})") from None
    leaves = _LEAVES[adapter.kind]
    grouped: dict[str, dict] = {}
    for key, value in flat.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in leaves:
            raise ModelError(f"{adapter.weights_file}: key {key!r} is not a {adapter.kind} parameter "
                             f"(expected ...{'/'.join(leaves)}; is {CONFIG}'s fine_tune_type right?)")
        grouped.setdefault(module, {})[leaf] = value
    if not grouped:
        raise ModelError(f"{adapter.weights_file}: holds no adapter weights")
    modules = dict(model.named_modules())
    for module, arrays in grouped.items():
        _check_module(adapter, module, arrays, modules.get(module), leaves)
    adapter.weights = grouped


def _check_module(adapter: Adapter, module: str, arrays: dict, target, leaves) -> None:
    import mlx.nn as nn

    from mlxbatch.engine.lora import unwrap

    target = unwrap(target)[0]  # a model an earlier job's adapters still wrap: check its base layer
    where = f"{adapter.weights_file}: {module}"
    missing = [leaf for leaf in leaves if leaf not in arrays]
    if missing:
        raise ModelError(f"{where}: no {', '.join(missing)}")
    if target is None:
        raise ModelError(f"{where}: the model has no such module (an adapter trained for another architecture?)")
    if type(target) not in (nn.Linear, nn.QuantizedLinear):
        raise ModelError(f"{where}: a {type(target).__name__}; mlxbatch applies adapters to linear layers only")
    out_dims, in_dims = target.weight.shape
    if isinstance(target, nn.QuantizedLinear):
        in_dims = in_dims * 32 // target.bits
    a, b = arrays["lora_a"], arrays["lora_b"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ModelError(f"{where}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} are not [in, r] and [r, out]")
    if a.shape[1] != adapter.rank:
        raise ModelError(f"{where}: rank {a.shape[1]}, but {CONFIG} says lora_parameters.rank {adapter.rank}")
    if a.shape[0] != in_dims or b.shape[1] != out_dims:
        raise ModelError(f"{where}: the adapter is for a {a.shape[0]} -> {b.shape[1]} layer, the model's is "
                         f"{in_dims} -> {out_dims} (an adapter for another base model?)")
    if "m" in arrays and tuple(arrays["m"].shape) != (out_dims,):
        raise ModelError(f"{where}: DoRA m has shape {tuple(arrays['m'].shape)}, expected ({out_dims},)")


def manifest(adapters: list[Adapter]) -> list[dict]:
    return [a.manifest_entry() for a in adapters]


def digest(adapters: list[Adapter]) -> str:
    """One hash over every adapter entry (workers check they load the same)."""
    return hashlib.sha256(json.dumps(manifest(adapters), sort_keys=True).encode()).hexdigest()
