"""Engine correctness: batched greedy equals single-stream mlx-lm, prefix reuse, sampling."""

from dataclasses import replace
from pathlib import Path

import pytest
from mlx_lm import stream_generate

from mlxbatch.engine import Engine, Request, SamplingParams
from mlxbatch.engine.model_runner import ForwardOptions


def single_stream(lm, tokens, max_tokens):
    out = [r.token for r in stream_generate(lm.model, lm.tokenizer, tokens, max_tokens=max_tokens)]
    if out and out[-1] in lm.eos_token_ids:
        out = out[:-1]
    return out


def run_engine(lm, requests, **kw):
    eng = Engine(lm, **kw)
    for r in requests:
        eng.add(r)
    done = {}
    while eng.has_work:
        for c in eng.step():
            assert c.key not in done
            done[c.key] = c
    return done, eng


def varied_prompts(lm, n):
    tok = lm.tokenizer
    doc = "The lighthouse keeper counted ships each night and wrote their names in a ledger. " * 6
    out = []
    for i in range(n):
        if i % 3 == 0:  # a shared document asked different questions
            text = doc + f"Question {i}: what did the keeper count?"
        elif i % 3 == 1:
            text = f"Short prompt {i}."
        else:
            text = f"A medium length prompt number {i} " + "with several repeated words " * (i % 5)
        out.append(tok.encode(text))
    return out


LAYOUTS = {  # what each backend runs, all checked on the CPU
    "cpu": ForwardOptions.for_backend("cpu"),
    "cpu-uncompiled": ForwardOptions.for_backend("cpu", compiled_decode=False),
    "metal": ForwardOptions.for_backend("metal"),  # attention over the whole bucketed buffer, masked
    "cuda": ForwardOptions.for_backend("cuda"),  # also one query as matmuls, residuals added by matmuls
    "cpu-copied-prefix": ForwardOptions.for_backend("cpu", shared_prefix=False),
    "mlx-lm-layers": ForwardOptions.for_backend("cpu", fused=False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.slow
def test_batched_greedy_equals_single_stream_tiny(tiny, layout):
    prompts = varied_prompts(tiny, 24)
    reqs = [Request(i, p, SamplingParams(max_tokens=8 + i % 9)) for i, p in enumerate(prompts)]
    # A small batch makes rows join mid-run as others finish (continuous batching).
    done, eng = run_engine(tiny, reqs, max_batch=5, prefill_chunk=16, options=replace(LAYOUTS[layout], min_shared_tokens=8, small_model_bytes=0))
    assert eng.stats.prefix_hit_tokens > 0, "the shared document should be reused"
    for r in reqs:
        assert done[r.key].tokens == single_stream(tiny, r.tokens, r.params.max_tokens), r.key


@pytest.mark.realmodel
@pytest.mark.slow
def test_batched_greedy_equals_single_stream_real_model(smol):
    prompts = varied_prompts(smol, 20)
    reqs = [Request(i, p, SamplingParams(max_tokens=12)) for i, p in enumerate(prompts)]
    done, _ = run_engine(smol, reqs, max_batch=7)
    for r in reqs:
        assert done[r.key].tokens == single_stream(smol, r.tokens, 12), r.key


def test_seeded_sample_is_independent_of_batch(tiny):
    prompts = varied_prompts(tiny, 9)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone, _ = run_engine(tiny, [Request("x", prompts[4], params)], max_batch=1)
    crowd = [Request(i, p, SamplingParams(max_tokens=12, temperature=0.7, seed=i)) for i, p in enumerate(prompts)]
    crowd[4] = Request("x", prompts[4], params)
    together, _ = run_engine(tiny, crowd, max_batch=4)
    assert alone["x"].tokens == together["x"].tokens
    other, _ = run_engine(tiny, [Request("x", prompts[4], SamplingParams(max_tokens=12, temperature=0.9, seed=99))])
    assert other["x"].tokens != alone["x"].tokens, "a different seed should draw different tokens"


def test_top_k_one_is_greedy(tiny):
    p = varied_prompts(tiny, 3)[2]
    greedy, _ = run_engine(tiny, [Request(0, p, SamplingParams(max_tokens=10))])
    k1, _ = run_engine(tiny, [Request(0, p, SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=3))])
    assert greedy[0].tokens == k1[0].tokens


def test_stop_string_and_max_tokens(tiny):
    p = varied_prompts(tiny, 2)[1]
    full, _ = run_engine(tiny, [Request(0, p, SamplingParams(max_tokens=20))])
    text = full[0].text
    assert full[0].finish_reason == "length" and len(full[0].tokens) == 20
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut, _ = run_engine(tiny, [Request(0, p, SamplingParams(max_tokens=20, stop=(stop,)))])
    assert cut[0].finish_reason == "stop"
    assert stop not in cut[0].text and text.startswith(cut[0].text)


def test_logprobs_are_consistent(tiny):
    p = varied_prompts(tiny, 2)[0]
    done, _ = run_engine(tiny, [Request(0, p, SamplingParams(max_tokens=6, logprobs=3))])
    lps = done[0].logprobs
    assert len(lps) == 6
    for token, value, top in lps:
        assert value <= 0 and len(top) == 3
        assert top[0][0] == token  # greedy picks the most likely token
        assert abs(top[0][1] - value) < 1e-4


def test_n_samples_share_prefix(tiny):
    p = varied_prompts(tiny, 1)[0]
    reqs = [Request(s, p, SamplingParams(max_tokens=5, temperature=1.0, seed=s)) for s in range(6)]
    done, eng = run_engine(tiny, reqs, max_batch=8)
    assert len(done) == 6
    assert eng.stats.prompt_computed <= len(p) + 6  # one prefix, then one token per sample


@pytest.mark.parametrize("quantize", [False, True])
def test_fused_forward_matches_mlx_lm_layers(quantize):
    import mlx.core as mx
    import mlx.nn as nn

    from mlxbatch import models
    from mlxbatch.engine.attention import AttendOptions
    from mlxbatch.engine.fused import fuse, hidden_states
    from mlxbatch.engine.kvcache import BatchCache, CacheFormat

    lm = models.load("random:tiny", dtype="fp32")
    if quantize:
        nn.quantize(lm.model, group_size=64, bits=4)
    tokens = mx.array([[5, 9, 200, 17, 3000, 42], [7, 7, 7, 1, 2, 3]])

    def run(fn):
        cache = BatchCache(CacheFormat.plain(len(lm.model.layers)), 2)
        cache.layout.begin(mx.ones(tokens.shape, dtype=mx.bool_))
        return fn(cache)

    ref = run(lambda c: lm.model.model(tokens, cache=c.layers))
    fused = fuse(lm.model)
    assert fused is not None and fused[0][0].is_quantized == quantize
    ours = run(lambda c: hidden_states(lm.model, tokens, c.layers, fused, opts=AttendOptions()))
    assert mx.allclose(ref, ours, atol=1e-4, rtol=1e-4).item()
    again = run(lambda c: lm.model.model(tokens, cache=c.layers))  # mlx-lm's layers now read slices of the fused arrays
    assert mx.allclose(ref, again, atol=1e-6).item()


def test_compiled_decode_plan_covers_plain_llama_weights():
    import mlx.nn as nn

    from mlxbatch import models
    from mlxbatch.engine.model_runner import ModelRunner

    assert ModelRunner(models.load("random:tiny", dtype="fp32").model).plan is not None
    quantized = models.load("random:tiny", dtype="fp32").model
    nn.quantize(quantized, group_size=64, bits=4)  # quantized weights keep the general path
    runner = ModelRunner(quantized)
    assert runner.fused is not None and runner.plan is None


def cascade_prompts(lm):
    """Groups with different shared-prefix lengths, nested (a system header, then document A,
    document B or nothing), plus a prompt for n=4 samples. Document A has more rows than a batch
    holds, and each of its questions starts with a different word, so every unit of them shares
    exactly header + document A: its last rows come back for the same prefix after other units."""
    enc = lm.tokenizer.encode
    header = enc("System: you answer questions about the documents below, briefly and exactly. " * 2)
    doc_a = enc(" Document A tells of a lighthouse keeper who counted ships every night." * 3)
    doc_b = enc(" Document B is a recipe for bread with flour, water, salt and patience." * 5)
    openers = ("Why", "How", "When", "Where", "Who", "What", "Which", "Is", "Are", "Does", "Did", "Can",
               "Could", "Would", "Should", "Will")
    about_a = [header + doc_a + enc(f" {w} did the keeper count ships, question {i}?") for i, w in enumerate(openers)]
    prompts = about_a[:12]
    for i in range(8):
        prompts.append(header + doc_b + enc(f" Question {i}: how much salt?" + " Explain." * (i % 3)))
        prompts.append(header + enc(f" Question {i} without a document, number {i * 7}."))
    return prompts + about_a[12:], enc("Write one sentence about the sea and the sky.")


LAYOUTS["cpu-group-loop"] = ForwardOptions.for_backend("cpu", max_blocked_scores=0)  # one matmul per group


@pytest.mark.parametrize("layout", ["cpu", "metal", "cuda", "cpu-group-loop"])
@pytest.mark.slow
def test_shared_prefixes_equal_single_stream(tiny, layout):
    prompts, sampled = cascade_prompts(tiny)
    reqs = [Request(i, p, SamplingParams(max_tokens=6 + i % 7)) for i, p in enumerate(prompts)]
    reqs += [Request(("n", s), sampled, SamplingParams(max_tokens=8)) for s in range(4)]
    # A prefix cache that holds about one prefix: later units evict and recompute.
    eng = Engine(tiny, max_batch=12, prefill_chunk=32, options=replace(LAYOUTS[layout], min_shared_tokens=8, small_model_bytes=0),
                 prefix_cache_gb=300e3 / 1e9)
    stored, put = [], eng.prefix_cache.put
    eng.prefix_cache.put = lambda prefix: (stored.append(prefix.key), put(prefix))
    for r in reqs:
        eng.add(r)
    done, most_groups = {}, 0
    while eng.has_work:
        for c in eng.step():
            done[c.key] = c
        if eng._cache is not None:
            most_groups = max(most_groups, len(eng._cache.layout.groups))
    assert most_groups >= 3, "rows of different groups should decode in one batch"
    assert eng.prefix_cache.evictions > 0 and len(stored) > len(set(stored))  # a dropped prefix was recomputed
    for r in reqs:
        assert done[r.key].tokens == single_stream(tiny, r.tokens, r.params.max_tokens), r.key


def run_tracking(lm, requests, counter: str, **kw):
    """Run to the end; the engine and the highest value an EngineStats counter reached."""
    eng, peak = Engine(lm, **kw), 0
    for r in requests:
        eng.add(r)
    while eng.has_work:
        eng.step()
        peak = max(peak, getattr(eng.stats, counter))
    return eng, peak


def test_shared_prefix_is_stored_once(tiny):
    prefix = (tiny.tokenizer.encode("A long shared document about harbours and ships. " * 200))[:1000]
    reqs = [Request(i, prefix + tiny.tokenizer.encode(f" Question {i}?"), SamplingParams(max_tokens=8))
            for i in range(64)]
    eng, peak = run_tracking(tiny, reqs, "kv_bytes", max_batch=64, options=ForwardOptions.for_backend("cpu"))
    per_token = eng.runner.kv_bytes_per_token()
    own = sum(len(r.tokens) - 1000 + 8 for r in reqs)  # each row's suffix and its generated tokens
    assert eng.stats.kv_peak_bytes == peak
    assert peak <= 1.5 * per_token * (1000 + own), (peak, per_token * (1000 + own))
    copied, _ = run_tracking(tiny, reqs, "kv_bytes", max_batch=64,
                             options=ForwardOptions.for_backend("cpu", shared_prefix=False))
    assert copied.stats.kv_peak_bytes > 20 * peak  # what copying the prefix into every row costs



@pytest.mark.parametrize("budget_gb, shares", [(None, False), (0.002, True)])
def test_small_model_on_cuda_copies_prefixes_while_they_fit(tiny, budget_gb, shares):
    prefix = tiny.tokenizer.encode("A shared header that many rows begin with. " * 60)[:300]
    reqs = [Request(i, prefix + tiny.tokenizer.encode(f" Row {i}."), SamplingParams(max_tokens=2)) for i in range(8)]
    _, shared = run_tracking(tiny, reqs, "kv_shared_bytes", max_batch=8, max_kv_gb=budget_gb,
                             options=ForwardOptions.for_backend("cuda"))
    assert (shared > 0) == shares


# ------------------------------------------------------------ one engine configuration
def test_engine_config_from_spec_is_every_engine_setting(tmp_path):
    from mlxbatch.engine.config import EngineConfig, KVFormat
    from mlxbatch.job.spec import JobSpec

    spec = JobSpec(input=tmp_path / "in.jsonl", batch_size=8, max_kv_gb=2.5, kv_bits=8, kv_value_bits=4,
                   adapter=(("base", None), ("a", "rel/a"))).validate()
    config = EngineConfig.from_spec(spec)
    assert config == EngineConfig(max_batch=8, max_kv_gb=2.5, kv=KVFormat(8, 4, None),
                                  adapters=(("base", None), ("a", str(Path.cwd() / "rel/a"))))
    assert EngineConfig.from_spec(JobSpec(input=tmp_path / "in.jsonl", kv_bits=16).validate()).kv is None
    # keyword construction maps the three KV keywords to the one KVFormat, here only
    assert EngineConfig.of(max_batch=3, kv_bits=4, kv_group_size=32) == EngineConfig(max_batch=3, kv=KVFormat(4, None, 32))


def test_engine_takes_a_config_or_keywords_and_swallows_nothing(tiny):
    from mlxbatch.engine.config import EngineConfig, KVFormat

    opts = ForwardOptions(full_buffer=False)
    eng = Engine(tiny, EngineConfig(max_batch=5, prefill_chunk=16, options=opts, kv=KVFormat(8)))
    assert (eng.max_batch, eng.prefill_chunk, eng.runner.options.kv.bits) == (5, 16, 8)
    assert Engine(tiny, max_batch=5, prefill_chunk=16, options=opts, kv_bits=8).config == eng.config
    with pytest.raises(TypeError):
        Engine(tiny, max_batch=5, max_batch_size=3)  # a misspelt setting is an error, not ignored
    with pytest.raises(TypeError):
        Engine(tiny, EngineConfig(), max_batch=5)
    with pytest.raises(ValueError, match="EngineConfig.kv"):
        EngineConfig(options=replace(opts, kv_bits=4))  # the KV format has one form
    with pytest.raises(ValueError, match="names adapters a"):
        Engine(tiny, EngineConfig(adapters=(("a", "/x"),)))  # the model carries none: not silently dropped
