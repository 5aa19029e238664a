"""Engine seconds for N copies of a bench workload (parallm-325 unless --workload) in this process, the timed runs started at a shared
wall-clock moment, so engines on two GPUs can be timed alone and side by side (host contention).

usage: python scripts/rows_probe.py MODEL COPIES [START_AT_UNIX_SECONDS] [--workload=W] [--api]
The first run's slowest steps are compared with the same steps of the next run (what a fresh
process pays once); --api lists the CUDA runtime/driver calls of the first run by total host time
(needs torch: CUPTI sees MLX's calls too).
"""
import sys
import time

import mlxbatch  # noqa: F401  (BLAS preload before mlx)
from mlxbatch import bench, models
from mlxbatch.engine import Engine, Request, SamplingParams

flags = {a.split("=")[0]: a.partition("=")[2] for a in sys.argv[1:] if a.startswith("--")}
args = [a for a in sys.argv[1:] if not a.startswith("--")]
model, copies = args[0], int(args[1])
start_at = float(args[2]) if len(args) > 2 else 0.0
lm = models.load(model)
msgs, max_tokens = bench.WORKLOADS[flags.get("--workload") or "parallm-325"](None)
prompts = [list(lm.tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in msgs] * copies


def run() -> tuple[float, list]:
    """Seconds for every row, and per step (seconds, batch rows, cache columns)."""
    eng = Engine(lm)
    for i, p in enumerate(prompts):
        eng.add(Request(i, p, SamplingParams(max_tokens=max_tokens)))
    t, steps = time.perf_counter(), []
    while eng.has_work:
        s = time.perf_counter()
        eng.step()
        steps.append((time.perf_counter() - s, *_shape(eng._cache)))
    return time.perf_counter() - t, steps


def _shape(cache) -> tuple[int, int]:
    if cache is None:
        return 0, 0
    keys = cache.layers[0].keys
    return cache.batch, keys.shape[2] if keys is not None else 0


def slow_steps(first: list, later: list) -> None:
    """Where a fresh process's first run loses time: steps slower than the same step of a later run."""
    extra = [(a[0] - b[0], i, a[1], a[2]) for i, (a, b) in enumerate(zip(first, later))]
    over = sorted((e for e in extra if e[0] > 0.005), reverse=True)
    print(f"  first run: {len(over)} steps > 5 ms slower than in run0, {sum(e[0] for e in over):.3f} s in all;"
          f" all steps {sum(e[0] for e in extra):+.3f} s", flush=True)
    for d, i, b, cols in over[:10]:
        print(f"    step {i:4d} +{d * 1e3:7.1f} ms (batch {b}, {cols} cols)", flush=True)


def profiled_run():
    """The first run under the torch profiler: CUDA API calls on the host, summed by name."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        out = run()
    by: dict = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            c, d = by.get(e.name, (0, 0.0))
            by[e.name] = (c + 1, d + e.cpu_time_total)
    print("  first run, host calls by total time:", flush=True)
    for name, (c, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"    {d / 1e3:9.1f} ms {c:7d} calls  {name[:90]}", flush=True)
    return out


secs, first = profiled_run() if "--api" in flags else run()  # the process's first run: kernels and plans per shape built or loaded
print(f"{model} rows={len(prompts)} first run in this process {secs:.3f} s {len(first)} steps", flush=True)
if start_at:
    wait = start_at - time.time()
    print(f"waiting {wait:.1f} s for the shared start", flush=True)
    time.sleep(max(0.0, wait))
for i in range(3):
    secs, steps = run()
    print(f"{model} rows={len(prompts)} run{i} {secs:.3f} s {len(steps)} steps {secs / len(steps) * 1e3:.2f} ms/step",
          flush=True)
    if i == 0 and len(steps) == len(first):
        slow_steps(first, steps)
