"""mlxbatch: run a local LLM over a big file of prompts, resumably."""

from . import _blas  # noqa: F401  (must precede any mlx import)

__version__ = "0.1.0"
