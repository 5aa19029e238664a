"""`mlxbatch serve` against `mlx_lm.server` over HTTP: the same model folder, the same requests.

Starts each server in turn (on 127.0.0.1, free ports), drives it with N client threads at each
concurrency (streamed chat requests; ShareGPT-like mixed prompt and output lengths generated
here, and a variant where every request shares one long system prompt), and prints requests/s,
output tok/s, TTFT p50/p99 and ITL p50/p99 per server with mlxbatch/mlx-lm ratios. Then, on
mlxbatch alone (mlx_lm.server has no Batch API), a chat request's TTFT with the server idle and
while a big batch runs.

    python scripts/serve_bench.py --model random:tiny --small          # this CPU, a minute or two
    python scripts/serve_bench.py --model random:llama-1b --batch-rows 20000 --json out.json

The model is written once to a plain MLX folder in the benchmark dtype (weights as stored, no
quantization), which both servers load, so neither converts anything the other does not.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the of and to in is was for on that with as by at from his her this which be are an or had "
         "ocean river market system history science music letter garden engine window morning").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def materialize(spec: str, dtype: str, dest: Path) -> Path:
    """The model as a plain MLX folder (config, weights in the loaded dtype, tokenizer) both servers read."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxbatch import models

    lm = models.load(spec, dtype=dtype)
    dest.mkdir(parents=True, exist_ok=True)
    if lm.is_random:
        config, tok_dir = models.random_config(spec.split(":", 1)[1]), models.random_tokenizer_dir()
    else:
        config, tok_dir = json.loads((lm.path / "config.json").read_text()), lm.path
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    (dest / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(dest / "model.safetensors"), dict(tree_flatten(lm.model.parameters())))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, dest / name)
    return dest


def workload(n: int, *, rng: random.Random, shared_system: str | None, max_out: int, max_words: int) -> list[dict]:
    """Mixed lengths like ShareGPT's: log-normal prompt words and output tokens."""
    out = []
    for _ in range(n):
        words = max(4, min(max_words, int(rng.lognormvariate(3.6, 0.9))))
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        msgs = ([{"role": "system", "content": shared_system}] if shared_system else []) + \
            [{"role": "user", "content": text}]
        out.append({"messages": msgs, "max_tokens": max(4, min(max_out, int(rng.lognormvariate(4.2, 0.7))))})
    return out


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, log: Path):
        self.name, self.port = name, port
        self.log = open(log, "wb")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited; see {log}")
            try:
                if request(port, "GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise SystemExit(f"{name} did not start; see {log}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def request(port: int, method: str, path: str, body=None, *, headers=None) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    h = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=json.dumps(body) if isinstance(body, dict) else body, headers=h)
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        return r.status, json.loads(raw)
    except ValueError:
        return r.status, raw


def stream_chat(port: int, body: dict, model: str) -> dict:
    """One streamed chat request: time to first content, gaps between content chunks, output tokens."""
    body = {**body, "model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    times, usage = [], None
    while True:
        line = r.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            if line.strip() == b"data: [DONE]":
                break
            continue
        data = json.loads(line[6:])
        if data.get("usage"):
            usage = data["usage"]
        for ch in data.get("choices") or ():
            if (ch.get("delta") or {}).get("content"):
                times.append(time.perf_counter())
    conn.close()
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(times)
    return {"ttft": (times[0] - t0) if times else end - t0, "itl": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens, "seconds": end - t0}


def drive(port: int, model: str, reqs: list[dict], concurrency: int) -> dict:
    results, lock, it = [], threading.Lock(), iter(range(len(reqs)))

    def worker():
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            try:
                res = stream_chat(port, reqs[i], model)
            except OSError as exc:  # e.g. a server whose listen backlog overflows resets connections
                res = {"error": repr(exc)}
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    failed = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "failed": len(failed), "seconds": round(wall, 3), "req_s": round(len(results) / wall, 3),
            "out_tok_s": round(tokens / wall, 1), "output_tokens": tokens,
            "ttft_p50_ms": round(_pct(ttft, 50) * 1e3, 1), "ttft_p99_ms": round(_pct(ttft, 99) * 1e3, 1),
            "itl_p50_ms": round(_pct(itl, 50) * 1e3, 2), "itl_p99_ms": round(_pct(itl, 99) * 1e3, 2)}


ENGINE_METRICS = ("steps", "step_seconds", "sync_seconds", "slow_steps", "compiles", "compile_steps",
                  "prefill_step_tokens", "prefill_steps", "generated_tokens")


def engine_metrics(port: int) -> dict | None:
    """mlxbatch serve's engine counters from /metrics (None for a server without them)."""
    try:
        status, body = request(port, "GET", "/metrics")
    except OSError:
        return None
    if status != 200 or not isinstance(body, bytes):
        return None
    values = {}
    for line in body.decode().splitlines():
        if line.startswith("mlxbatch_"):
            name, _, v = line.partition(" ")
            values[name.removeprefix("mlxbatch_").removeprefix("engine_").removesuffix("_total")] = float(v)
    return {k: values[k] for k in ENGINE_METRICS if k in values} or None


def step_profile(before: dict | None, after: dict | None) -> dict | None:
    """Where a level's engine steps went: ms per step (host and device wait), compiles, prefill per step."""
    if not before or not after:
        return None
    d = {k: after.get(k, 0) - before.get(k, 0) for k in ENGINE_METRICS}
    steps = max(d["steps"], 1)
    return {"steps": int(d["steps"]), "step_ms": round(1e3 * d["step_seconds"] / steps, 2),
            "host_ms": round(1e3 * (d["step_seconds"] - d["sync_seconds"]) / steps, 2),
            "sync_ms": round(1e3 * d["sync_seconds"] / steps, 2), "slow_steps": int(d["slow_steps"]),
            "compiles": int(d["compiles"]), "compile_steps": int(d["compile_steps"]),
            "prefill_tokens_per_prefill_step": round(d["prefill_step_tokens"] / max(d["prefill_steps"], 1), 1),
            "prefill_steps": int(d["prefill_steps"]), "tokens_per_step": round(d["generated_tokens"] / steps, 2),
            "engine_busy_share": None}


def _pct(xs: list, p: float) -> float:
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ttft_under_batch(port: int, model: str, rows: int, probes: int, data: Path) -> dict:
    """A short chat request's TTFT idle, then while a `rows`-row batch runs (cancelled after)."""
    probe = {"messages": [{"role": "user", "content": "Say something short."}], "max_tokens": 8}
    idle = [stream_chat(port, probe, model)["ttft"] for _ in range(probes)]
    rng = random.Random(1)
    path = data / "bench-batch.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 64)))
            f.write(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
                "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 64}}) + "\n")
    boundary = "mlxbatchbench"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n"
               "Content-Type: application/jsonl\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    _, f = request(port, "POST", "/v1/files", payload, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    _, b = request(port, "POST", "/v1/batches", {"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                                 "completion_window": "24h"})
    while request(port, "GET", f"/v1/batches/{b['id']}")[1]["request_counts"]["completed"] < 1:
        time.sleep(0.2)
    busy = [stream_chat(port, probe, model)["ttft"] for _ in range(probes)]
    counts = request(port, "GET", f"/v1/batches/{b['id']}")[1]["request_counts"]
    request(port, "POST", f"/v1/batches/{b['id']}/cancel")
    return {"batch_rows": rows, "probes": probes, "batch_rows_done_while_probing": counts["completed"],
            "idle_ttft_p50_ms": round(statistics.median(idle) * 1e3, 1),
            "busy_ttft_p50_ms": round(statistics.median(busy) * 1e3, 1),
            "busy_ttft_max_ms": round(max(busy) * 1e3, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(2c, 16))")
    ap.add_argument("--max-out", type=int, default=256)
    ap.add_argument("--batch-rows", type=int, default=20000, help="rows of the batch behind the TTFT probe (0: skip)")
    ap.add_argument("--peers", default="mlxbatch,mlx-lm")
    ap.add_argument("--variants", default="mixed,shared-system")
    ap.add_argument("--small", action="store_true", help="tiny counts, for a CPU smoke run")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    args = ap.parse_args()
    if args.small:
        args.concurrency, args.requests, args.max_out = args.concurrency if args.concurrency != "1,8,32,64" \
            else "1,8", args.requests or 8, min(args.max_out, 32)
        args.batch_rows = min(args.batch_rows, 300)
    levels = [int(x) for x in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    from mlxbatch import models

    dtype = models.resolve_dtype(args.dtype)
    folder = materialize(args.model, dtype, work / "model")
    model_id = str(folder)
    rng = random.Random(0)
    system = " ".join(rng.choice(WORDS) for _ in range(300))
    out = {"model": args.model, "dtype": dtype, "backend": models.backend(), "levels": levels, "runs": {}}
    py = sys.executable
    cmds = {
        "mlxbatch": [py, "-m", "mlxbatch", "serve", "--model", model_id, "--data", str(work / "data"),
                     "--max-queue", "100000"],
        "mlx-lm": [py, "-m", "mlx_lm", "server", "--model", model_id, "--decode-concurrency", str(max(levels)),
                   "--log-level", "WARNING"],
    }
    for peer in args.peers.split(","):
        port = _free_port()
        srv = Server(peer, [*cmds[peer], "--port", str(port)], port, work / f"{peer}.log")
        try:
            stream_chat(port, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4}, model_id)
            for variant, shared in (("mixed", None), ("shared-system", system)):
                if variant not in args.variants.split(","):
                    continue
                for c in levels:
                    n = args.requests or max(2 * c, 16)
                    reqs = workload(n, rng=random.Random(c), shared_system=shared, max_out=args.max_out,
                                    max_words=400 if not args.small else 60)
                    before = engine_metrics(port) if peer == "mlxbatch" else None
                    r = drive(port, model_id, reqs, c)
                    prof = step_profile(before, engine_metrics(port) if before else None)
                    if prof:
                        prof["engine_busy_share"] = round(prof["steps"] * prof["step_ms"] / 1e3 / r["seconds"], 3)
                        r["engine"] = prof
                    out["runs"].setdefault(variant, {}).setdefault(str(c), {})[peer] = r
                    print(f"  {peer:9s} {variant:13s} c={c:<3d} {r['req_s']:7.2f} req/s {r['out_tok_s']:9.1f} tok/s "
                          f"TTFT p50 {r['ttft_p50_ms']:8.1f} ms", file=sys.stderr, flush=True)
                    if prof:
                        print(f"            engine: {_profile_line(prof)}", file=sys.stderr, flush=True)
            if peer == "mlxbatch" and args.batch_rows:
                out["ttft_under_batch"] = ttft_under_batch(port, model_id, args.batch_rows, 5, work)
        finally:
            srv.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(table(out))
    shutil.rmtree(work, ignore_errors=True)


def _profile_line(p: dict) -> str:
    return (f"{p['steps']} steps, {p['step_ms']} ms/step ({p['host_ms']} host, {p['sync_ms']} device wait), "
            f"{p['tokens_per_step']} tok/step, busy {p['engine_busy_share']:.0%}, {p['compiles']} compiles in "
            f"{p['compile_steps']} steps, {p['slow_steps']} steps > 200 ms, prefill "
            f"{p['prefill_tokens_per_prefill_step']} tok/step in {p['prefill_steps']} steps")


def table(out: dict) -> str:
    lines = [f"serve bench: {out['model']} {out['dtype']} on {out['backend']}",
             f"{'variant':13s} {'c':>3s} {'server':9s} {'req/s':>8s} {'tok/s':>9s} {'TTFT p50':>9s} {'p99':>9s} "
             f"{'ITL p50':>8s} {'p99':>8s} {'failed':>6s} (ms)"]
    for variant, levels in out["runs"].items():
        for c, peers in levels.items():
            for peer, r in peers.items():
                lines.append(f"{variant:13s} {c:>3s} {peer:9s} {r['req_s']:8.2f} {r['out_tok_s']:9.1f} "
                             f"{r['ttft_p50_ms']:9.1f} {r['ttft_p99_ms']:9.1f} {r['itl_p50_ms']:8.2f} {r['itl_p99_ms']:8.2f} {r.get('failed', 0):6d}")
            if peers.get("mlxbatch", {}).get("engine"):
                lines.append(f"{'':13s} {'':>3s} {'engine':9s} {_profile_line(peers['mlxbatch']['engine'])}")
            if {"mlxbatch", "mlx-lm"} <= set(peers):
                a, b = peers["mlxbatch"], peers["mlx-lm"]
                lines.append(f"{'':13s} {'':>3s} {'ratio':9s} {a['req_s'] / max(b['req_s'], 1e-9):8.2f}x "
                             f"{a['out_tok_s'] / max(b['out_tok_s'], 1e-9):8.2f}x "
                             f"{a['ttft_p50_ms'] / max(b['ttft_p50_ms'], 1e-9):8.2f}x (TTFT: lower is better)")
    if "ttft_under_batch" in out:
        t = out["ttft_under_batch"]
        lines.append(f"chat TTFT p50: idle {t['idle_ttft_p50_ms']} ms, while a {t['batch_rows']:,}-row batch runs "
                     f"{t['busy_ttft_p50_ms']} ms (max {t['busy_ttft_max_ms']} ms; {t['batch_rows_done_while_probing']} "
                     "batch rows done by then)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
