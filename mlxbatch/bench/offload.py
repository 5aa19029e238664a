"""`mlxbatch bench offload`: a model under a memory cap (layers streamed) against the same model resident.

Owns: the workload (parallm prompts through a model written as a safetensors folder), the two
runs (resident, then under `--max-memory-gb`), their tok/s, peak MLX memory and outputs (greedy:
equal or not), the measured read bandwidths (plain reads of the shard files; `mx.load` reads of
layers as a step makes them) and the bound they imply: if a run did nothing but read its streamed
bytes at the measured rate it would take bytes / bandwidth seconds, so the bound is tokens over
that and the ratio is the share of the run the reads kept busy. Does not own: the engine, the plan.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import orjson

from mlxbatch import models
from mlxbatch.engine.streaming import file_read_bandwidth
from mlxbatch.job.spec import JobSpec
from mlxbatch.types import SamplingParams


def _spec(messages, tmp: Path, model: str, max_tokens: int, batch: int | None, cap: float | None, tag: str) -> JobSpec:
    path = tmp / "bench.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"id": i, "messages": m}) + b"\n" for i, m in enumerate(messages)))
    return JobSpec(input=path, output=tmp / tag, model=model, sampling=SamplingParams(max_tokens=max_tokens),
                   batch_size=batch, commit_seconds=5.0, max_memory_gb=cap, restart=True).validate()


def _timed(spec: JobSpec, lm) -> dict:
    from mlxbatch.runner import run_job

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = lm.offload.streamer.bytes_read if lm.offload is not None and lm.offload.streamer else 0
    t = time.perf_counter()
    stats = run_job(spec, lm=lm)
    secs = time.perf_counter() - t
    e = stats.engine
    outputs = {r["id"]: r["output"] for r in map(orjson.loads, (spec.output_dir / "results.jsonl").read_bytes().splitlines())}
    return {"tokens": e.generated_tokens, "seconds": secs, "tok_s": e.generated_tokens / secs, "steps": e.steps,
            "rows_in_flight_peak": e.active_peak, "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
            "streamed_gb": round((e.streamed_bytes - before) / 1e9, 3), "stream_wait_s": round(e.stream_wait_s, 3),
            "outputs": outputs}


def run_offload_bench(messages, *, model: str, cap_gb: float, max_tokens: int, batch_size: int | None,
                      dtype: str, peers: list[str], as_json: bool) -> str:
    from mlxbatch.models import streamed

    chosen = models.resolve_dtype(dtype)
    folder = streamed.materialize_random(model, chosen) if model.startswith("random:") else Path(model)
    files = sorted(folder.glob("model*.safetensors"))
    file_bw = file_read_bandwidth(files)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "none" not in peers:  # the resident run: the same folder, no cap
            spec = _spec(messages, Path(tmp), str(folder), max_tokens, batch_size, None, "resident")
            lm = models.load(spec.model, dtype=dtype, ignore_eos=True)
            _timed(spec, lm)  # untimed: kernels built once
            results["resident"] = _timed(spec, lm)
            del lm
            gc.collect()
            mx.clear_cache()
        spec = _spec(messages, Path(tmp), str(folder), max_tokens, batch_size, cap_gb, "streamed")
        spec = JobSpec(**{**spec.__dict__, "ignore_eos": True})
        lm = streamed.load(spec)
        plan = lm.offload.plan
        _timed(spec, lm)
        results["streamed"] = _timed(spec, lm)
    return _report(model, chosen, cap_gb, plan, file_bw, results, as_json)


def _report(model, dtype, cap_gb, plan, file_bw, results, as_json) -> str:
    s = results["streamed"]
    load_bw = plan.bandwidth or 0.0
    for name, bw in (("file_read", file_bw), ("layer_load", load_bw)):
        busy = s["streamed_gb"] * 1e9 / bw if bw else 0.0
        s[f"bound_tok_s_{name}"] = round(s["tokens"] / busy, 2) if busy else None
        s[f"ratio_{name}"] = round(busy / s["seconds"], 3) if busy else None
    s["streamed_gb_per_step"] = round(plan.streamed_bytes / 1e9, 3)
    r = results.get("resident")
    same = r is not None and r["outputs"] == s["outputs"]
    summary = {"workload": "offload", "model": model, "dtype": dtype, "cap_gb": cap_gb, "plan": plan.describe(),
               "weights_gb": round(plan.sizes.weight_bytes / 1e9, 3), "resident_gb": round(plan.resident_bytes / 1e9, 3),
               "streamed_layers": len(plan.streamed), "block_rows": plan.max_batch,
               "file_read_gb_s": round(file_bw / 1e9, 2), "layer_load_gb_s": round(load_bw / 1e9, 2),
               "outputs_equal": same if r is not None else None, "device": f"{models.backend()} {mx.default_device()}",
               "versions": {"mlx": mx.__version__}, "results": {k: {x: y for x, y in v.items() if x != "outputs"}
                                                                 for k, v in results.items()}}
    if as_json:
        return json.dumps(summary, default=str)
    lines = [summary["plan"],
             f"read bandwidth: {file_bw / 1e9:.2f} GB/s plain file reads, {load_bw / 1e9:.2f} GB/s mx.load of layers",
             f"{'run':10s} {'tok/s':>9s} {'steps':>6s} {'rows':>5s} {'peak GB':>8s} {'streamed GB':>12s} "
             f"{'bound tok/s (file/load)':>24s} {'ratio (file/load)':>18s}"]
    for name, x in results.items():
        bound = f"{x.get('bound_tok_s_file_read') or 0:,.1f} / {x.get('bound_tok_s_layer_load') or 0:,.1f}" if name == "streamed" else "-"
        ratio = f"{x.get('ratio_file_read') or 0:.2f} / {x.get('ratio_layer_load') or 0:.2f}" if name == "streamed" else "-"
        lines.append(f"{name:10s} {x['tok_s']:>9,.1f} {x['steps']:>6} {x['rows_in_flight_peak']:>5} "
                     f"{x['peak_memory_gb']:>8.3f} {x['streamed_gb']:>12.2f} {bound:>24s} {ratio:>18s}")
    if r is not None:
        lines.append(f"greedy outputs equal to the resident run: {'yes' if same else 'NO'}")
    return "\n".join(lines)
