"""Profile the engine alone on a workload (pre-tokenized), to find per-step overheads."""
import cProfile
import pstats
import sys
import time

import mlxbatch  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx

from mlxbatch import bench, models
from mlxbatch.engine import Engine, Request, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 325
lm = models.load(model)
msgs, max_tokens = bench._parallm(n)
t = time.perf_counter()
prompts = [list(lm.tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in msgs]
print(f"tokenize {len(prompts)}: {time.perf_counter() - t:.2f}s")


def run(batch=n):
    eng = Engine(lm, max_batch=batch)
    for i, p in enumerate(prompts):
        eng.add(Request(i, p, SamplingParams(max_tokens=max_tokens)))
    t0 = time.perf_counter()
    steps = 0
    while eng.has_work:
        eng.step()
        steps += 1
    dt = time.perf_counter() - t0
    print(f"engine: {eng.stats.generated_tokens} tok in {dt:.2f}s = {eng.stats.generated_tokens / dt:.0f} tok/s, {steps} steps, {dt / steps * 1000:.1f} ms/step")
    return eng


run()
run()
cProfile.run("run()", "/tmp/prof.out")
pstats.Stats("/tmp/prof.out").sort_stats("tottime").print_stats(15)
