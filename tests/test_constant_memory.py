"""Memory stays flat on long jobs through the real engine (random:tiny, --max-tokens 1).

A child process streams N rows through `run_job` with the real Engine and prints
its current RSS (not the peak) after the warm-up rows and at the end, and rows/s.
Normal mode: 6,000 rows, growth after the first 2,000 < 8 MB. MLXBATCH_LONG=1:
200,000 rows, growth after the first 10,000 < 50 MB (issue 12's bound).
"""

import os
import re
import subprocess
import sys

import pytest
from conftest import LONG

NUM_ROWS, WARMUP_ROWS, MAX_GROWTH_MB = (200_000, 10_000, 50.0) if LONG else (6_000, 2_000, 8.0)

CHILD = r"""
import mlxbatch, sys, time
from pathlib import Path
from mlxbatch import models
from mlxbatch.job.spec import JobSpec
from mlxbatch.runner import run_job
from mlxbatch.types import SamplingParams

n, warm, work = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
src = work / "in.jsonl"
with open(src, "wb") as f:
    for s in range(0, n, 50_000):
        f.write(b"".join(b'{"id": "m%d", "prompt": "question %d"}\n' % (i, i) for i in range(s, min(n, s + 50_000))))

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6

mark = {}
def progress(s):
    if "rss" not in mark and s.done_now >= warm:
        mark.update(rss=rss_mb(), t=time.monotonic(), rows=s.done_now)

spec = JobSpec(input=src, output=work / "out", model="random:tiny", sampling=SamplingParams(max_tokens=1)).validate()
stats = run_job(spec, lm=models.load("random:tiny"), progress=progress)
rate = (stats.done_now - mark["rows"]) / (time.monotonic() - mark["t"])
print(f"rows={stats.done} rss_after_warmup_mb={mark['rss']:.1f} rss_end_mb={rss_mb():.1f} "
      f"growth_mb={rss_mb() - mark['rss']:.1f} rows_per_s={rate:.0f}")
"""


@pytest.mark.slow
def test_rss_flat_through_the_real_engine(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(NUM_ROWS), str(WARMUP_ROWS), str(tmp_path)],
                          capture_output=True, text=True, timeout=3600, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    print(line)
    growth = float(re.search(r"growth_mb=(-?[\d.]+)", line).group(1))
    assert f"rows={NUM_ROWS}" in line and growth < MAX_GROWTH_MB, line
