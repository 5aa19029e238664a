"""`mlxbatch serve` against `mlx_lm.server` measured by GuideLLM, vLLM's load generator.

The same model folder and the same synthetic requests for both servers (serve_bench.py's
materialize and Server), GuideLLM's `concurrent` profile at each level, a local tokenizer (the
folder's own; nothing is fetched). Prints a table with mlxbatch/mlx-lm ratios; keeps GuideLLM's
raw JSON per run.

    python scripts/guidellm_bench.py --model random:tiny --small                 # this CPU
    python scripts/guidellm_bench.py --model random:llama-1b --concurrency 1,8,64,256 \
        --requests 1000 --out /tmp/gl                                              # the GPU

Output tok/s is generated tokens over the run's duration (GuideLLM's own output_tokens_per_second
is a mean of per-interval rates).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import ROOT, Server, _free_port, materialize, stream_chat  # noqa: E402


def guidellm(py: str, port: int, model: str, tokenizer: Path, *, concurrency: int, requests: int,
             prompt_tokens: int, output_tokens: int, out: Path) -> dict:
    """One GuideLLM run at one concurrency; its figures from the JSON it writes."""
    data = {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "prompt_tokens_stdev": prompt_tokens // 4, "prompt_tokens_min": 8,
            "prompt_tokens_max": prompt_tokens * 2}
    cmd = [*shlex.split(py), "-m", "guidellm", "benchmark", "run", "--target", f"http://127.0.0.1:{port}",
           "--model", model, "--processor", str(tokenizer), "--data", json.dumps(data),
           "--rate-type", "concurrent", "--rate", str(concurrency), "--max-requests", str(requests),
           "--output-path", str(out), "--disable-progress", "--disable-console-outputs", "--random-seed", "0"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=1800)
    b = json.loads(out.read_text())["benchmarks"][0]
    m = b["metrics"]

    def stat(key: str, p: str) -> float:
        s = m[key]["successful"]
        return round(s["percentiles"][p] if p != "mean" else s["mean"], 2)

    done = m["output_token_count"]["successful"]
    return {"requests": done["count"], "errors": m["output_token_count"]["errored"]["count"],
            "duration_s": round(b["duration"], 2), "req_s": round(done["count"] / b["duration"], 2),
            "out_tok_s": round(done["total_sum"] / b["duration"], 1),
            "ttft_p50_ms": stat("time_to_first_token_ms", "p50"), "ttft_p99_ms": stat("time_to_first_token_ms", "p99"),
            "itl_p50_ms": stat("inter_token_latency_ms", "p50"), "itl_p99_ms": stat("inter_token_latency_ms", "p99")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", default="1,8,64,256")
    ap.add_argument("--requests", default="0", help="requests per level, one or one per level (0: max(4c, 64))")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--peers", default="mlxbatch,mlx-lm")
    ap.add_argument("--guidellm-python", default=sys.executable, help="the command of a Python that has guidellm 0.3 (e.g. 'env PYTHONPATH=... python3')")
    ap.add_argument("--small", action="store_true", help="tiny counts, for a CPU smoke run")
    ap.add_argument("--out", type=Path, default=None, help="folder for GuideLLM's raw JSON and results.json")
    args = ap.parse_args()
    if args.small:
        args.concurrency, args.requests = "1,4", "12"
        args.prompt_tokens, args.output_tokens = 64, 16
    levels = [int(x) for x in args.concurrency.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    counts = dict(zip(levels, counts if len(counts) == len(levels) else counts[:1] * len(levels)))
    work = Path(tempfile.mkdtemp(prefix="guidellm-bench-"))
    out_dir = args.out or work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    from mlxbatch import models

    dtype = models.resolve_dtype(args.dtype)
    folder = materialize(args.model, dtype, work / "model")
    model_id = str(folder)
    py = sys.executable
    cmds = {
        "mlxbatch": [py, "-m", "mlxbatch", "serve", "--model", model_id, "--data", str(work / "data"),
                     "--max-queue", "100000"],
        "mlx-lm": [py, "-m", "mlx_lm", "server", "--model", model_id, "--decode-concurrency", str(max(levels)),
                   "--prompt-concurrency", str(max(levels)), "--log-level", "WARNING"],
    }
    # mlx_lm.server's /v1/models (GuideLLM's first call) fails when the hub cache folder is missing
    (work / "hf").mkdir()
    os.environ.setdefault("HF_HUB_CACHE", str(work / "hf"))
    res = {"model": args.model, "dtype": dtype, "backend": models.backend(), "prompt_tokens": args.prompt_tokens,
           "output_tokens": args.output_tokens, "runs": {}}
    for peer in args.peers.split(","):
        port = _free_port()
        srv = Server(peer, [*cmds[peer], "--port", str(port)], port, out_dir / f"{peer}.log")
        try:
            stream_chat(port, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4}, model_id)
            for c in levels:
                n = counts[c] or max(4 * c, 64)
                r = guidellm(args.guidellm_python, port, model_id, folder, concurrency=c, requests=n, prompt_tokens=args.prompt_tokens,
                             output_tokens=args.output_tokens, out=out_dir / f"{peer}-c{c}.json")
                res["runs"].setdefault(str(c), {})[peer] = r
                print(f"  {peer:9s} c={c:<3d} {r}", file=sys.stderr, flush=True)
        finally:
            srv.stop()
    (out_dir / "results.json").write_text(json.dumps(res, indent=1))
    print(table(res))


def table(res: dict) -> str:
    lines = [f"GuideLLM (concurrent): {res['model']} {res['dtype']} on {res['backend']}, "
             f"~{res['prompt_tokens']} prompt / {res['output_tokens']} output tokens",
             f"{'c':>4s} {'server':9s} {'reqs':>5s} {'err':>4s} {'req/s':>7s} {'tok/s':>9s} {'TTFT p50':>9s} "
             f"{'p99':>8s} {'ITL p50':>8s} {'p99':>7s} (ms)"]
    for c, peers in res["runs"].items():
        for peer, r in peers.items():
            lines.append(f"{c:>4s} {peer:9s} {r['requests']:5d} {r['errors']:4d} {r['req_s']:7.2f} {r['out_tok_s']:9.1f} "
                         f"{r['ttft_p50_ms']:9.1f} {r['ttft_p99_ms']:8.1f} {r['itl_p50_ms']:8.2f} {r['itl_p99_ms']:7.2f}")
        if {"mlxbatch", "mlx-lm"} <= set(peers):
            a, b = peers["mlxbatch"], peers["mlx-lm"]
            lines.append(f"{'':>4s} {'ratio':9s} {'':5s} {'':4s} {a['req_s'] / max(b['req_s'], 1e-9):6.2f}x "
                         f"{a['out_tok_s'] / max(b['out_tok_s'], 1e-9):8.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
