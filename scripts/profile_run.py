"""Where a bench workload's wall time goes outside the engine: cProfile of `run_job`.

usage: python scripts/profile_run.py [MODEL] [WORKLOAD]   (after one untimed warm-up run)
"""
import cProfile
import gc
import pstats
import sys
import time

import mlxbatch  # noqa: F401  (BLAS preload before mlx)
from mlxbatch import bench, models

model = sys.argv[1] if len(sys.argv) > 1 else "random:tiny"
workload = sys.argv[2] if len(sys.argv) > 2 else "parallm-325"
lm = models.load(model)
messages, max_tokens = bench.WORKLOADS[workload](None)
gc.collect()
gc.freeze()
bench._run_mlxbatch(lm, messages, max_tokens, len(messages))
prof = cProfile.Profile()
t = time.perf_counter()
prof.enable()
result = bench._run_mlxbatch(lm, messages, max_tokens, len(messages))
prof.disable()
print(f"{model} {workload}: {result['tokens'] / result['seconds']:.0f} tok/s, {time.perf_counter() - t:.3f} s, "
      f"{result['decode_steps']} steps")
pstats.Stats(prof).sort_stats("tottime").print_stats(22)
