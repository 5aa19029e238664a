"""The data types every stage passes along: sampling settings, engine requests and completions.

Owns: plain frozen dataclasses only. Imports nothing from mlxbatch and no MLX,
so `validate`, `status` and `export` can use them without loading a backend.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; 0: chosen token; n: also the top n


@dataclass
class Request:
    key: object
    tokens: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Completion:
    key: object
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: list | None = None  # [(token, logprob, [(token, logprob), ...]), ...]

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class EngineStats:
    prompt_tokens: int = 0  # in admitted requests
    prompt_computed: int = 0  # real tokens run through the model
    prompt_padding: int = 0  # pad tokens run through the model
    prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache or a shared unit prefix
    prefix_lookups: int = 0
    prefix_hits: int = 0
    generated_tokens: int = 0
    steps: int = 0
    active: int = 0
    capacity: int = 0
    waiting: int = 0
