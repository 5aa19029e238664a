"""One frozen engine configuration: every setting an Engine takes, derived from a JobSpec once.

Owns: the engine's settings in one place (batch width, KV budget, prefill sizes, the prefix
cache's size, the KV format in ONE form, forward-option overrides, the adapters its model must
carry), their defaults, and `EngineConfig.from_spec`, the one derivation from a JobSpec that the
runner, the Ray workers (the config is what is pickled to them) and the server all use, so no
setting is accepted in one place and dropped in another. A plain frozen dataclass: it pickles.
Does not own: checking a KV format against a model's head dimension (engine/kvquant.py `make`,
called by the engine and, before the weights load, by runner.py) or what the settings do (core.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # model_runner imports MLX
    from mlxbatch.engine.model_runner import ForwardOptions
    from mlxbatch.job.spec import JobSpec

DEFAULT_PREFILL_CHUNK = 512
DEFAULT_PREFIX_CACHE_GB = 1.0


@dataclass(frozen=True)
class KVFormat:
    """The KV cache stored packed: keys' bits, values' bits (None: as keys), group size (None: 64 where
    it divides the head dimension). No KVFormat at all (EngineConfig.kv None) is the model dtype."""

    bits: int
    value_bits: int | None = None
    group_size: int | None = None

    def __post_init__(self):
        if self.bits not in (4, 8):  # as kvquant.BITS; 16 (off) is `kv=None`, not a format
            raise ValueError(f"KVFormat.bits must be 4 or 8 (None for the model dtype), got {self.bits!r}")

    @classmethod
    def of(cls, bits: int | None, value_bits: int | None = None, group_size: int | None = None) -> KVFormat | None:
        """From the three user settings (--kv-bits, --kv-value-bits, --kv-group-size); None: off."""
        if not bits or bits == 16:
            if (value_bits and value_bits != 16) or group_size:
                raise ValueError("kv_value_bits and kv_group_size need kv_bits 8 or 4")
            return None
        return cls(bits, value_bits, group_size)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int | None = None  # rows decoded together; None: the backend's default (core.py)
    max_kv_gb: float | None = None  # the KV budget; None: 40% of memory
    max_memory_gb: float | None = None  # the cap the model's OffloadPlan was made for (models/streamed.py)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefix_cache_gb: float = DEFAULT_PREFIX_CACHE_GB
    max_prefill_tokens: int | None = None  # None: the backend's default
    max_step_tokens: int | None = None  # prefill tokens per engine step beside the decode; None: see is_interactive
    is_interactive: bool = False  # streams wait on each step (the server): steps bounded by the backend's budget
    kv: KVFormat | None = None  # None: KV in the model dtype
    options: ForwardOptions | None = None  # forward choices; None: the backend's (model_runner.default_options)
    # (name, absolute path or None for the base model) the model must carry, in order: a worker
    # opens and loads these itself; an in-process engine checks its model has them by name.
    adapters: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self):
        if self.options is not None and (self.options.kv_bits or self.options.kv_value_bits):
            raise ValueError("the KV format is EngineConfig.kv (a KVFormat), not ForwardOptions' kv_bits")

    @classmethod
    def from_spec(cls, spec: JobSpec) -> EngineConfig:
        """The engine settings of a (validated) job: the one place a JobSpec becomes engine settings."""
        return cls(max_batch=spec.batch_size, max_kv_gb=spec.max_kv_gb, max_memory_gb=spec.max_memory_gb,
                   kv=KVFormat.of(spec.kv_bits, spec.kv_value_bits, spec.kv_group_size),
                   adapters=tuple((n, p and str(Path(p).expanduser().resolve())) for n, p in spec.adapter))

    @classmethod
    def of(cls, *, max_batch: int | None = None, max_kv_gb: float | None = None,
           prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefix_cache_gb: float = DEFAULT_PREFIX_CACHE_GB,
           max_prefill_tokens: int | None = None, max_step_tokens: int | None = None,
           options: ForwardOptions | None = None, kv_bits: int | None = None, kv_value_bits: int | None = None,
           kv_group_size: int | None = None) -> EngineConfig:
        """Keyword construction (`Engine(lm, max_batch=8, kv_bits=4)`, as tests and probes write it):
        the KV format's three keywords become one KVFormat here and nowhere else."""
        return cls(max_batch=max_batch, max_kv_gb=max_kv_gb, prefill_chunk=prefill_chunk,
                   prefix_cache_gb=prefix_cache_gb, max_prefill_tokens=max_prefill_tokens,
                   max_step_tokens=max_step_tokens, options=options,
                   kv=KVFormat.of(kv_bits, kv_value_bits, kv_group_size))

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.adapters)
