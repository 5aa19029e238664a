"""The generation engine: continuous batching over mlx-lm model modules.

Modules: `core` (the engine loop: admission, prefill, decode, completion),
`protocol` (the interface the runner drives, which the Ray pool also implements), `scheduler` (which waiting requests prefill together), `kvcache` (batched KV
buffers and the model seam), `fused` (the lean forward pass), `sampling`.
"""

from mlxbatch.engine.core import Engine
from mlxbatch.types import Completion, EngineStats, Request, SamplingParams

__all__ = ["Completion", "Engine", "EngineStats", "Request", "SamplingParams"]
