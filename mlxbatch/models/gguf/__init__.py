"""GGUF import: a llama.cpp .gguf file -> an mlx-lm model folder.

Owns: reading metadata and tensors (llama.cpp's `gguf` package; `mx.load` when
MLX reads every tensor type of the file itself), dequantizing K-quants and the
other block types, storing tensors in the chosen dtype, and writing config,
weights, tokenizer and a provenance file. Architectures live in models/gguf/arch.py,
tokenizers in models/gguf/tokenizer.py. Does not own: where the folder lives or when
to convert (models/__init__.py), progress display (the caller passes a callback).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import mlx.core as mx

from mlxbatch.errors import ModelError
from mlxbatch.models.gguf import arch as gguf_arch
from mlxbatch.models.gguf import tokenizer as gguf_tokenizer

FORMAT = "mlxbatch-gguf-import v2"
# What `mx.load` reads natively (Q4_0/Q4_1/Q8_0 arrive as exact MLX affine triples).
NATIVE_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
DEQUANTIZED_TYPES = ("BF16", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")
SUPPORTED_TENSOR_TYPES = NATIVE_TYPES + DEQUANTIZED_TYPES
# Block types of about 4 bits or fewer a weight: stored 4-bit on Metal (`--dtype auto`).
_FOUR_BITISH = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
STORAGE = ("native", "fp32", "bf16", "fp16", "q4", "q8")  # models.resolve_dtype's answers
_FLOATS = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}
GROUP_SIZE = 32  # GGUF blocks hold 32 weights; mlx-lm infers bits per tensor from shapes

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class GGUFFile:
    """Metadata (plain Python values) and tensor records of one file, memory-mapped."""

    def __init__(self, path: Path):
        import gguf

        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # the reader raises bare ValueError/struct errors
            raise ModelError(f"{path}: not a readable GGUF file ({exc})") from exc
        self.path = path
        self.metadata = {k: _field_value(f) for k, f in self.reader.fields.items() if not k.startswith("GGUF.")}
        self.tensors = {t.name: t for t in self.reader.tensors}

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def is_native(self) -> bool:
        return all(t.tensor_type.name in NATIVE_TYPES for t in self.tensors.values())


def _field_value(field):
    from gguf import GGUFValueType

    def one(part, kind):
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part[0].item()

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], field.types[0])


def check_types(gf: GGUFFile) -> None:
    bad = sorted({t for t in gf.type_counts() if t not in SUPPORTED_TENSOR_TYPES})
    if bad:
        hint = " (IQ types are not supported: re-quantize to a K-quant such as Q4_K_M)" if any(
            b.startswith("IQ") for b in bad) else ""
        raise ModelError(f"{gf.path.name}: GGUF tensor type {', '.join(bad)} is not supported{hint}. "
                         f"Supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")


def dequantize(t) -> mx.array:
    """One GGUF tensor as float32, through llama.cpp's numpy dequantizers."""
    import numpy as np
    from gguf import quants

    kind = t.tensor_type.name
    if kind == "Q8_K":  # not in gguf.quants (llama.cpp only uses it for dot products): d * int8
        blocks = np.asarray(t.data).reshape(-1, 292)
        d = blocks[:, :4].copy().view(np.float32)
        q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
        shape = tuple(int(n) for n in reversed(t.shape))
        return mx.array((d * q).reshape(shape))
    return mx.array(np.ascontiguousarray(quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32))


def storage_for(kind: str, storage: str) -> str:
    """How a dequantized tensor of GGUF type `kind` is stored: a float dtype or q4/q8."""
    if storage != "native":
        return storage
    if kind in _FOUR_BITISH:
        return "q4"
    if kind in ("Q6_K", "Q8_K"):
        return "q8"
    return "fp16" if kind != "F32" else "fp32"


def _store(name: str, x: mx.array, how: str) -> dict:
    if how in ("q4", "q8") and x.ndim == 2 and x.shape[-1] % GROUP_SIZE == 0 and not name.endswith("norm.weight"):
        w, scales, biases = mx.quantize(x, group_size=GROUP_SIZE, bits=int(how[1]))
        base = name[: -len(".weight")]
        return {name: w, f"{base}.scales": scales, f"{base}.biases": biases}
    return {name: x.astype(_FLOATS.get(how, mx.float32))}


def _native_parts(native: dict, name: str) -> dict:
    base = name[: -len(".weight")]
    return {k: native[k] for k in (name, f"{base}.scales", f"{base}.biases") if k in native}


def convert_weights(gf: GGUFFile, *, storage: str = "fp32", progress: Progress | None = None) -> tuple[dict, dict]:
    """mlx-lm weights (HF names, llama.cpp's layout undone) and how each GGUF type was converted."""
    arch_name, arch = gguf_arch.arch_of(gf.metadata)
    native = mx.load(str(gf.path)) if gf.is_native else None  # MLX's own reader, exact
    total = sum(int(t.n_bytes) for t in gf.tensors.values()) or 1
    out, how, done = {}, {}, 0
    for name, t in gf.tensors.items():
        kind, done = t.tensor_type.name, done + int(t.n_bytes)
        if name in gguf_arch.ROPE_TENSORS:
            continue  # they become config values
        if native is not None:
            parts, how[kind] = _native_parts(native, name), _describe(kind, None)
        else:
            target = storage_for(kind, storage)
            parts, how[kind] = _store(name, dequantize(t), target), _describe(kind, target)
        fixed = {gguf_arch.hf_name(k, arch): gguf_arch.fix_tensor(k, v, arch, gf.metadata, arch_name)
                 for k, v in parts.items()}
        mx.eval(list(fixed.values()))  # one tensor at a time: memory stays at the output's size
        out.update(fixed)
        if progress:
            progress(done, total)
    return out, dict(sorted(how.items()))


_TARGETS = {"q4": "4-bit affine (group 32)", "q8": "8-bit affine (group 32)",
            "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _describe(kind: str, target: str | None) -> str:
    if target is None:
        return "read by mx.load" + (" as MLX affine (exact)" if kind.startswith("Q") else " as stored")
    if {"F32": "fp32", "F16": "fp16"}.get(kind) == target:
        return "kept as stored"
    verb = "cast" if kind in ("F32", "F16", "BF16") else "dequantized (gguf numpy)"
    return f"{verb} to {_TARGETS[target]}"


def _rope_tensors(gf: GGUFFile) -> dict:
    return {n: [float(v) for v in dequantize(gf.tensors[n]).reshape(-1).tolist()]
            for n in gguf_arch.ROPE_TENSORS if n in gf.tensors}


def build_config(gf: GGUFFile, weights: dict) -> dict:
    config = gguf_arch.build_config(gf.metadata, has_output="output.weight" in gf.tensors,
                                    rope_tensors=_rope_tensors(gf))
    eos = gguf_tokenizer.eos_token_ids(gf.metadata)
    if len(eos) > 1:  # end-of-turn tokens too, so generation stops where llama.cpp's does
        config["eos_token_id"] = eos
    if any(k.endswith(".scales") for k in weights):
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": 4}
    return config


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(src: Path, dest: Path, *, source_sha256: str, storage: str = "fp32",
                 progress: Progress | None = None, gf: GGUFFile | None = None) -> None:
    """Write an mlx-lm model folder for `src` into `dest` (which must not exist yet)."""
    gf = gf or GGUFFile(src)
    arch_name, _ = gguf_arch.arch_of(gf.metadata)
    check_types(gf)
    tok = gguf_tokenizer.build_tokenizer(gf.metadata)
    weights, how = convert_weights(gf, storage=storage, progress=progress)
    config = build_config(gf, weights)
    dest.mkdir(parents=True)
    # Sorted keys and fixed metadata: the same GGUF gives the same bytes.
    mx.save_safetensors(str(dest / "model.safetensors"), dict(sorted(weights.items())), metadata={"format": "mlx"})
    _write_json(dest / "config.json", config)
    tok.save(str(dest / "tokenizer.json"))
    _write_json(dest / "tokenizer_config.json",
                gguf_tokenizer.tokenizer_config(gf.metadata, context_length=config["max_position_embeddings"]))
    _write_json(dest / "mlxbatch.json", {
        "format": FORMAT, "source": src.name, "source_sha256": source_sha256, "architecture": arch_name,
        "tensor_types": gf.type_counts(), "conversion": how, "storage": "native" if gf.is_native else storage,
    })
