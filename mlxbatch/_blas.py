"""Linux CPU speed-up: load OpenBLAS before MLX so its BLAS calls go there.

The mlx-cpu wheel bundles the reference BLAS (fp32 matmul ~30-45x slower than
OpenBLAS, FINDINGS.md). A library loaded RTLD_GLOBAL before libmlx wins symbol
resolution, so this must run before the first `import mlx`: mlxbatch/_imports.py
calls it then (so commands that load no model never load OpenBLAS).
Set MLXBATCH_BLAS=reference to keep the bundled one.
"""

import ctypes
import os
import sys

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded: str | None = None


def preload_openblas() -> str | None:
    global loaded
    if sys.platform != "linux" or os.environ.get("MLXBATCH_BLAS") == "reference":
        return None
    if "mlx.core" in sys.modules:  # too late: symbols are already bound
        return None
    for path in OPENBLAS_PATHS:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            return path
    return None

