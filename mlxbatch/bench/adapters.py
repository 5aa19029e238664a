"""`mlxbatch bench adapters`: several LoRA adapters in one batch vs one run per adapter.

Owns: the `adapters` workload (4 random-weight LoRA adapters of rank 16 on every linear layer,
written as mlx_lm.lora writes them; the first 256 parallm prompts under each) and its systems:
mlxbatch with every adapter mixed in one job (`--each-adapter`), mlxbatch run once per adapter,
mlxbatch on the base model for the same rows (what the mixed batch is measured against), and
mlx-lm's `batch_generate` once per adapter (after `mlx_lm.tuner.utils.load_adapters`, the function
`load(..., adapter_path=...)` calls, on the same in-memory base weights). Does not own: the other
workloads or the peers' shared helpers (bench/__init__.py).
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import orjson

from mlxbatch import models
from mlxbatch.job.spec import JobSpec
from mlxbatch.types import SamplingParams

NUM_ADAPTERS, RANK, PROMPTS_PER_ADAPTER = 4, 16, 256
_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_random_adapter(folder: Path, model: nn.Module, *, rank: int, seed: int) -> Path:
    """An mlx-lm adapter folder with random A and B (B not zero, so the update is real work)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = mx.random.key(seed)
    dtype = next(v.dtype for v in model.model.layers[0].self_attn.q_proj.parameters().values())
    weights = {}
    for i, layer in enumerate(model.model.layers):
        modules = dict(layer.named_modules())
        for name in _KEYS:
            out_dims, in_dims = modules[name].weight.shape
            ka, kb, key = mx.random.split(key, 3)
            p = f"model.layers.{i}.{name}"
            weights[p + ".lora_a"] = (mx.random.uniform(-1, 1, (in_dims, rank), key=ka) / in_dims ** 0.5).astype(dtype)
            weights[p + ".lora_b"] = (mx.random.normal((rank, out_dims), key=kb) * 0.01).astype(dtype)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": -1,
              "lora_parameters": {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": list(_KEYS)}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _job(lm, messages, tmp: Path, max_tokens: int, batch: int, *, adapter=(), each: bool = False,
         copies: int = 1) -> dict:
    from mlxbatch.runner import run_job

    path = tmp / "bench.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"id": f"{c}-{i}", "messages": m}) + b"\n"
                              for c in range(copies) for i, m in enumerate(messages)))
    spec = JobSpec(input=path, output=tmp / "out", model=lm.name, sampling=SamplingParams(max_tokens=max_tokens),
                   batch_size=batch, commit_seconds=5.0, restart=True, adapter=adapter, each_adapter=each).validate()
    t = time.perf_counter()
    stats = run_job(spec, lm=lm)
    return {"tokens": stats.engine.generated_tokens, "seconds": time.perf_counter() - t,
            "forward": stats.engine.forward, "decode_steps": stats.engine.steps}


def _sum(runs: list[dict]) -> dict:
    return {"tokens": sum(r["tokens"] for r in runs), "seconds": sum(r["seconds"] for r in runs),
            "per_adapter_seconds": [round(r["seconds"], 2) for r in runs],
            **({"forward": runs[0]["forward"]} if "forward" in runs[0] else {})}


def _strip_mlx_lm_lora(model: nn.Module) -> None:
    """Undo `load_adapters`: every mlx-lm LoRA layer back to its base layer."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    for layer in model.model.layers:
        base = [(k, m.linear) for k, m in layer.named_modules() if isinstance(m, LoRALinear)]
        if base:
            layer.update_modules(tree_unflatten(base))


def _mlx_lm_per_adapter(lm, prompts, folders, max_tokens: int, batch: int, run_mlx_lm) -> dict:
    from mlx_lm.tuner.utils import load_adapters

    runs = []
    for folder in folders:
        t = time.perf_counter()
        load_adapters(lm.model, str(folder))
        loaded = time.perf_counter() - t
        try:
            r = run_mlx_lm(lm, prompts, max_tokens, batch)
        finally:
            _strip_mlx_lm_lora(lm.model)
        runs.append({"tokens": r["tokens"], "seconds": r["seconds"] + loaded})
    return _sum(runs)


def run_adapters_bench(messages: list, *, model: str, max_tokens: int, batch_size: int | None, dtype: str,
                       peers: list[str], run_mlx_lm, repeat: int = 1) -> dict:
    """Every system once untimed (kernels and plans per shape), then `repeat` timed runs each (the fastest
    kept). `messages`: each adapter's prompts; `run_mlx_lm`: bench's batch_generate peer."""
    lm = models.load(model, dtype=dtype)
    prompts = [list(lm.tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in messages]
    rows = len(messages) * NUM_ADAPTERS
    batch = batch_size or min(rows, 1024)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folders = [write_random_adapter(work / f"adapter{k}", lm.model, rank=RANK, seed=k) for k in range(NUM_ADAPTERS)]
        named = tuple((f"a{k}", str(f)) for k, f in enumerate(folders))
        # Each takes how many adapters to run: the untimed warm-up of a per-adapter system runs one
        # (every adapter has the same shapes), the timed runs all of them.
        systems = {
            "mlxbatch mixed (one job)": lambda k: _job(lm, messages, work, max_tokens, batch, adapter=named, each=True),
            "mlxbatch base model, same rows": lambda k: _job(lm, messages, work, max_tokens, batch, copies=NUM_ADAPTERS),
            "mlxbatch once per adapter": lambda k: _sum([_job(lm, messages, work, max_tokens, min(batch, len(messages)),
                                                              adapter=(a,)) for a in named[:k]]),
        }
        if "mlx-lm" in peers:
            systems["mlx-lm once per adapter"] = lambda k: _mlx_lm_per_adapter(
                _detached(lm), prompts, folders[:k], max_tokens, min(batch, len(prompts)), run_mlx_lm)
        results = {}
        for name, fn in systems.items():
            fn(1)  # untimed: the CUDA backend builds kernels per shape on first use
            runs = [_timed(lambda: fn(NUM_ADAPTERS)) for _ in range(repeat)]
            results[name] = min(runs, key=lambda r: r["seconds"])
            results[name]["runs_seconds"] = [round(r["seconds"], 2) for r in runs]
    return _summary(lm, len(messages), rows, max_tokens, batch, results, repeat)


def _detached(lm):
    """The model without our adapter wrappers, for mlx-lm to wrap with its own."""
    if lm.runner is not None:
        lm.runner.close()
        lm.runner = None
    return lm


def _timed(fn) -> dict:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    r = fn()
    r["peak_memory_gb"] = round(mx.get_peak_memory() / 1e9, 3)
    r["tok_s"] = r["tokens"] / r["seconds"]
    return r


def _summary(lm, prompts: int, rows: int, max_tokens: int, batch: int, results: dict, repeat: int) -> dict:
    mixed = results["mlxbatch mixed (one job)"]
    base = results["mlxbatch base model, same rows"]
    peer = results.get("mlx-lm once per adapter")
    return {
        "workload": "adapters", "model": lm.name, "dtype": lm.dtype, "device": f"{models.backend()} {mx.default_device()}",
        "device_info": mx.device_info(), "num_prompts": rows, "prompts_per_adapter": prompts,
        "num_adapters": NUM_ADAPTERS, "rank": RANK, "max_tokens": max_tokens, "batch_size": batch, "repeat": repeat,
        "mixed_vs_base_time": round(mixed["seconds"] / base["seconds"], 2),
        "mixed_vs_mlx_lm_speedup": round(peer["seconds"] / mixed["seconds"], 2) if peer else None,
        "mixed_vs_per_adapter_speedup": round(results["mlxbatch once per adapter"]["seconds"] / mixed["seconds"], 2),
        "versions": {"mlx": mx.__version__, "mlx_lm": __import__("mlx_lm").__version__},
        "results": results,
    }


def report(summary: dict) -> str:
    s = summary
    lines = [f"workload adapters: {s['num_adapters']} LoRA adapters (rank {s['rank']}, every linear layer) x "
             f"{s['prompts_per_adapter']} prompts = {s['num_prompts']} rows, max_tokens {s['max_tokens']}, "
             f"batch {s['batch_size']}, model {s['model']} ({s['dtype']}) on {s['device']}",
             f"{'system':34s} {'tokens':>9s} {'seconds':>9s} {'tok/s':>10s} {'peak GB':>8s}"]
    for name, r in s["results"].items():
        lines.append(f"{name:34s} {r['tokens']:>9,} {r['seconds']:>9.2f} {r['tok_s']:>10,.1f} {r['peak_memory_gb']:>8.2f}")
    lines.append(f"mixed batch: {s['mixed_vs_base_time']}x the base model's time for the same rows; "
                 f"{s['mixed_vs_per_adapter_speedup']}x faster than mlxbatch once per adapter"
                 + (f"; {s['mixed_vs_mlx_lm_speedup']}x faster than mlx-lm once per adapter"
                    if s["mixed_vs_mlx_lm_speedup"] else ""))
    lines.append(f"forward (mixed): {s['results']['mlxbatch mixed (one job)'].get('forward', '')}")
    return "\n".join(lines)
