"""Recognising MLX's out-of-memory failures, and freeing what can be freed after one.

Owns: the narrow test for an allocation failure (an exception type and one of MLX's allocator
messages, not every RuntimeError) and the clean-up after it. MLX raises RuntimeError from its
allocators: Metal `[metal::malloc] Attempting to allocate N bytes which is greater than the maximum
allowed buffer size` / `[metal::malloc] Resource limit (N) exceeded`, `[malloc] Unable to allocate N
bytes`, and a command buffer's `Insufficient Memory` (kIOGPUCommandBufferCallbackErrorOutOfMemory);
CUDA `cudaMalloc...` failures carry CUDA's "out of memory". (MLX's CPU allocator does not check:
on Linux a failed allocation there is a crash, not an exception, so tests inject the error.)
Does not own: what the engine does about it (core.py `_recover`).
"""

from __future__ import annotations

import gc

import mlx.core as mx

_SIGNATURES = (
    "[metal::malloc]",
    "[malloc] unable to allocate",
    "insufficient memory",
    "outofmemory",  # kIOGPUCommandBufferCallbackErrorOutOfMemory
    "cudaerrormemoryallocation",
)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    if any(s in text for s in _SIGNATURES):
        return True
    return "cuda" in text and "out of memory" in text


def free_memory() -> None:
    """Drop unreachable arrays and MLX's buffer cache, so the retry starts from what is really held."""
    gc.collect()
    mx.clear_cache()
