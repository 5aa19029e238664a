"""Time one layer's attention over a packed KV cache, per form, on this backend.

Why: `ForwardOptions.kv_[prefill_]quantized_matmul` (engine/model_runner.py) pick, per backend, whether
attention reads packed keys/values with MLX's quantized matmul or dequantizes each operand first;
this measures both against the uncompressed cache at the engine's own attention entry point.

    python scripts/kv_attention_probe.py [--rows 64] [--cols 512] [--heads 9,3] [--dim 64] [--json]

Prints ms per call (median of --repeat) for: model dtype (the engine's usual form), 8- and 4-bit
read by quantized_matmul, and 8- and 4-bit dequantized then multiplied; decode (one query) and a
prefill chunk (--chunk queries).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlxbatch  # noqa: F401  (OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx

from mlxbatch.engine.attention import AttendOptions, attend
from mlxbatch.engine.kvquant import KVQuant
from mlxbatch.engine.model_runner import ForwardOptions, device_backend


def _time(fn, repeat: int) -> float:
    mx.eval(fn())  # warm-up (kernels, plans)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--heads", default="9,3", help="query heads,KV heads (SmolLM2: 9,3; Llama-8B: 32,8)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64, help="queries per row in the prefill case")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    backend = device_backend()
    dtype = mx.float32 if backend == "cpu" else mx.bfloat16
    H, Hkv = (int(x) for x in a.heads.split(","))
    base = ForwardOptions.for_backend(backend).attend
    k = mx.random.normal((a.rows, Hkv, a.cols, a.dim)).astype(dtype)
    v = mx.random.normal((a.rows, Hkv, a.cols, a.dim)).astype(dtype)
    out = {"backend": backend, "dtype": str(dtype), "rows": a.rows, "cols": a.cols, "heads": [H, Hkv], "dim": a.dim}
    for name, L in (("decode", 1), ("prefill", a.chunk)):
        q = mx.random.normal((a.rows, H, L, a.dim)).astype(dtype)
        mask = mx.ones((a.rows, 1, L, a.cols), dtype=mx.bool_)
        if L == 1 and base.one_query_matmul:
            mask = mx.zeros((a.rows, 1, 1, a.cols), dtype=dtype)
        forms = {"model dtype": (base, k, v)}
        for bits in (8, 4):
            for qmm in (True, False):
                kv = KVQuant(bits, bits, a.group_size, qmm, qmm)
                pk, pv = kv.pack(k, v)
                mx.eval(pk, pv)
                forms[f"{bits}-bit {'quantized_matmul' if qmm else 'dequantize'}"] = (AttendOptions(kv=kv), pk, pv)
        out[name] = {f: round(_time(lambda o=o, kk=kk, vv=vv: attend(q, kk, vv, scale=a.dim ** -0.5, mask=mask,
                                                                      groups=None, opts=o, layer=0), a.repeat), 3)
                     for f, (o, kk, vv) in forms.items()}
    if a.json:
        print(json.dumps(out))
        return
    print(f"{backend} {dtype}: {a.rows} rows x {a.cols} columns, heads {H}/{Hkv}, dim {a.dim} (ms per layer call)")
    for name in ("decode", "prefill"):
        print(f"  {name}: " + ", ".join(f"{f} {ms:.3f}" for f, ms in out[name].items()))


if __name__ == "__main__":
    main()
