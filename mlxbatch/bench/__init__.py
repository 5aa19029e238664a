"""`mlxbatch bench`: named workloads through mlxbatch and peers, in one process.

Owns: the workloads (parallm-325, shared-prefix, mixed-lengths, long-outputs; adapters in
bench/adapters.py),
running them through `run_job` (the same path as `mlxbatch run`), through
mlx-lm's `batch_generate`, and through HF transformers static batching where
torch is installed; with `kv_bits`, one mlxbatch run per KV format at one fixed KV budget (rows
in flight, tok/s, peak memory for each); the result table. `kv-quality` lives in kvquality.py.
Does not own: any engine code.
"""

from __future__ import annotations

import gc
import json
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import orjson

from mlxbatch import models
from mlxbatch.engine.scheduler import common_prefix, token_key
from mlxbatch.errors import UsageError
from mlxbatch.job.spec import JobSpec
from mlxbatch.types import SamplingParams

_WARMUP_TOKENS = 8
_WORDS = ("river stone market winter signal garden copper lantern orbit meadow harbor engine velvet "
          "thunder pocket marble glacier violet compass ember canyon willow beacon quartz saddle").split()


def _parallm(n: int | None):
    pairs = [(a, b) for i, a in enumerate(string.ascii_uppercase) for b in string.ascii_uppercase[i + 1:]]
    pairs = pairs[: n or len(pairs)]
    return [[{"role": "user", "content": f"Think of a real word containing both the letters {a} and {b}. "
              "Then, say 3 sentences which use the word."}] for a, b in pairs], 100


def _document(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _shared_prefix(n: int | None):
    rng = random.Random(0)
    docs = [_document(rng, 1400) for _ in range(4)]  # ~1,500 tokens each
    n = n or 256
    return [[{"role": "user", "content": f"Document:\n{docs[i % 4]}\n\nQuestion {i}: which words appear most "
              f"often after '{rng.choice(_WORDS)}'?"}] for i in range(n)], 64


def _mixed_lengths(n: int | None):
    rng = random.Random(1)
    n = n or 128
    # Log-uniform 16..4096 tokens (one word ~ one token here).
    lengths = [int(2 ** rng.uniform(4, 12)) for _ in range(n)]
    return [[{"role": "user", "content": _document(rng, k)}] for k in lengths], 64


def _long_outputs(n: int | None):
    return [[{"role": "user", "content": f"Write a long story number {i} about a lighthouse keeper."}]
            for i in range(n or 64)], 1024


WORKLOADS = {"parallm-325": _parallm, "shared-prefix": _shared_prefix,
             "mixed-lengths": _mixed_lengths, "long-outputs": _long_outputs,
             "adapters": _parallm}  # its own systems: bench/adapters.py


def unique_prompt_tokens(prompts: list[list[int]]) -> int:
    """Tokens in the prefix tree of all prompts (what perfect prefix sharing computes)."""
    keys = sorted(token_key(p) for p in prompts)
    return sum(len(k) // 4 - (common_prefix(k, prev) if prev else 0) for prev, k in zip([None, *keys], keys))


class _NoEos:
    """A tokenizer view without EOS, so a peer also makes exactly max_tokens."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_ids = []

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _run_mlxbatch(lm, messages, max_tokens: int, batch: int, kv: dict | None = None) -> dict:
    from mlxbatch.runner import run_job

    kv = kv or {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        path.write_bytes(b"".join(orjson.dumps({"id": i, "messages": m}) + b"\n" for i, m in enumerate(messages)))
        spec = JobSpec(input=path, output=Path(tmp) / "out", model=lm.name,
                       sampling=SamplingParams(max_tokens=max_tokens), batch_size=batch, commit_seconds=5.0,
                       **kv).validate()
        t = time.perf_counter()
        stats = run_job(spec, lm=lm)
        secs = time.perf_counter() - t
    e = stats.engine
    return {"tokens": e.generated_tokens, "seconds": secs, "prompt_computed": e.prompt_computed,
            "prompt_total": e.prompt_tokens, "kv_peak_gb": round(e.kv_peak_bytes / 1e9, 3),
            "decode_steps": e.steps, "rows_in_flight_peak": e.active_peak, "kv_format": e.kv_format or "model dtype",
            "kv_budget_gb": round(e.kv_budget_bytes / 1e9, 3)}


def _run_mlx_lm(lm, prompts, max_tokens: int, batch: int) -> dict:
    from mlx_lm import batch_generate

    wrapper = lm.tokenizer.as_mlx_lm()  # mlx-lm's own tokenizer class for its own API
    tok = _NoEos(wrapper) if not lm.eos_token_ids else wrapper
    t = time.perf_counter()
    out = batch_generate(lm.model, tok, prompts, max_tokens=max_tokens, completion_batch_size=batch,
                         prefill_batch_size=min(batch, 64), return_token_ids=True)
    secs = time.perf_counter() - t
    tokens = sum(len([x for x in ids if x not in lm.eos_token_ids]) for ids in out.token_ids)
    return {"tokens": tokens, "seconds": secs}


def _run_hf(lm, prompts, max_tokens: int, batch: int) -> dict | None:
    """HF transformers, static batches, bf16 on CUDA, with the same weights."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    from mlx.utils import tree_flatten

    if lm.model.model_type != "llama":
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args = vars(lm.model.args)
    config = LlamaConfig(**{k: v for k, v in args.items() if k in LlamaConfig().to_dict() or k == "head_dim"})
    hf = LlamaForCausalLM(config).to(dtype)
    import numpy as np

    weights = {k: torch.from_numpy(np.array(v.astype(mx.float32))).to(dtype) for k, v in tree_flatten(lm.model.parameters())}
    hf.load_state_dict(weights, strict=False)
    hf = hf.to(device).eval()
    _hf_generate(hf, prompts[:batch], _WARMUP_TOKENS, device, eos=None)  # warm-up, untimed
    eos = sorted(lm.eos_token_ids) or None
    t = time.perf_counter()
    tokens = _hf_generate(hf, prompts, max_tokens, device, eos=eos, batch=batch)
    return {"tokens": tokens, "seconds": time.perf_counter() - t}


def _hf_generate(hf, prompts, max_tokens: int, device: str, *, eos, batch: int | None = None) -> int:
    """Greedy static batches, left-padded; returns generated tokens before EOS."""
    import torch

    batch, pad, tokens = batch or len(prompts), 0, 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad, min_new_tokens=0 if eos else max_tokens)
        new = out[:, width:].tolist()
        tokens += sum(len(r[: r.index(eos[0])] if eos and eos[0] in r else r) for r in new)
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens


def _peak(run, *args) -> dict:
    """A system's result with its peak MLX memory (weights included), reset before it runs."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    result = run(*args)
    result["peak_memory_gb"] = round(mx.get_peak_memory() / 1e9, 3)
    return result


def _median_run(run, *args, repeat: int) -> dict:
    """`repeat` timed runs of one system; the median one by tok/s, with every run's tok/s.
    Why: host-bound runs (a small model) vary by 20-40% from run to run on a shared host."""
    runs = [_peak(run, *args) for _ in range(repeat)]
    for r in runs:
        r["tok_s"] = r["tokens"] / r["seconds"]
    chosen = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
    return {**chosen, "runs_tok_s": [round(r["tok_s"], 1) for r in runs]}


def run_bench(workload: str, *, model: str, max_tokens: int | None, num_prompts: int | None,
              batch_size: int | None, dtype: str, peers: list[str], as_json: bool, repeat: int = 3,
              kv_bits: list[int] | None = None, max_kv_gb: float | None = None, kv_rows: int | None = None,
              max_memory_gb: float | None = None) -> str:
    if workload == "offload":
        from mlxbatch.bench.offload import run_offload_bench

        if not max_memory_gb:
            raise UsageError("bench offload needs --max-memory-gb (the cap the streamed run works under)")
        messages, default_tokens = _parallm(num_prompts or 64)
        return run_offload_bench(messages, model=model, cap_gb=max_memory_gb, max_tokens=max_tokens or default_tokens,
                                 batch_size=batch_size, dtype=dtype, peers=peers, as_json=as_json)
    if workload == "kv-quality":
        from mlxbatch.bench.kvquality import run_kv_quality

        return run_kv_quality(model=model, dtype=dtype, rows=num_prompts or 8, steps=max_tokens or 256,
                              as_json=as_json)
    if kv_bits or max_kv_gb or kv_rows:
        return _run_kv_bench(workload, model=model, max_tokens=max_tokens, num_prompts=num_prompts,
                             batch_size=batch_size, dtype=dtype, peers=peers, as_json=as_json, repeat=repeat,
                             kv_bits=kv_bits or [16], max_kv_gb=max_kv_gb, kv_rows=kv_rows)
    if workload not in WORKLOADS:
        raise UsageError(f"unknown workload {workload!r} (workloads: {', '.join(WORKLOADS)})")
    if workload == "adapters":
        from mlxbatch.bench.adapters import (
            PROMPTS_PER_ADAPTER,
            report,
            run_adapters_bench,
        )

        messages, default_tokens = _parallm(num_prompts or PROMPTS_PER_ADAPTER)
        summary = run_adapters_bench(messages, model=model, max_tokens=max_tokens or default_tokens,
                                     batch_size=batch_size, dtype=dtype, peers=peers, run_mlx_lm=_run_mlx_lm,
                                     repeat=repeat)
        return json.dumps(summary, default=str) if as_json else report(summary)
    messages, default_tokens = WORKLOADS[workload](num_prompts)
    max_tokens = max_tokens or default_tokens
    lm = models.load(model, dtype=dtype)
    prompts = [list(lm.tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in messages]
    batch = batch_size or min(len(prompts), 512)
    gc.collect()  # loading's garbage, before anything is timed
    gc.freeze()  # as the CLI's `run` does: startup objects leave the collector's scans
    # Each MLX system first makes the identical run untimed: the CUDA backend builds
    # kernels and attention plans per shape on first use, and whoever ran first would
    # pay for both (they share the process-wide caches).
    _run_mlxbatch(lm, messages, max_tokens, batch)
    results = {"mlxbatch": _median_run(_run_mlxbatch, lm, messages, max_tokens, batch, repeat=repeat)}
    if "mlx-lm" in peers:
        try:
            _run_mlx_lm(lm, prompts, max_tokens, batch)
            results["mlx-lm batch_generate"] = _median_run(_run_mlx_lm, lm, prompts, max_tokens, batch, repeat=repeat)
        except Exception as exc:  # a peer failing must not hide our own numbers (the JSON names the failure)
            print(f"mlxbatch bench: mlx-lm peer failed: {exc!r}", file=sys.stderr)
            results["mlx-lm failed"] = repr(exc)[:300]
    if "hf" in peers:
        try:
            hf = _run_hf(lm, prompts, max_tokens, batch)
        except Exception as exc:  # a peer failing must not hide our own numbers
            print(f"mlxbatch bench: HF transformers peer failed: {exc!r}", file=sys.stderr)
            hf = None
        if hf is not None:
            results["hf transformers (static)"] = hf
    return _report(workload, lm, prompts, max_tokens, batch, results, as_json, repeat)


def _kv_budget_gb(lm, prompts, max_tokens: int, rows: int) -> float:
    """The KV budget that holds `rows` of the longest of these rows in the model dtype, nothing shared,
    as the engine accounts for them (shape buckets, capacity steps and trim slack: budget.held_columns)."""
    from mlxbatch.engine.budget import held_columns
    from mlxbatch.engine.core import _runner
    from mlxbatch.engine.shapes import row_bucket

    runner = _runner(lm, None)
    columns = held_columns(max(len(p) for p in prompts) + max_tokens + 1, fine=not runner.options.full_buffer)
    held = rows if runner.has_state else row_bucket(rows)  # a batch holds its shape bucket's rows
    return held * runner.kv_bytes_per_token() * columns / 1e9


def _run_kv_bench(workload: str, *, model: str, max_tokens: int | None, num_prompts: int | None,
                  batch_size: int | None, dtype: str, peers: list[str], as_json: bool, repeat: int,
                  kv_bits: list[int], max_kv_gb: float | None, kv_rows: int | None) -> str:
    """One mlxbatch run per KV format at one KV budget (`max_kv_gb`, or what holds `kv_rows` rows in
    the model dtype), against mlx-lm's batch_generate with as many rows as that budget holds uncompressed."""
    if workload not in WORKLOADS:
        raise UsageError(f"unknown workload {workload!r} (workloads: {', '.join(WORKLOADS)}, kv-quality)")
    if any(b not in (4, 8, 16) for b in kv_bits):
        raise UsageError(f"--kv-bits takes 16, 8 and 4 (comma list), got {kv_bits}")
    messages, default_tokens = WORKLOADS[workload](num_prompts)
    max_tokens = max_tokens or default_tokens
    lm = models.load(model, dtype=dtype)
    prompts = [list(lm.tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in messages]
    rows = kv_rows or 64
    budget = max_kv_gb or _kv_budget_gb(lm, prompts, max_tokens, rows)
    batch = batch_size or 512  # the budget, not the batch cap, decides the rows in flight
    gc.collect()
    gc.freeze()
    results = {}
    for bits in kv_bits:
        kv = {"max_kv_gb": budget, **({"kv_bits": bits} if bits != 16 else {})}
        _run_mlxbatch(lm, messages, max_tokens, batch, kv)  # untimed: kernels and plans for this format
        results[f"mlxbatch kv{bits}"] = _median_run(_run_mlxbatch, lm, messages, max_tokens, batch, kv, repeat=repeat)
    if "mlx-lm" in peers:
        peer_rows = kv_rows or max(1, results.get("mlxbatch kv16", {}).get("rows_in_flight_peak", 64))
        _run_mlx_lm(lm, prompts, max_tokens, peer_rows)
        results["mlx-lm batch_generate"] = _median_run(_run_mlx_lm, lm, prompts, max_tokens, peer_rows, repeat=repeat)
        results["mlx-lm batch_generate"]["rows_in_flight_peak"] = peer_rows
    for r in results.values():
        r["tok_s"] = r["tokens"] / r["seconds"]
    first = next(iter(results.values()))
    summary = {"workload": workload, "model": lm.name, "dtype": lm.dtype,
               "device": f"{models.backend()} {mx.default_device()}", "device_info": mx.device_info(),
               "num_prompts": len(prompts), "max_tokens": max_tokens, "max_kv_gb": round(budget, 6),
               "kv_rows_at_model_dtype": rows, "repeat": repeat,
               "versions": {"mlx": mx.__version__, "mlx_lm": __import__("mlx_lm").__version__}, "results": results}
    if as_json:
        return json.dumps(summary, default=str)
    lines = [f"workload {workload}: {len(prompts)} prompts, max_tokens {max_tokens}, KV budget {budget:.3f} GB "
             f"(~{rows} rows in {lm.dtype}), model {lm.name} on {summary['device']}; median of {repeat}",
             f"{'engine':24s} {'rows':>6s} {'tok/s':>10s} {'peak GB':>8s} {'KV peak GB':>11s} {'vs first':>9s}"]
    for name, r in results.items():
        lines.append(f"{name:24s} {r['rows_in_flight_peak']:>6} {r['tok_s']:>10,.1f} {r['peak_memory_gb']:>8.2f} "
                     f"{r.get('kv_peak_gb', float('nan')):>11.3f} {r['tok_s'] / first['tok_s']:>8.2f}x")
    return "\n".join(lines)


def _report(workload, lm, prompts, max_tokens, batch, results, as_json, repeat) -> str:
    failed = {k: results.pop(k) for k in [k for k, r in results.items() if isinstance(r, str)]}
    for r in results.values():
        r["tok_s"] = r["tokens"] / r["seconds"]
    ours = results["mlxbatch"]
    peer = results.get("mlx-lm batch_generate")
    summary = {
        "workload": workload, "model": lm.name, "dtype": lm.dtype, "device": f"{models.backend()} {mx.default_device()}",
        "device_info": mx.device_info(), "num_prompts": len(prompts), "max_tokens": max_tokens, "batch_size": batch,
        "mlxbatch_tok_s": round(ours["tok_s"], 1), "mlx_lm_tok_s": round(peer["tok_s"], 1) if peer else None,
        "ratio": round(ours["tok_s"] / peer["tok_s"], 2) if peer else None, "repeat": repeat,
        "prompt_tokens_total": ours["prompt_total"], "prompt_tokens_computed": ours["prompt_computed"],
        "prompt_tokens_unique": unique_prompt_tokens(prompts),
        "versions": {"mlx": mx.__version__, "mlx_lm": __import__("mlx_lm").__version__},
        "results": results, "failed": failed,
    }
    if as_json:
        return json.dumps(summary, default=str)
    lines = [f"workload {workload}: {len(prompts)} prompts, max_tokens {max_tokens}, batch {batch}, "
             f"model {lm.name} ({lm.dtype}) on {summary['device']}",
             f"prompt tokens: {ours['prompt_total']:,} total, {summary['prompt_tokens_unique']:,} unique, "
             f"{ours['prompt_computed']:,} computed by mlxbatch; each MLX system: the median of {repeat} timed runs",
             f"{'engine':28s} {'tokens':>9s} {'seconds':>9s} {'tok/s':>10s} {'peak GB':>8s} {'mlxbatch is':>12s}"]
    for name, r in results.items():
        ratio = "" if name == "mlxbatch" else f"{ours['tok_s'] / r['tok_s']:.2f}x"
        peak = f"{r['peak_memory_gb']:.2f}" if "peak_memory_gb" in r else "-"
        lines.append(f"{name:28s} {r['tokens']:>9,} {r['seconds']:>9.2f} {r['tok_s']:>10,.1f} {peak:>8s} {ratio:>12s}")
    lines += [f"{name}: {why}" for name, why in failed.items()]
    return "\n".join(lines)
