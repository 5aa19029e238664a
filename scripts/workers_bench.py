"""`--workers 2` vs `--workers 1`: parallm-325 x 8 copies (2,600 rows) through `python -m mlxbatch run`.

usage: python scripts/workers_bench.py [--model random:llama-1b] [--max-tokens 100] [--copies 8]
                                       [--rows N] [--workers 1,2] [--dtype auto] [--batch-size N] [--warm-up]
quick CPU check: python scripts/workers_bench.py --model random:tiny --copies 1 --rows 200 --max-tokens 16

Each run starts fresh (new output folder, new local Ray) and is timed end to end: Ray's start, every
worker loading the model, the job, the shutdown. Its job clock (checkpoint.json's seconds: from the
workers being up to the last commit) is shown too, and each worker's busy seconds (its calls adding
and stepping rows; the rest of the job clock it waited on the driver). Generated tokens are read from results.jsonl.
Prints one line per run and the ratios of the median runs last; writes $OUT/workers_bench.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

import mlxbatch  # noqa: F401  (BLAS preload before mlx)
from mlxbatch.bench import WORKLOADS
from mlxbatch.output.checkpoint import read_state


def write_rows(path: Path, copies: int, limit: int | None) -> int:
    """parallm-325's chats, `copies` times, each row with its own id."""
    chats, _ = WORKLOADS["parallm-325"](None)
    rows = [{"id": f"c{c}-{i}", "messages": m} for c in range(copies) for i, m in enumerate(chats)][:limit]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return len(rows)


def run_once(src: Path, out: Path, workers: int, args) -> dict:
    cmd = [sys.executable, "-m", "mlxbatch", "run", str(src), "-o", str(out), "--model", args.model,
           "--max-tokens", str(args.max_tokens), "--workers", str(workers), "--dtype", args.dtype, "-q"]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    log = out.with_suffix(".log")
    started = time.monotonic()
    with open(log, "w") as err:
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err).returncode
    seconds = time.monotonic() - started
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{log.read_text()[-2000:]}")
    return summarize(out, workers, seconds)


def summarize(out: Path, workers: int, seconds: float) -> dict:
    records = [orjson.loads(line) for line in (out / "results.jsonl").read_bytes().splitlines()]
    tokens = sum(r["usage"]["completion_tokens"] for r in records)
    job_s = read_state(out)["seconds"]  # the job's clock: from the workers being up to the last commit
    last = orjson.loads((out / "metrics.jsonl").read_bytes().splitlines()[-1])  # the run's totals
    return {"workers": workers, "rows": len(records), "generated_tokens": tokens,
            "seconds": round(seconds, 2), "rows_s": round(len(records) / seconds, 1), "tok_s": round(tokens / seconds, 1),
            "job_seconds": job_s, "job_rows_s": round(len(records) / job_s, 1), "job_tok_s": round(tokens / job_s, 1),
            "busy_s": [w["busy_s"] for w in last["workers"]], "done": [w["done"] for w in last["workers"]]}


def median_run(runs: list[dict]) -> dict:
    """The median run by job-clock tok/s (the upper middle of an even count)."""
    return sorted(runs, key=lambda r: r["job_tok_s"])[len(runs) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-1b")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--rows", type=int, default=None, help="only the first N rows (a quick check)")
    p.add_argument("--workers", default="1,2", help="worker counts to run, in order")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warm-up", action="store_true", help="one uncounted one-worker run first")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    src = work / "parallm.jsonl"
    num_rows = write_rows(src, args.copies, args.rows)
    print(f"{num_rows:,} rows (parallm-325 x {args.copies}), {args.model}, max_tokens {args.max_tokens}; in {work}")
    if args.warm_up:  # a fresh machine builds its CUDA kernels on first use (cached on disk after)
        run_once(src, work / "warm-up", 1, args)
        print("warm-up run done (not counted)")
    # A folder per run: a repeated worker count in a reused folder would find its job complete.
    runs = [run_once(src, work / f"run{i}-w{n}", int(n), args) for i, n in enumerate(args.workers.split(","))]
    print(f"{'workers':>7} | end to end: {'s':>6} {'rows/s':>8} {'tok/s':>9} | job clock: {'s':>6} {'rows/s':>8} "
          f"{'tok/s':>9} | each worker's busy s (rows)")
    for r in runs:
        busy = ", ".join(f"{b:.2f} ({d})" for b, d in zip(r["busy_s"], r["done"]))
        print(f"{r['workers']:>7} | {'':>11} {r['seconds']:>6.1f} {r['rows_s']:>8.1f} {r['tok_s']:>9.0f} | "
              f"{'':>10} {r['job_seconds']:>6.2f} {r['job_rows_s']:>8.1f} {r['job_tok_s']:>9.0f} | {busy}")
    result = {"model": args.model, "max_tokens": args.max_tokens, "rows": num_rows, "dtype": args.dtype, "runs": runs}
    few, many = min(r["workers"] for r in runs), max(r["workers"] for r in runs)
    if few < many:  # each system's median run (by the job clock) when a count ran more than once
        a, b = (median_run([r for r in runs if r["workers"] == n]) for n in (few, many))
        result["ratio"] = round(b["tok_s"] / a["tok_s"], 3)
        result["ratio_job_clock"] = round(b["job_tok_s"] / a["job_tok_s"], 3)
        print(f"{many} vs {few} workers (median runs): {result['ratio']:.2f}x end to end, "
              f"{result['ratio_job_clock']:.2f}x on the job clock (workers up to last commit)")
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"]) / "workers_bench.json"
        dest.write_text(json.dumps(result, indent=2))
        print(f"wrote {dest}")


if __name__ == "__main__":
    main()
