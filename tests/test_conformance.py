"""Conformance: the engine's greedy tokens equal mlx-lm's, token for token, on every architecture.

Each architecture of `archs.CONFIGS` is a tiny random-weight model built from mlx-lm's own classes
(float32, vocab 512, token ids fed directly). The reference is mlx-lm's model run ONE ROW AT A
TIME: prefill the whole prompt, then one token a step, greedy argmax, with its own cache:

    reference cache                           families
    ----------------------------------------  -------------------------------------------------
    mlx-lm's make_prompt_cache(model):        every architecture (llama, mistral, qwen2/3,
      KVCache per layer, or the model's own     qwen3_moe, mixtral, phi3, gemma, gemma2, olmo2,
      make_cache() (RotatingKVCache on          smollm3, glm4, ernie4_5, cohere, starcoder2,
      sliding layers, ArraysCache/MambaCache    deepseek_v3, granite, gpt2; windowed: llama with
      on state layers)                          layer_types, gemma3_text, gpt_oss, olmo3,
                                                cohere2, exaone4, ministral3; hybrids/SSM: lfm2,
                                                qwen3_next, granitemoehybrid, mamba2)
    KVCache on every attention layer + the     cross-check only (test_rotating_reference_agrees):
      window mask the model passes            for each windowed architecture the rotating
      (create_attention_mask(window_size=W))  reference must equal this one, so mlx-lm's
                                                RotatingKVCache is trusted as the reference

Scenarios (architecture x scenario; nothing is xfail: a failure is a real gap):
  mixed[-bucketed]   6 prompts of 5..40 tokens (the window is 8) in one batch: padding/gaps
  prefix[-bucketed]  5 rows = 40 shared tokens + suffixes of 1..17: the prefix may be stored once
  joining[-bucketed] 8 requests of 3..40 tokens, max_tokens 4..12, max_batch 3, prefill chunks
                     of 16: rows finish and others join a running batch
  q4, q8             4- and 8-bit weights (nn.quantize, group 32, layers whose input dim 32 divides), the
                     reference quantized identically; `mixed` prompts
  kv8                --kv-bits 8: runs to the end (every row max_tokens tokens) and agrees with the
                     same engine's float KV on at least 3/4 of all generated tokens, counting each
                     row's common prefix only (measured: 100% where the float engine conforms).
                     Not compared with mlx-lm (mlx-lm's QuantizedKVCache rounds differently).
"-bucketed": ForwardOptions.for_backend("cuda") (full_buffer, one-query matmuls, addmm, dense q),
which GPUs run; the others ForwardOptions.for_backend("cpu"). Both with small_model_bytes=0 and
min_shared_tokens=8, so tiny models take the shared-prefix path.

test_cli_runs_a_model_folder: `mlxbatch run` on a saved folder (config.json, model.safetensors,
SmolLM2's tokenizer; vocab 49152) of gemma3_text (window 8) and qwen3 (a control): CLI outputs ==
the engine in process on the same tokens == mlx-lm's greedy tokens.

`archs.STATUS[arch] == "refused"`: Engine(...) must raise UsageError/ModelError naming the
model type instead (every scenario checks it).
"""

from __future__ import annotations

import json
import random
import shutil
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import pytest
from archs import CONFIGS, PACKED_KV_REFUSED, STATUS, VOCAB, WINDOW, build, quantizable
from conftest import cli, read_jsonl, write_jsonl
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from test_engine import run_engine as engine_run

from mlxbatch.engine import Engine, Request, SamplingParams
from mlxbatch.engine.arch import check_config
from mlxbatch.engine.kvquant import make as make_kv
from mlxbatch.engine.model_runner import ForwardOptions
from mlxbatch.errors import ModelError, UsageError
from mlxbatch.models import LoadedModel, random_tokenizer_dir
from mlxbatch.models import tokenizer as tokenizers

MAX_TOKENS = 12
Q_GROUP = 32
ARCHS = list(CONFIGS)
LAYOUTS = {
    "cpu": ForwardOptions.for_backend("cpu", small_model_bytes=0, min_shared_tokens=8),
    "bucketed": ForwardOptions.for_backend("cuda", small_model_bytes=0, min_shared_tokens=8),
}


# ---------------------------------------------------------------- prompts

def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def mixed_requests() -> list[Request]:
    rng = random.Random(1)
    return [Request(i, _tokens(rng, n), SamplingParams(max_tokens=MAX_TOKENS))
            for i, n in enumerate((5, 9, 14, 23, 31, 40))]


def prefix_requests() -> list[Request]:
    rng = random.Random(2)
    shared = _tokens(rng, 40)
    return [Request(i, shared + _tokens(rng, n), SamplingParams(max_tokens=MAX_TOKENS))
            for i, n in enumerate((1, 3, 6, 10, 17))]


def groups_requests() -> list[Request]:
    """Two shared prefixes (of 40 and 24 tokens), their rows decoding side by side in one batch:
    each row attends to its own group's stored prefix only (and, on sliding layers, its window of it)."""
    rng = random.Random(4)
    a, b = _tokens(rng, 40), _tokens(rng, 24)
    return [Request(i, (a if i % 2 else b) + _tokens(rng, n), SamplingParams(max_tokens=MAX_TOKENS))
            for i, n in enumerate((2, 5, 9, 4, 14, 7))]


def joining_requests() -> list[Request]:
    rng = random.Random(3)
    lengths = (3, 7, 12, 18, 25, 33, 9, 40)
    return [Request(i, _tokens(rng, n), SamplingParams(max_tokens=4 + (i * 5) % 9))
            for i, n in enumerate(lengths)]


# ---------------------------------------------------------------- reference (mlx-lm, one row)

@lru_cache(maxsize=None)
def ref_model(arch: str, bits: int = 0):
    model = build(arch)
    if bits:
        nn.quantize(model, group_size=Q_GROUP, bits=bits, class_predicate=quantizable(Q_GROUP))
    return model


def _full_caches(model):
    """The model's caches with every RotatingKVCache replaced by a full KVCache (the window then
    comes from the mask the model builds with window_size)."""
    return [KVCache() if isinstance(c, RotatingKVCache) else c for c in make_prompt_cache(model)]


@lru_cache(maxsize=None)
def reference(arch: str, prompt: tuple, n: int, bits: int = 0, full_cache: bool = False):
    """(tokens, margins): greedy tokens of one row and each step's top-1 minus top-2 logit."""
    model = ref_model(arch, bits)
    cache = _full_caches(model) if full_cache else make_prompt_cache(model)
    logits = model(mx.array([list(prompt)]), cache=cache)[:, -1]
    tokens, margins = [], []
    for step in range(n):
        top2 = mx.sort(logits[0])[-2:]
        tok = mx.argmax(logits[0])
        mx.eval(tok, top2)
        tokens.append(tok.item())
        margins.append((top2[1] - top2[0]).item())
        if step + 1 < n:
            logits = model(mx.array([[tokens[-1]]]), cache=cache)[:, -1]
    return tuple(tokens), tuple(margins)


# ---------------------------------------------------------------- our engine

@lru_cache(maxsize=1)
def _tokenizer():
    return tokenizers.load(random_tokenizer_dir())  # decodes ids < VOCAB; the engine only detokenizes


def loaded(arch: str, bits: int = 0) -> LoadedModel:
    """A fresh model (the runner fuses weights in place: never the reference's instance)."""
    model = build(arch)
    if bits:
        nn.quantize(model, group_size=Q_GROUP, bits=bits, class_predicate=quantizable(Q_GROUP))
    return LoadedModel(f"conformance:{arch}", model, _tokenizer(), "fp32", f"conformance-{arch}-{bits}",
                       eos_token_ids=set(), context_length=4096)


def run_engine(lm: LoadedModel, requests: list[Request], **kw) -> dict:
    """Every request's tokens (each completes once: test_engine's loop checks it)."""
    done, _ = engine_run(lm, requests, **kw)
    assert sorted(done, key=str) == sorted((r.key for r in requests), key=str)
    return {k: c.tokens for k, c in done.items()}


def check_refused(arch: str) -> None:
    """A refused architecture: a clear usage/model error naming the type, from its config before
    weights load (what `mlxbatch run` and `serve` check first) and from the engine."""
    model_type = CONFIGS[arch]["model_type"]
    with pytest.raises((UsageError, ModelError)) as info:
        check_config(CONFIGS[arch])
    assert repr(model_type) in str(info.value), str(info.value)
    with pytest.raises((UsageError, ModelError)) as info:
        Engine(loaded(arch), max_batch=4)
    assert repr(model_type) in str(info.value), str(info.value)


def assert_matches(arch: str, requests: list[Request], got: dict, bits: int = 0) -> None:
    """Every row's tokens equal the reference's; the message names each differing row, its first
    differing step, both tokens and the reference's top-1/top-2 margin there (a tiny one: a tie)."""
    bad = []
    for r in requests:
        want, margins = reference(arch, tuple(r.tokens), r.params.max_tokens, bits)
        have = tuple(got[r.key])
        if have != want:
            i = next((j for j, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
            bad.append(f"row {r.key} (prompt {len(r.tokens)} tokens): first difference at token {i}: "
                       f"engine {have[i] if i < len(have) else None} vs mlx-lm "
                       f"{want[i] if i < len(want) else None} (mlx-lm margin "
                       f"{margins[i] if i < len(margins) else float('nan'):.3g}); engine {list(have)}, mlx-lm {list(want)}")
    assert not bad, f"{arch}: {len(bad)}/{len(requests)} rows differ from mlx-lm:\n" + "\n".join(bad)


# ---------------------------------------------------------------- the references are meaningful

@pytest.mark.parametrize("arch", ARCHS)
def test_reference_is_not_degenerate(arch):
    """Random weights that make every prompt loop on one token would hide bugs."""
    outs = [reference(arch, tuple(r.tokens), MAX_TOKENS)[0] for r in mixed_requests()]
    assert len(set(outs)) == len(outs), f"{arch}: prompts give the same output: {outs}"
    varied = sum(len(set(o)) >= 4 for o in outs)
    assert varied >= len(outs) // 2, f"{arch}: outputs repeat few tokens: {outs}"


WINDOWED = [a for a in ARCHS if CONFIGS[a].get("sliding_window")]


@pytest.mark.parametrize("arch", WINDOWED)
def test_rotating_reference_agrees(arch):
    """mlx-lm's RotatingKVCache (one row) equals a full KVCache with the window mask, past the window."""
    assert any(isinstance(c, RotatingKVCache) for c in make_prompt_cache(ref_model(arch)))
    for r in mixed_requests():
        rotating = reference(arch, tuple(r.tokens), MAX_TOKENS)[0]
        full = reference(arch, tuple(r.tokens), MAX_TOKENS, full_cache=True)[0]
        assert rotating == full, (arch, len(r.tokens), rotating, full)


# ---------------------------------------------------------------- scenarios

SCENARIOS = ["mixed", "mixed-bucketed", "prefix", "prefix-bucketed", "groups", "groups-bucketed", "joining",
             "joining-bucketed", "q4", "q8", "kv8"]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("arch", ARCHS)
def test_conformance(arch, scenario):
    if STATUS[arch] == "refused":
        check_refused(arch)
        return
    kind, _, layout = scenario.partition("-")
    options = LAYOUTS[layout or "cpu"]
    if kind == "mixed":
        reqs = mixed_requests()
        assert_matches(arch, reqs, run_engine(loaded(arch), reqs, max_batch=8, options=options))
    elif kind == "prefix":
        reqs = prefix_requests()
        assert_matches(arch, reqs, run_engine(loaded(arch), reqs, max_batch=8, prefill_chunk=16, options=options))
    elif kind == "groups":  # a unit per prefix, so both groups decode in one batch
        reqs = groups_requests()
        assert_matches(arch, reqs, run_engine(loaded(arch), reqs, max_batch=8, prefill_chunk=16, options=options))
    elif kind == "joining":
        reqs = joining_requests()
        assert_matches(arch, reqs, run_engine(loaded(arch), reqs, max_batch=3, prefill_chunk=16, options=options))
    elif kind in ("q4", "q8"):  # experts (SwitchLinear) are quantized too
        reqs, bits = mixed_requests(), int(kind[1])
        assert_matches(arch, reqs, run_engine(loaded(arch, bits=bits), reqs, max_batch=8, options=options), bits=bits)
    elif kind == "kv8" and arch in PACKED_KV_REFUSED:
        with pytest.raises(UsageError, match=repr(CONFIGS[arch]["model_type"])):
            Engine(loaded(arch), max_batch=8, options=options, kv_bits=8)
        with pytest.raises(UsageError, match=repr(CONFIGS[arch]["model_type"])):
            check_config(CONFIGS[arch], make_kv(8, 8, 32, head_dim=32))
    elif kind == "kv8":
        reqs = mixed_requests()
        packed = run_engine(loaded(arch), reqs, max_batch=8, options=options, kv_bits=8)
        plain = run_engine(loaded(arch), reqs, max_batch=8, options=options)
        assert all(len(packed[r.key]) == MAX_TOKENS for r in reqs), packed
        agree = sum(_common_prefix(packed[r.key], plain[r.key]) for r in reqs)
        total = MAX_TOKENS * len(reqs)
        assert 4 * agree >= 3 * total, f"{arch}: 8-bit KV agrees with float KV on {agree}/{total} tokens: " \
                                    f"{packed} vs {plain}"
    else:
        raise AssertionError(scenario)


def _common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------- the CLI on a non-llama folder

@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3"])
def test_cli_runs_a_model_folder(tmp_path, arch):
    """`mlxbatch run` on a saved mlx-lm folder (config.json + model.safetensors + SmolLM2's
    tokenizer): gemma3_text with a window of 8, prompts longer than it (qwen3: a control without
    windows); the CLI's outputs equal the engine's in process, and those equal mlx-lm's."""
    import archs
    from mlx.utils import tree_flatten

    from mlxbatch import models

    config = dict(CONFIGS[arch], vocab_size=49152)  # the tokenizer's ids
    archs.CONFIGS["_cli"] = config
    try:
        model = build("_cli")
    finally:
        del archs.CONFIGS["_cli"]
    folder = tmp_path / f"{arch}-tiny"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    for f in random_tokenizer_dir().iterdir():
        shutil.copy(f, folder / f.name)

    prompts = {f"p{i}": f"Row {i}: " + "the keeper counted ships and wrote their names down " * (i % 4 + 1)
               for i in range(5)}
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": k, "prompt": v} for k, v in prompts.items()])
    out = tmp_path / "out"
    res = cli("run", src, "-o", out, "--model", folder, "--dtype", "fp32", "--raw", "--ignore-eos",
              "--max-tokens", "10", "-q")
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in read_jsonl(out / "results.jsonl")}
    assert sorted(rows) == sorted(prompts)

    # The CLI path (folder loading, tokenizing, the job runner) gives what the engine gives in process...
    lm = models.load(str(folder), dtype="fp32", ignore_eos=True)
    tokens = {rid: lm.tokenizer.encode(text, add_special_tokens=False) for rid, text in prompts.items()}
    assert all(len(t) > WINDOW for t in tokens.values())
    reqs = [Request(rid, t, SamplingParams(max_tokens=10)) for rid, t in tokens.items()]
    engine = run_engine(lm, reqs, max_batch=8)
    for rid in prompts:
        assert rows[rid]["usage"]["completion_tokens"] == 10
        assert rows[rid]["output"] == lm.tokenizer.decode(engine[rid]), (rid, rows[rid]["output"], engine[rid])
    # ...and that equals mlx-lm's greedy tokens, one row at a time (a fresh copy of the weights:
    # the engine's runner may have fused the loaded ones).
    ref = models.load(str(folder), dtype="fp32").model
    bad = []
    for rid, t in tokens.items():
        cache = make_prompt_cache(ref)
        y = mx.argmax(ref(mx.array([t]), cache=cache)[:, -1], axis=-1)
        want = [y.item()]
        for _ in range(9):
            y = mx.argmax(ref(y[:, None], cache=cache)[:, -1], axis=-1)
            want.append(y.item())
        if engine[rid] != want:
            bad.append(f"{rid} ({len(t)} prompt tokens): first difference at token {_common_prefix(engine[rid], want)}")
    assert not bad, "the engine differs from mlx-lm on the loaded folder: " + "; ".join(bad)


# ---------------------------------------------------------------- state layers take a prefix

HYBRIDS = [a for a in ARCHS if a in ("lfm2", "qwen3_next", "granitemoehybrid", "mamba2")]


@pytest.mark.parametrize("arch", HYBRIDS)
def test_state_layers_reuse_a_prefix_without_pads(arch):
    """Suffixes of one length (no pads after the prefix): the prefix's state is computed once,
    copied into each row, and read back from the prefix cache by the second unit (max_batch 2)."""
    rng = random.Random(4)
    shared = _tokens(rng, 40)
    reqs = [Request(i, shared + _tokens(rng, 6), SamplingParams(max_tokens=MAX_TOKENS)) for i in range(4)]
    eng = Engine(loaded(arch), max_batch=2, prefill_chunk=16, options=LAYOUTS["cpu"])
    for r in reqs:
        eng.add(r)
    done = {}
    while eng.has_work:
        done.update({c.key: c.tokens for c in eng.step()})
    assert eng.stats.prefix_hits > 0, "the prefix was not reused"
    assert_matches(arch, reqs, done)


@pytest.mark.parametrize("arch", HYBRIDS)
def test_state_layers_logits_match(arch):
    """Logits, not only greedy tokens (these tiny random models forget distant tokens, so tokens
    alone would hide a wrong state): left-padded prompts prefilled in chunks of 16, then rows
    dropped (keep) and a row merged in, equal mlx-lm's one-row logits at every step."""
    from mlxbatch.engine.model_runner import ModelRunner

    model, ref = build(arch), ref_model(arch)
    runner = ModelRunner(model, LAYOUTS["cpu"])
    rng = random.Random(5)
    prompts = [_tokens(rng, n) for n in (5, 23, 40)]
    late = _tokens(rng, 9)

    def prefill(rows):
        cache, width = runner.new_cache(len(rows)), max(map(len, rows))
        tokens = mx.array([[0] * (width - len(r)) + r for r in rows], dtype=mx.int32)
        valid = mx.array([[False] * (width - len(r)) + [True] * len(r) for r in rows])
        for start in range(0, width - 16, 16):
            cache.layout.begin(valid[:, start : start + 16])
            runner.forward_hidden(tokens[:, start : start + 16], cache)
        start = cache.layout.idx
        cache.layout.begin(valid[:, start:])
        return cache, runner.forward_last(tokens[:, start:], cache)

    def step(cache, toks):
        cache.layout.begin(mx.ones((len(toks), 1), dtype=mx.bool_))
        return runner.forward_last(mx.array([[t] for t in toks], dtype=mx.int32), cache)

    refs = {i: (make_prompt_cache(ref), p) for i, p in enumerate(prompts + [late])}

    def ref_logits(i, toks):
        return ref(mx.array([toks]), cache=refs[i][0])[0, -1]

    cache, logits = prefill(prompts)
    rows = [0, 1, 2]
    want = [ref_logits(i, prompts[i]) for i in rows]
    for n in range(6):
        assert mx.allclose(logits, mx.stack(want), atol=1e-3, rtol=1e-3).item(), (arch, n, rows)
        toks = [int(t) for t in mx.argmax(logits, axis=-1).tolist()]
        if n == 2:  # row 1 finishes, a new row joins
            cache.keep([0, 2])
            rows, toks = [0, 2], [toks[0], toks[2]]
            other, late_logits = prefill([late])
            cache.merge(other)
            rows.append(3)
            toks.append(int(mx.argmax(late_logits[0]).item()))
            ref_logits(3, late)
        logits = step(cache, toks)
        want = [ref_logits(i, [t]) for i, t in zip(rows, toks)]


@pytest.mark.parametrize("arch", HYBRIDS)
def test_state_layers_prefix_logits_match(arch):
    """A prefix's state (batch 1, prefix_kv) copied into two rows (from_prefix) and extended by
    suffixes of one length gives mlx-lm's logits for the whole prompts."""
    from mlxbatch.engine.kvcache import BatchCache
    from mlxbatch.engine.model_runner import ModelRunner

    runner, ref = ModelRunner(build(arch), LAYOUTS["cpu"]), ref_model(arch)
    rng = random.Random(6)
    shared, suffixes = _tokens(rng, 20), [_tokens(rng, 5) for _ in range(2)]
    one = runner.new_cache(1)
    one.layout.begin(mx.ones((1, 20), dtype=mx.bool_))
    runner.forward_hidden(mx.array([shared], dtype=mx.int32), one)
    cache = BatchCache.from_prefix(runner.cache_format, one.prefix_kv(), 2, 20)
    cache.layout.begin(mx.ones((2, 5), dtype=mx.bool_))
    logits = runner.forward_last(mx.array(suffixes, dtype=mx.int32), cache)
    want = mx.stack([ref(mx.array([shared + s]), cache=make_prompt_cache(ref))[0, -1] for s in suffixes])
    assert mx.allclose(logits, want, atol=1e-3, rtol=1e-3).item(), arch
