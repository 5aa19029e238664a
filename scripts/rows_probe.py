"""Engine seconds for N copies of parallm-325 in this process, the timed runs started at a shared
wall-clock moment, so engines on two GPUs can be timed alone and side by side (host contention).

usage: python scripts/rows_probe.py MODEL COPIES [START_AT_UNIX_SECONDS]
"""
import sys
import time

import mlxbatch  # noqa: F401  (BLAS preload before mlx)
from mlxbatch import bench, models
from mlxbatch.engine import Engine, Request, SamplingParams

model, copies = sys.argv[1], int(sys.argv[2])
start_at = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
lm = models.load(model)
msgs, max_tokens = bench.WORKLOADS["parallm-325"](None)
prompts = [list(lm.tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in msgs] * copies


def run() -> tuple[float, int]:
    eng = Engine(lm)
    for i, p in enumerate(prompts):
        eng.add(Request(i, p, SamplingParams(max_tokens=max_tokens)))
    t, steps = time.perf_counter(), 0
    while eng.has_work:
        eng.step()
        steps += 1
    return time.perf_counter() - t, steps


secs, steps = run()  # the process's first run: kernels and plans per shape built or loaded
print(f"{model} rows={len(prompts)} first run in this process {secs:.3f} s {steps} steps", flush=True)
if start_at:
    wait = start_at - time.time()
    print(f"waiting {wait:.1f} s for the shared start", flush=True)
    time.sleep(max(0.0, wait))
for i in range(3):
    secs, steps = run()
    print(f"{model} rows={len(prompts)} run{i} {secs:.3f} s {steps} steps {secs / steps * 1e3:.2f} ms/step", flush=True)
