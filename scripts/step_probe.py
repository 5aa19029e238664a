"""Where a decode step's time goes on this device, and which forward variant is fastest.

usage: python scripts/step_probe.py [MODEL] [--variants=a,b] [--workload=W] [--phases] [--kernels [--sequence=N]] [--fresh-runner]
Runs a bench workload's prompts (pre-tokenized; default parallm-325) through the
Engine under each variant of the model runner's ForwardOptions (one-query
attention as sdpa or matmuls, mlx-lm's layers or the fused/compiled ones,
shared prefixes stored once or copied), printing ms per step; --phases splits it into host graph building,
waiting for the device, the Python bookkeeping, and admission. With --kernels (needs torch), lists the CUDA
kernels of a few steady-state decode steps (CUPTI sees MLX's kernels too).
"""
import os
import sys
import time
from dataclasses import replace

import mlx.core as mx

import mlxbatch  # noqa: F401  (BLAS preload before mlx)
from mlxbatch import bench, models
from mlxbatch.engine import Engine, Request, SamplingParams, kvcache
from mlxbatch.engine.model_runner import ForwardOptions, device_backend

args = [a for a in sys.argv[1:] if not a.startswith("--")]
model = args[0] if args else "smollm2-135m"
opt = {a.split("=")[0]: a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--") and "=" in a}
lm = models.load(model)
msgs, max_tokens = bench.WORKLOADS[opt.get("--workload", "parallm-325")](None)
prompts = [list(lm.tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in msgs]
_B = device_backend()
VARIANTS = {
    "default": ForwardOptions.for_backend(_B),
    "copied-prefix": ForwardOptions.for_backend(_B, shared_prefix=False),
    "uncompiled": ForwardOptions.for_backend(_B, compiled_decode=False),
    "sdpa": ForwardOptions.for_backend(_B, one_query_matmul=False),
    "no-addmm": ForwardOptions.for_backend(_B, use_addmm=False),
    "mlx-lm-layers": ForwardOptions.for_backend(_B, fused=False),  # the forward 1B/8B ran before
    "exact": ForwardOptions.for_backend(_B, full_buffer=False),  # attend over used columns only
    "dense-q": ForwardOptions.for_backend(_B, dense_q=True),
    "strided-q": ForwardOptions.for_backend(_B, dense_q=False),
    "bucket32": ForwardOptions.for_backend(_B),  # kvcache.COARSE_STEP = 32 while it runs
}
chosen = opt.get("--variants", ",".join(VARIANTS)).split(",")
if "--min-shared" in opt:  # e.g. --min-shared=32: share parallm's system prompt too
    VARIANTS = {k: replace(v, min_shared_tokens=int(opt["--min-shared"])) for k, v in VARIANTS.items()}


def timed(eng: Engine, name: str, acc: dict) -> None:
    """Wrap an engine method so its wall time adds up in acc[name]."""
    fn = getattr(eng, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
    setattr(eng, name, wrapper)


def engine_run(label: str, phases: bool = False):
    kvcache.COARSE_STEP = 32 if label == "bucket32" else 64
    if "--fresh-runner" in sys.argv:  # as before engines reused the model's runner: fuse and trace again
        lm.runner = None
    eng = Engine(lm, max_batch=len(prompts), options=VARIANTS[label])
    acc: dict = {}
    if phases:
        for name in ("_decode", "_admit", "_compact", "_absorb"):
            timed(eng, name, acc)
        absorb = eng._absorb

        def waited(current):  # split the wait for the device out of _absorb
            t = time.perf_counter()
            mx.eval(current[0])
            acc["wait"] = acc.get("wait", 0.0) + time.perf_counter() - t
            return absorb(current)
        eng._absorb = waited
        real_async_eval = mx.async_eval

        def encoding(*arrays):  # where MLX turns the lazy graph into kernels (host time)
            t = time.perf_counter()
            real_async_eval(*arrays)
            acc["async_eval"] = acc.get("async_eval", 0.0) + time.perf_counter() - t
        mx.async_eval = encoding
    for i, p in enumerate(prompts):
        eng.add(Request(i, p, SamplingParams(max_tokens=max_tokens)))
    t = time.perf_counter()
    steps = 0
    while eng.has_work:
        eng.step()
        steps += 1
    secs = time.perf_counter() - t
    if phases:
        mx.async_eval = real_async_eval
    acc["kv_peak_mb"] = eng.stats.kv_peak_bytes / 1e6 * steps / 1e3  # printed per step below, so pre-scaled
    return secs, steps, eng.stats.generated_tokens, acc


def report(label: str, secs: float, steps: int, tokens: int, acc: dict) -> None:
    line = f"{label:30s} {tokens:6d} tok {secs:6.3f} s {tokens / secs:9.0f} tok/s {steps:4d} steps {secs / steps * 1e3:6.2f} ms/step"
    if acc:
        acc["_absorb"] = acc.get("_absorb", 0.0) - acc.get("wait", 0.0)
        line += "  | " + " ".join(f"{k.strip('_')} {v / steps * 1e3:.2f}" for k, v in sorted(acc.items()))
    print(line, flush=True)


print(f"{model} {lm.dtype} {mx.default_device()} {mx.device_info().get('device_name', '')} prompts={len(prompts)}")
env = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MLX_"))
for label in chosen:
    engine_run(label)  # warm-up: kernels and plans per shape
    report(f"{label} {env}", *engine_run(label))
    report(f"{label} {env}", *engine_run(label))
    if "--phases" in sys.argv:
        report(label + " (phases)", *engine_run(label, phases=True))

if "--kernels" in sys.argv:
    import torch
    from torch.profiler import ProfilerActivity, profile

    for label in chosen:
        eng = Engine(lm, max_batch=len(prompts), options=VARIANTS[label])
        for i, p in enumerate(prompts):
            eng.add(Request(i, p, SamplingParams(max_tokens=max_tokens)))
        for _ in range(20):
            eng.step()
        mx.synchronize()
        n = 10
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(n):
                eng.step()
            mx.synchronize()
            wall = time.perf_counter() - t
        torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e3
        print(f"\n== kernels, {label}: {len(kernels) / n:.0f} per step, GPU busy {busy / n:.2f} ms/step, wall {wall / n * 1e3:.2f} ms/step")
        by: dict = {}
        for e in kernels:
            c, d = by.get(e.name, (0, 0.0))
            by[e.name] = (c + 1, d + e.device_time)
        for name, (c, d) in sorted(by.items(), key=lambda kv: -kv[1][0])[:30]:
            print(f"  {c / n:6.1f}/step {d / c:8.1f} us  {name[:110]}")
        if "--sequence" in opt:  # the first kernels of the window in launch order (a layer's pattern)
            for e in sorted(kernels, key=lambda e: e.time_range.start)[:int(opt["--sequence"])]:
                print(f"    {e.device_time:7.1f} us  {e.name[:100]}")
