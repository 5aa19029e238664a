"""mlxbatch: run a local LLM over a big file of prompts, resumably."""

import os as _os
import sys as _sys

if _os.path.basename(_sys.argv[0]) == "mlxbatch":  # the console script: no KeyboardInterrupt traceback
    from mlxbatch import exits as _exits  # first: while the slow imports run, a signal exits at once

    _exits.exit_on_signals()

from mlxbatch import _imports  # noqa: E402
from mlxbatch import startup as _startup  # noqa: E402,F401  (its clock starts here)

_imports.install()  # OpenBLAS just before MLX loads; mlx_lm without transformers

__version__ = "0.1.0"
