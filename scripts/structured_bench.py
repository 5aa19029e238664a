"""Cost of structured output: tok/s of a batch with every row constrained to a JSON schema vs none,
and half and half (what free rows pay for guided neighbours).

usage: python scripts/structured_bench.py [MODEL] [--batches=64,256] [--max-tokens=64]
Runs the Engine directly (no files) on the extraction prompts of tests/test_structured.py, cycled to
the batch size, greedy; prints tok/s, ms per decode step and the time spent filling grammar masks.
"""
import sys
import time

import mlxbatch  # noqa: F401  (BLAS preload before mlx)
from mlxbatch import models
from mlxbatch.engine import Engine, Request, SamplingParams
from mlxbatch.job import grammar

sys.path.insert(0, "tests")
from structured_data import PEOPLE, SCHEMA  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--")]
opt = {a.split("=")[0]: a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--") and "=" in a}
lm = models.load(args[0] if args else "smollm2-135m")
batches = [int(b) for b in opt.get("--batches", "64,256").split(",")]
max_tokens = int(opt.get("--max-tokens", "64"))
schema = grammar.json_constraint(SCHEMA)
mask_seconds = [0.0]
_masks = grammar.Grammars.masks


def timed_masks(self, guided, batch):
    t = time.perf_counter()
    out = _masks(self, guided, batch)
    mask_seconds[0] += time.perf_counter() - t
    return out


grammar.Grammars.masks = timed_masks
texts = [f"Extract the person (name, age), the city, the sentiment and the topics as JSON.\n"
         f"Text: {n}, aged {a}, lives in {c}. {d}." for n, a, c, d in PEOPLE]
prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
           for t in texts]


def run(batch: int, share: float):
    grammars, engine = grammar.Grammars(lm.tokenizer), Engine(lm, max_batch=batch)
    num_guided = int(batch * share)
    for i in range(batch):
        guided = i % batch < num_guided
        params = SamplingParams(max_tokens=max_tokens, constraint=schema if guided else None)
        engine.add(Request(i, list(prompts[i % len(prompts)]), params, grammars.guide(schema) if guided else None))
    mask_seconds[0] = 0.0
    t0, steps0, free_tokens = time.perf_counter(), None, 0
    while engine.has_work:
        done = engine.step()
        free_tokens += sum(c.completion_tokens for c in done if c.key >= num_guided)
        if steps0 is None and engine.num_active == batch:  # prefill done: decode steps from here
            steps0, t1 = engine.stats.steps, time.perf_counter()
    dt, st = time.perf_counter() - t0, engine.stats
    decode_ms = 1000 * (time.perf_counter() - t1) / max(st.steps - steps0, 1)
    print(f"batch {batch:4d} constrained {num_guided:4d}: {st.generated_tokens:6d} tok in {dt:6.1f} s = "
          f"{st.generated_tokens / dt:7.1f} tok/s, {decode_ms:6.1f} ms/decode step, masks {mask_seconds[0]:5.2f} s, "
          f"free rows' tokens {free_tokens}", flush=True)


print(f"{lm.name} {lm.dtype} {models.backend()} max_tokens={max_tokens}", flush=True)
for share in (0.0, 1.0):  # warm-up: kernel builds (per batch shape on GPUs), grammar compilation
    run(batches[0], share)
for b in batches:
    for share in (0.0, 1.0, 0.5):
        run(b, share)
