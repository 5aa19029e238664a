"""One-token attention of SmolLM2's shapes, 30 layers a step: the engine's form (GQA matmuls, the
mask added, softmax, matmul) against MLX's unmasked fused one-query kernel with the mask carried
in an extra key dimension (q and k padded from 64 to 96: q's column 64 is 1, k's column 64 is 0
for a valid column and -1e9 for a masked one). Prints host ms a step (graph building and
`mx.async_eval`) and wall ms a step, and checks both forms agree.

usage: python docs/bench/run8/scripts/attn_probe.py [BATCH] [COLUMNS]
"""
import sys
import time

import mlx.core as mx

B = int(sys.argv[1]) if len(sys.argv) > 1 else 325
S = int(sys.argv[2]) if len(sys.argv) > 2 else 192
H, HKV, D, PAD, LAYERS, STEPS = 9, 3, 64, 96, 30, 100
G, scale, dt = H // HKV, D ** -0.5, mx.bfloat16
mx.random.seed(0)
qk = mx.random.normal((B, H + HKV, 1, D)).astype(dt)
k = mx.random.normal((B, HKV, S, D)).astype(dt)
v = mx.random.normal((B, HKV, S, D)).astype(dt)
valid = mx.random.uniform(shape=(B, S)) > 0.2  # gaps anywhere, as after merges
valid[:, -1] = True
mask = mx.where(valid, 0.0, -mx.inf).astype(dt)[:, None, None, :]
col = mx.where(valid, 0.0, -1e9).astype(dt)[:, None, :, None]  # the mask as a key dimension
k_ext = mx.concatenate([k, mx.broadcast_to(col, (B, HKV, S, 1)), mx.zeros((B, HKV, S, PAD - D - 1), dt)], -1)
v_ext = mx.concatenate([v, mx.zeros((B, HKV, S, PAD - D), dt)], -1)
q_tail = mx.concatenate([mx.ones((B, H, 1, 1), dt), mx.zeros((B, H, 1, PAD - D - 1), dt)], -1)
mx.eval(qk, k, v, mask, k_ext, v_ext, q_tail)


@mx.compile
def scores_masked(s, m):
    return s * scale + m


def engine_form(qk, k, v, mask):
    q = mx.contiguous(qk[:, :H]).reshape(B, HKV, G, D)
    s = scores_masked(q @ k.swapaxes(-1, -2), mask)
    return (mx.softmax(s, axis=-1, precise=True) @ v).reshape(B, 1, H * D)


def fused_form(qk, k_ext, v_ext, _mask):
    q = mx.concatenate([qk[:, :H], q_tail], -1)
    o = mx.fast.scaled_dot_product_attention(q, k_ext, v_ext, scale=scale)
    return mx.contiguous(o[..., :D]).reshape(B, 1, H * D)


for name, form, kk, vv in (("engine form", engine_form, k, v), ("fused + mask dim", fused_form, k_ext, v_ext)) * 2:
    mx.eval([form(qk, kk, vv, mask) for _ in range(LAYERS)])  # warm-up
    host, t0 = 0.0, time.perf_counter()
    for _ in range(STEPS):
        t = time.perf_counter()
        mx.async_eval([form(qk, kk, vv, mask) for _ in range(LAYERS)])  # one step's layers
        host += time.perf_counter() - t
    mx.synchronize()
    wall = time.perf_counter() - t0
    print(f"{name:18s} host {host / STEPS * 1e3:6.2f} ms a step, wall {wall / STEPS * 1e3:6.2f} ms a step "
          f"({LAYERS} layers, batch {B}, {S} columns, {mx.default_device()})", flush=True)

a = engine_form(qk, k, v, mask).astype(mx.float32)
b = fused_form(qk, k_ext, v_ext, mask).astype(mx.float32)
print(f"max |engine - fused| = {mx.max(mx.abs(a - b)).item():.4f} (outputs ~{mx.mean(mx.abs(a)).item():.3f})")
