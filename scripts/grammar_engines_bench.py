"""Per-step token-mask cost of grammar engines on the CPU: llguidance (what mlxbatch uses) vs outlines-core.

usage: python scripts/grammar_engines_bench.py [--batches=64,256] [--steps=30]
Needs `pip install outlines-core` in the venv (not a dependency of mlxbatch); xgrammar is not measured
(it imports torch at module level: `import xgrammar` fails without torch).

Same schema (tests/structured_data.py SCHEMA), same tokenizer (SmolLM2's 49,152 tokens, local cache),
same walk for both engines: row i follows the tokens of one valid JSON document (PEOPLE[i % 20] laid out
as json.dumps does); each step fills the allowed-token bitmask ([batch, ceil(vocab/32)] int32) of every
row, then advances every row by its document's next token. Prints the one-time costs (tokenizer or
vocabulary, compiling the schema) and per step: mask filling and advancing, mean over the steps.
llguidance is used as mlxbatch/grammar.py does (a template matcher deep-copied per row,
`fill_next_token_bitmask_par` for the whole batch); outlines-core has no batch call: one
`Guide.write_mask_into` per row (as outlines-core's numpy `fill_next_token_bitmask` does, one row at a time).
"""
import json
import sys
import time
from importlib.metadata import version

import numpy as np

import mlxbatch  # noqa: F401  (BLAS preload)
from mlxbatch import models
from mlxbatch.job import grammar

sys.path.insert(0, "tests")
from structured_data import PEOPLE, SCHEMA  # noqa: E402

opt = {a.split("=")[0]: a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--") and "=" in a}
BATCHES = [int(b) for b in opt.get("--batches", "64,256").split(",")]
STEPS = int(opt.get("--steps", "30"))

tok = models.load("smollm2-135m", dtype="fp32").tokenizer
hf = getattr(tok, "_tokenizer", tok)
EOS = sorted(tok.eos_token_ids or [hf.eos_token_id])
N_VOCAB = len(hf)
WORDS = (N_VOCAB + 31) // 32
SENTIMENTS = ["positive", "neutral", "negative"]
docs = [json.dumps({"person": {"name": n, "age": a}, "city": c, "sentiment": SENTIMENTS[i % 3],
                    "topics": [w.strip(".,").lower() for w in d.split() if len(w) > 4][:3]})
        for i, (n, a, c, d) in enumerate(PEOPLE)]
walks = [hf.encode(d, add_special_tokens=False) for d in docs]
assert min(map(len, walks)) >= STEPS, f"documents are {min(map(len, walks))}+ tokens; ask for fewer --steps"


def allowed(mask_row, token):
    return (int(mask_row[token // 32]) >> (token % 32)) & 1


def walk(name, make_rows, fill, advance, batch):
    """Mean ms per step for filling the batch's masks and for advancing every row by one token."""
    rows = make_rows(batch)
    out = np.zeros((batch, WORDS), dtype=np.int32)
    fill_s, adv_s, n_allowed = [], [], 0
    for step in range(STEPS):
        t = time.perf_counter()
        fill(rows, out)
        fill_s.append(time.perf_counter() - t)
        n_allowed += int(np.bitwise_count(out.view(np.uint32)).sum())
        tokens = [walks[i % len(walks)][step] for i in range(batch)]
        assert all(allowed(out[i], tokens[i]) for i in range(batch)), f"{name}: document token masked out"
        t = time.perf_counter()
        advance(rows, tokens)
        adv_s.append(time.perf_counter() - t)
    ms = 1000 * np.array(fill_s)
    print(f"  {name:13s} batch {batch:4d}: masks {ms.mean():7.2f} ms/step (first step {ms[0]:6.2f}, "
          f"median {np.median(ms):6.2f}, max {ms.max():6.2f}), advance {1000 * np.mean(adv_s):6.2f} ms/step, "
          f"allowed tokens per row and step {n_allowed / batch / STEPS:7.0f}", flush=True)


def bench_llguidance():
    import llguidance as llg
    from llguidance.numpy import fill_next_token_bitmask_par

    t0 = time.perf_counter()
    lltok = llg.LLTokenizer(hf.backend_tokenizer.to_str(), n_vocab=N_VOCAB, eos_token=EOS)
    executor = llg.LLExecutor()
    t1 = time.perf_counter()
    template = llg.LLMatcher(lltok, grammar.grammar_of(grammar.json_constraint(SCHEMA)), log_level=0)
    assert not template.is_error(), template.get_error()
    t2 = time.perf_counter()
    print(f"llguidance {version('llguidance')}: tokenizer {t1 - t0:.2f} s, schema compile {1000 * (t2 - t1):.1f} ms "
          f"(lazy: masks are computed on demand)", flush=True)

    def fill(rows, out):
        fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(rows)], out)

    def advance(rows, tokens):
        for m, token in zip(rows, tokens):
            m.consume_token(token)

    for b in BATCHES:
        walk("llguidance", lambda n: [template.deep_copy() for _ in range(n)], fill, advance, b)


def gpt2_byte_decoder():
    """GPT-2 byte-level alphabet (SmolLM2's tokens): the character that stands for each byte, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def bench_outlines_core():
    import outlines_core as oc

    t0 = time.perf_counter()
    decode = gpt2_byte_decoder()
    special = set(hf.all_special_ids)
    by_bytes: dict[bytes, list[int]] = {}
    for text, i in hf.get_vocab().items():
        if i not in special:
            by_bytes.setdefault(bytes(decode[ch] for ch in text), []).append(i)
    vocab = oc.Vocabulary(EOS[0], by_bytes)
    t1 = time.perf_counter()
    regex = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index = oc.Index(regex, vocab)
    t2 = time.perf_counter()
    print(f"outlines-core {version('outlines-core')}: vocabulary {t1 - t0:.2f} s, schema compile (regex + Index over "
          f"the vocabulary) {t2 - t1:.2f} s", flush=True)

    def fill(rows, out):
        for i, g in enumerate(rows):
            row = out[i]
            g.write_mask_into(row.ctypes.data, row.size, row.itemsize)

    def advance(rows, tokens):
        for g, token in zip(rows, tokens):
            g.advance(token, return_tokens=False)

    for b in BATCHES:
        walk("outlines-core", lambda n: [oc.Guide(index) for _ in range(n)], fill, advance, b)


print(f"SmolLM2 tokenizer, {N_VOCAB} tokens; documents of {min(map(len, walks))}-{max(map(len, walks))} tokens, "
      f"{STEPS} steps each; numpy {np.__version__}", flush=True)
bench_llguidance()
try:
    import outlines_core  # noqa: F401
except ImportError:
    print("outlines-core: not installed (pip install outlines-core)")
else:
    bench_outlines_core()
