"""Does one MoE MLP (mlx-lm's SwitchGLU) run for N tokens at once on this backend? Prints ok or the error per N."""
import sys

import mlx.core as mx
from mlx_lm.models.switch_layers import SwitchGLU

D, inter, E, k = 2048, 768, 128, 8
glu = SwitchGLU(D, inter, E)
glu.set_dtype(mx.bfloat16)
for n in [int(x) for x in sys.argv[1:]] or [2048, 8192, 16384, 32768]:
    x = mx.random.normal((1, n, D)).astype(mx.bfloat16)
    idx = mx.argpartition(-mx.random.normal((1, n, E)), k - 1, axis=-1)[..., :k].astype(mx.uint32)
    try:
        mx.eval(glu(x, idx))
        print(n, "tokens: ok", flush=True)
    except Exception as exc:  # noqa: BLE001 - the probe reports it
        print(n, "tokens:", repr(exc)[:200], flush=True)
