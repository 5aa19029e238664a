"""Import hooks that keep start-up short; installed by mlxbatch/__init__.py, idle until used.

Owns two deferrals, each done when the module is first imported, not before:
- OpenBLAS is loaded just before the first `import mlx` (mlxbatch/_blas.py says why it
  must precede MLX), so `mlxbatch --help`, `status` and `validate` never load it.
- `mlx_lm` is imported without running its `__init__.py`, which imports `mlx_lm.generate`
  and `mlx_lm.utils` and through them transformers (and torch, sympy, scikit-learn where
  installed: ~15 s on a GPU box). Its submodules (`mlx_lm.models.*`) import as usual; the
  first attribute asked of the package itself (`from mlx_lm import generate`,
  `mlx_lm.__version__` aside) runs the real `__init__.py` then.
Set MLXBATCH_EAGER_MLX_LM=1 to import mlx_lm as it is (the transformers path, for comparisons).
Does not own: what is imported where (each module imports what it needs, late where it can).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys


class _PackageWithoutInit(importlib.abc.Loader):
    """Makes the `mlx_lm` package module with its real `__path__` but defers its `__init__.py`."""

    def __init__(self, origin: str):
        self.origin = origin

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        module.__getattr__ = lambda name: _run_init(module, self.origin, name)
        from mlx_lm._version import __version__  # cheap, and what callers ask first

        module.__version__ = __version__


def _run_init(module, origin: str, name: str):
    """Run the package's real `__init__.py` once, then answer `name` from it."""
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)  # introspection (__file__, __all__ probes) must not trigger the import
    module.__dict__.pop("__getattr__", None)
    with open(origin, "rb") as f:
        exec(compile(f.read(), origin, "exec"), module.__dict__)
    try:
        return module.__dict__[name]
    except KeyError:
        raise AttributeError(f"module 'mlx_lm' has no attribute {name!r}") from None


class StartupFinder(importlib.abc.MetaPathFinder):
    """Sees each top-level import before the real finders; acts on `mlx` and `mlx_lm` only."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlx":
            from mlxbatch import _blas

            _blas.preload_openblas()
            return None  # found by the usual finders
        if name == "mlx_lm" and not os.environ.get("MLXBATCH_EAGER_MLX_LM"):
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.origin is None or not spec.submodule_search_locations:
                return None
            lazy = importlib.machinery.ModuleSpec(name, _PackageWithoutInit(spec.origin), origin=spec.origin,
                                                  is_package=True)
            lazy.submodule_search_locations = list(spec.submodule_search_locations)
            lazy.has_location = True
            return lazy
        return None


def install() -> None:
    if not any(isinstance(f, StartupFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, StartupFinder())
