"""Time one mixture-of-experts MLP at decode (one token a row) in MLX: mlx-lm's SwitchGLU (sorted
gather_mm), gate and up fused into one gather_mm, and every expert computed densely (one big matmul,
unselected experts weighted 0). Prints ms per call for each shape and batch; raw JSON with --json.
usage: python scripts/moe_probe.py [--rows 64,325] [--dtype bfloat16] [--json]"""

import argparse
import json
import time

import mlx.core as mx
from mlx_lm.models.switch_layers import SwitchGLU

SHAPES = {  # name: (hidden, expert intermediate, experts, top-k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "gpt-oss-20b": (2880, 2880, 32, 4),
}


def timed(fn, *args, n=20):
    for _ in range(3):
        mx.eval(fn(*args))
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(fn(*args))
    return (time.perf_counter() - t) / n * 1000


def fused_gate_up(x, idx, w_gu, w_d):
    """One gather_mm for gate and up (their weights side by side), sorted by expert."""
    from mlx_lm.models.activations import swiglu
    from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort

    xs, si, inv = _gather_sort(mx.expand_dims(x, (-2, -3)), idx)
    gu = mx.gather_mm(xs, w_gu.swapaxes(-1, -2), rhs_indices=si, sorted_indices=True)
    g, u = mx.split(gu, 2, axis=-1)
    y = mx.gather_mm(swiglu(g, u), w_d.swapaxes(-1, -2), rhs_indices=si, sorted_indices=True)
    return _scatter_unsort(y, inv, idx.shape).squeeze(-2)


def dense(x, weights, w_gu_flat, w_d, E, inter):
    """Every expert for every row: x @ [E*2I, D]^T, then per-expert down projections, weighted."""
    from mlx_lm.models.activations import swiglu

    gu = (x @ w_gu_flat.T).reshape(x.shape[0], E, 2 * inter)
    g, u = mx.split(gu, 2, axis=-1)
    h = swiglu(g, u) * weights[..., None]  # [B, E, I], 0 for unselected experts
    return mx.einsum("bei,edi->bd", h, w_d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64,325")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    dt = getattr(mx, a.dtype)
    out = []
    for name in a.shapes.split(","):
        D, inter, E, k = SHAPES[name]
        glu = SwitchGLU(D, inter, E)
        glu.set_dtype(dt)
        w_gu = mx.concatenate([glu.gate_proj.weight, glu.up_proj.weight], axis=1)  # [E, 2I, D]
        w_gu_flat = w_gu.reshape(E * 2 * inter, D)
        w_d = glu.down_proj.weight  # [E, D, I]
        mx.eval(glu.parameters(), w_gu, w_gu_flat)
        for B in (int(r) for r in a.rows.split(",")):
            x = mx.random.normal((B, D)).astype(dt)
            logits = mx.random.normal((B, E))
            idx = mx.argpartition(-logits, k - 1, axis=-1)[:, :k].astype(mx.uint32)
            w = mx.zeros((B, E)).astype(dt)
            w = mx.put_along_axis(w, idx.astype(mx.int32), mx.full(idx.shape, 1.0 / k, dt), axis=-1)
            mx.eval(x, idx, w)
            row = {"shape": name, "rows": B, "switch_glu_ms": timed(glu, x, idx),
                   "fused_gate_up_ms": timed(fused_gate_up, x, idx, w_gu, w_d),
                   "dense_ms": timed(dense, x, w, w_gu_flat, w_d, E, inter)}
            out.append(row)
            print(f"{name:14s} rows {B:4d}: SwitchGLU {row['switch_glu_ms']:.3f} ms, gate+up fused "
                  f"{row['fused_gate_up_ms']:.3f} ms, dense {row['dense_ms']:.3f} ms", flush=True)
    if a.json:
        print(json.dumps({"device": str(mx.default_device()), "results": out}))


if __name__ == "__main__":
    main()
