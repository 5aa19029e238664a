"""mlxbatch: run a local LLM over a big file of prompts, resumably."""

import os as _os
import sys as _sys

if _os.path.basename(_sys.argv[0]) == "mlxbatch":  # the console script: no KeyboardInterrupt traceback
    import signal as _signal  # while the slow imports run, a signal exits at once (cli.main takes over)

    def _exit_now(signum, frame):
        _os.write(2, b"\nmlxbatch: interrupted\n")
        _os._exit(130)

    for _s in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(_s, _exit_now)

from mlxbatch import _blas  # noqa: F401,E402  (must precede any mlx import)

__version__ = "0.1.0"
