"""Stream N rows through run_job with the stand-in engine; print RSS growth in MB.

usage: python tests/memory_job.py N WORKDIR
"""
import resource
import sys
from pathlib import Path

import mlxbatch  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))
from standin import EchoEngine  # noqa: E402

from mlxbatch import models  # noqa: E402
from mlxbatch.job.spec import JobSpec  # noqa: E402
from mlxbatch.runner import run_job  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    n, work = int(sys.argv[1]), Path(sys.argv[2])
    src = work / "million.jsonl"
    with open(src, "wb") as f:  # written in chunks: the test itself stays small
        for start in range(0, n, 100_000):
            f.write(b"".join(b'{"id": "m%d", "prompt": "question %d"}\n' % (i, i) for i in range(start, min(n, start + 100_000))))
    lm = models.load("random:tiny")
    before = rss_mb()
    spec = JobSpec(input=src, output=work / "out", model="random:tiny", raw=True, batch_size=512).validate()
    stats = run_job(spec, lm=lm, engine_factory=EchoEngine)
    print(f"rows={stats.done} rss_before_mb={before:.1f} rss_after_mb={rss_mb():.1f} growth_mb={rss_mb() - before:.1f}")


main()
