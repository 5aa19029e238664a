"""Models: the embedded default, GGUF import, tokenizer fidelity, presets, dtype."""

import gzip
import json
import re

import jinja2
import jinja2.sandbox
import mlx.core as mx
import pytest
from conftest import cli, write_jsonl
from gguf_names import gguf_name, permute

from mlxbatch import models
from mlxbatch.errors import ModelError
from mlxbatch.models import gguf
from mlxbatch.models.gguf import arch as gguf_arch

CORPUS = [
    "Hello, world! 12345 and 3.14159 or 2026-11-21.",
    "Unicode: café, naïve, 東京, Ελληνικά, русский, עברית.",
    "Emoji: 🚀🔥👍🏽 family: 👨‍👩‍👧‍👦 flags 🇫🇷",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "def f(x):\n    return x ** 2  # code",
]


def test_random_tiny_loads_and_ignores_eos(tiny):
    assert tiny.is_random and tiny.eos_token_ids == set() and tiny.dtype == "fp32"
    assert tiny.model.args.hidden_size <= 128


def test_unknown_model_and_preset():
    with pytest.raises(ModelError, match="unknown random preset"):
        models.load("random:nope")
    with pytest.raises(ModelError, match="unknown model"):
        models.local_path("definitely/not/a/thing.bin")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, offline: nothing here may reach the network."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", str(tmp_path / "hf")), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    # huggingface_hub reads these once at import, which an earlier test may have done
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_repo(cache, repo: str, sha: str = "0123456789abcdef0123456789abcdef01234567"):
    """A repo as snapshot_download leaves it: models--org--name/snapshots/<sha>/ and refs/main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(sha)
    return snapshot


@pytest.mark.parametrize("repo", ["org/Name-1.5B-4bit", "mlx-community/Llama-3.2-3B-Instruct-4bit",
                                  "mlx-community/Qwen3-0.6B-4bit"])
def test_hub_id_with_dots_resolves_from_the_cache_offline(offline_hub, repo):
    snapshot = _cache_repo(offline_hub, repo)
    assert models.local_path(repo) == snapshot


def test_hub_id_not_cached_offline_names_the_repo_and_says_why(offline_hub):
    with pytest.raises(ModelError, match=r"'org/Missing-1.5B-4bit'.*offline \(HF_HUB_OFFLINE=1\) and not in the "
                                         r"Hugging Face cache"):
        models.local_path("org/Missing-1.5B-4bit")


def test_hub_errors_say_not_found_gated_or_unauthorized():
    from types import SimpleNamespace

    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    from mlxbatch.models.hub import fetch_error

    response = SimpleNamespace(status_code=401, headers={}, request=None)
    for exc, says in ((RepositoryNotFoundError("404", response=response), "no such repo"),
                      (GatedRepoError("403", response=response), "the repo is gated"),
                      (HfHubHTTPError("401", response=response), "unauthorized")):
        message = str(fetch_error("org/Name-1.5B", exc))
        assert "'org/Name-1.5B'" in message and says in message, message


def test_dtype_auto_per_backend():
    assert models.resolve_dtype("auto") == {"cpu": "fp32", "cuda": "bf16", "metal": "native"}[models.backend()]


def test_unsupported_gguf_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "fake.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 4))},
                 {"general.architecture": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "c", "d"]})
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported"):
        models.import_gguf(path)


@pytest.mark.realmodel
def test_default_model_answers_paris(smol):
    from mlx_lm import generate

    prompt = smol.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True)
    assert "Paris" in generate(smol.model, smol.tokenizer, prompt, max_tokens=20)


@pytest.mark.realmodel
def test_default_model_via_cli_answers_paris(tmp_path, smol):
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"id": "q", "prompt": "What is the capital of France?"}) + "\n")
    res = cli("run", src, "-o", tmp_path / "o", "--max-tokens", "20", "-q")
    assert res.exit_code == 0, res.output
    assert "Paris" in json.loads((tmp_path / "o" / "results.jsonl").read_text())["output"]


@pytest.mark.realmodel
@pytest.mark.slow
def test_second_load_does_not_convert_and_conversion_is_deterministic(smol, tmp_path):
    folder = models.pull("smollm2-135m")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.pull("smollm2-135m") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    src = tmp_path / "m.gguf"
    spec = models.BUILTINS["smollm2-135m"]
    src = models._download_builtin(spec, tmp_path)
    gguf.convert_gguf(src, tmp_path / "a", source_sha256="x")
    gguf.convert_gguf(src, tmp_path / "b", source_sha256="x")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / name).read_bytes() == (folder / name).read_bytes(), name


@pytest.mark.realmodel
def test_tokenizer_round_trip_and_matches_shipped_asset(smol):
    tok = smol.tokenizer
    for text in CORPUS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("2026", add_special_tokens=False) == [tok.encode(d, add_special_tokens=False)[0] for d in "2026"]
    asset = json.loads(gzip.decompress((models.Path(models.__file__).parents[1] / "assets" / "smollm2-tokenizer.json.gz").read_bytes()))
    folder = models.pull("smollm2-135m")
    assert json.loads(asset["tokenizer.json"]) == json.loads((folder / "tokenizer.json").read_text())


@pytest.mark.realmodel
def test_chat_template_equals_gguf_rendering(smol):
    folder = models.pull("smollm2-135m")
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    for msgs in (messages, messages[1:2]):
        ours = smol.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        ref = env.from_string(template).render(messages=msgs, add_generation_prompt=True,
                                               bos_token="<|im_start|>", eos_token="<|im_end|>")
        assert ours == ref


def test_models_cli_list_and_info():
    r = cli("models", "list")
    assert r.exit_code == 0 and "random:tiny" in r.output
    r = cli("models", "info", "random:tiny")
    assert r.exit_code == 0 and "hidden_size: 128" in r.output


# The fewest layers that keep every attention kind (gemma3: the 6th layer is its first global one).
REAL_SHAPE_PRESETS = {"qwen3-4b": ("qwen3", 2), "qwen3-30b-a3b": ("qwen3_moe", 2), "gemma3-1b": ("gemma3_text", 6),
                      "gemma3-4b": ("gemma3_text", 6), "gpt-oss-20b": ("gpt_oss", 2), "mistral-7b": ("llama", 2)}


@pytest.mark.parametrize("preset", REAL_SHAPE_PRESETS)
def test_real_shape_presets_build_their_mlx_lm_model_class_when_cut(preset):
    """Built lazily (no weights are drawn): the full-size models are GBs."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlxbatch.models.weights import model_classes

    module, layers = REAL_SHAPE_PRESETS[preset]
    full = models.RANDOM_PRESETS[preset]
    config = models.random_config(f"{preset}:{layers}")
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == layers
    assert {k: v for k, v in config.items() if k not in ("num_hidden_layers", "layer_types")} == \
        {k: v for k, v in full.items() if k not in ("num_hidden_layers", "layer_types")}
    model_cls, args_cls = model_classes(config)
    assert model_cls.__module__ == f"mlx_lm.models.{module}"
    model = model_cls(args_cls.from_dict(config))
    assert len(model.layers) == layers and len(make_prompt_cache(model)) == layers


def test_gpt_oss_cut_keeps_its_alternating_layer_types():
    assert models.RANDOM_PRESETS["gpt-oss-20b"]["layer_types"][:4] == ["sliding_attention", "full_attention"] * 2
    assert models.random_config("gpt-oss-20b:3")["layer_types"] == ["sliding_attention", "full_attention",
                                                                     "sliding_attention"]
    assert models.random_config("gpt-oss-20b") == models.RANDOM_PRESETS["gpt-oss-20b"]


@pytest.mark.parametrize("spec,message", [
    ("nope:2", "unknown random preset 'nope'"),
    ("qwen3-4b:0", "from 1 to 36"), ("qwen3-4b:x", "from 1 to 36"), ("qwen3-4b:37", "from 1 to 36"),
    ("qwen3-4b:", "from 1 to 36"),
    ("gemma3-1b:5", "would drop its full_attention layers: cut it to 6 layers or more"),
    ("gpt-oss-20b:1", "would drop its full_attention layers: cut it to 2 layers or more"),
])
def test_bad_preset_or_layer_count_is_a_model_error(spec, message):
    with pytest.raises(ModelError, match=re.escape(message)):
        models.random_config(spec)


@pytest.mark.slow
def test_a_cut_real_shape_preset_runs_a_job_through_the_cli(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Row {i}"}) + "\n" for i in range(2)))
    res = cli("run", src, "-o", tmp_path / "o", "--model", "random:qwen3-4b:2", "--max-tokens", "4", "-q")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["r0", "r1"]
    info = cli("models", "info", "random:qwen3-4b:2")
    assert info.exit_code == 0 and "num_hidden_layers: 2" in info.output and "hidden_size: 2560" in info.output
    bad = cli("run", src, "-o", tmp_path / "bad", "--model", "random:qwen3-4b:99", "-q")
    assert bad.exit_code == 1 and "from 1 to 36" in bad.output, bad.output


@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
@pytest.mark.slow
def test_gguf_round_trip_float_tensors(tmp_path, tiny, dtype):
    """random:tiny written as a llama.cpp-style GGUF (F16/F32), imported back: same logits."""
    from mlx.utils import tree_flatten

    args = tiny.model.args
    tensors = {}
    for name, w in tree_flatten(tiny.model.parameters()):
        if ".q_proj." in name:
            w = permute(w, args.num_attention_heads)
        elif ".k_proj." in name:
            w = permute(w, args.num_key_value_heads)
        tensors[gguf_name(name, gguf_arch.ARCHITECTURES["llama"])] = w.astype(dtype)
    tj = json.loads((models.random_tokenizer_dir() / "tokenizer.json").read_text())
    tc = json.loads((models.random_tokenizer_dir() / "tokenizer_config.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tj["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": "llama", "llama.embedding_length": u32(args.hidden_size),
        "llama.block_count": u32(args.num_hidden_layers), "llama.feed_forward_length": u32(args.intermediate_size),
        "llama.attention.head_count": u32(args.num_attention_heads),
        "llama.attention.head_count_kv": u32(args.num_key_value_heads),
        "llama.attention.layer_norm_rms_epsilon": mx.array(args.rms_norm_eps, dtype=mx.float32),
        "llama.rope.freq_base": mx.array(args.rope_theta, dtype=mx.float32), "llama.context_length": u32(8192),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": [t for t, _ in vocab], "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3 if t in special else 1 for t, _ in vocab], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1), "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.chat_template": tc["chat_template"],
    }
    path = tmp_path / "tiny.gguf"
    mx.save_gguf(str(path), tensors, meta)
    lm = models.load(str(path), dtype="fp32")
    assert lm.tokenizer.encode("Hello 2026 🚀") == tiny.tokenizer.encode("Hello 2026 🚀")
    tokens = mx.array([tiny.tokenizer.encode("The lighthouse keeper counted 42 ships.")])
    tol = 1e-4 if dtype == mx.float32 else 5e-2
    assert mx.allclose(lm.model(tokens), tiny.model(tokens), atol=tol, rtol=tol).item()


@pytest.mark.parametrize("preset", ["mistral-7b", "qwen3-4b", "qwen3-30b-a3b", "gemma3-1b", "gemma3-4b", "gpt-oss-20b"])
def test_random_presets_at_real_shapes_build_and_are_supported(preset):
    """Each benchmark preset builds mlx-lm's class (lazy weights: nothing is computed) and passes the
    architecture check `mlxbatch run` makes before loading; `NAME:LAYERS` cuts the depth."""
    from mlxbatch.engine import arch

    config = models.random_config(preset)
    arch.check_config(config)
    cut = models.random_config(f"{preset}:6")
    assert cut["num_hidden_layers"] == 6 and len(cut.get("layer_types", [None] * 6)) == 6
    with pytest.raises(models.ModelError, match="layer count"):
        models.random_config(f"{preset}:0")


def test_an_architecture_the_engine_cannot_batch_is_a_usage_error_before_the_job_starts(tmp_path):
    """Baichuan-M1 keeps a CacheList (a convolution state and a KV cache) per layer: refused by
    model type from its config alone, exit 2, before any weights load or any output is written."""
    folder = tmp_path / "baichuan"
    folder.mkdir()
    config = dict(model_type="baichuan_m1", vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                  sliding_window=8, sliding_window_layers=[0], conv_window=2, rms_norm_eps=1e-5)
    (folder / "config.json").write_text(json.dumps(config))  # no weights: they must never be read
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    res = cli("run", str(src), "-o", str(tmp_path / "out"), "--model", str(folder), "-q")
    assert res.exit_code == 2, res.output
    assert "'baichuan_m1' is not supported yet" in res.output and "CacheList" in res.output
    assert not (tmp_path / "out").exists()
