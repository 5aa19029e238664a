"""The data types every stage passes along: input rows, rendered items, sampling settings,
engine requests and completions, and the few names that settings and model loading share.

Owns: plain dataclasses and constants only. Imports nothing from mlxbatch and no MLX,
so `validate`, `status` and `export` can use them without loading a backend. Does not
own: the rules a setting's value must follow (job/spec.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlxbatch.errors import RowError

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("auto", "bf16", "fp16", "fp32", "q4", "q8")


@dataclass(frozen=True)
class Row:
    """One input row: parsed, or the reason it could not be (job/source.py yields these)."""

    index: int  # 0-based position among rows (blank lines are not rows)
    line: int  # 1-based line number in JSONL, row number in Parquet
    data: dict | None
    error: RowError | None = None


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match (structured output); job/grammar.py compiles it."""

    kind: str  # "json" (a JSON schema) | "regex" | "lark" (a forced tool call: chat/tools.py)
    text: str  # the schema as canonical JSON text, the pattern, or the grammar

    @property
    def is_json(self) -> bool:
        return self.kind == "json"


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
    constraint: Constraint | None = None  # None: free text


@dataclass(frozen=True)
class Item:
    """A row rendered: what to ask the model (job/render.py makes these), with which settings."""

    index: int
    line: int
    id: str
    kind: str  # "prompt" | "chat" | "openai-chat" | "openai-completion"
    tokens: list | None  # None until render_many tokenizes
    params: SamplingParams  # seed filled per sample by `render.request_params`
    n: int = 1
    messages: list | None = None
    prompt: str | None = None
    custom_id: str | None = None
    model_field: str | None = None
    kept: dict = field(default_factory=dict)
    adapters: tuple[int, ...] = ()  # the job's adapters this row runs with, in order; () when it has none
    tools: object = None  # chat.tools.ToolSpec when the row gives tools
    enable_thinking: bool | None = None  # the row's own switch for the template's thinking (None: the template's)
    is_reasoning_open: bool = False  # the rendered prompt ends inside <think>: the output starts as reasoning

    @property
    def is_openai(self) -> bool:
        return self.kind.startswith("openai")


class Priority(IntEnum):
    """Which waiting requests the engine's scheduler admits first (lower first)."""

    INTERACTIVE = 0  # a chat request, or a job's row (a job has nothing to yield to)
    BATCH = 1  # a Batch API row in the server: fills the slots interactive traffic leaves, less a reserve


@dataclass
class Request:
    key: object
    tokens: list[int]
    params: SamplingParams
    guide: object | None = None  # a grammar.Guide when the output is constrained (the engine masks with it)
    adapter: int = 0  # index into the model's adapters (LoadedModel.adapters); 0 when it has none
    priority: Priority = Priority.INTERACTIVE


@dataclass(frozen=True)
class Completion:
    key: object
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: list | None = None  # [(token, logprob, [(token, logprob), ...]), ...]
    error: tuple[str, str] | None = None  # (code, message) when the sample could not run (finish_reason "error")

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
    active_peak: int = 0  # most rows in flight at once
    capacity: int = 0
    waiting: int = 0
    kv_bytes: int = 0  # KV held by the running batch: rows' own columns plus shared prefixes once
    kv_shared_bytes: int = 0  # of which shared prefixes
    kv_peak_bytes: int = 0
    prefix_cache_bytes: int = 0  # computed prefixes kept for later units (may overlap kv_shared_bytes)
    kv_budget_bytes: int = 0  # the KV budget admission works to (lowered after running out of memory)
    kv_format: str = ""  # how KV is stored: "" the model dtype, else e.g. "8-bit, groups of 64"
    oom_retries: int = 0  # steps that ran out of memory and were retried with less
    forward: str = ""  # the model runner's backend choices, for the log
    streamed_bytes: int = 0  # weights read from the model's files since load (a memory cap: engine/offload.py)
    stream_wait_s: float = 0.0  # of the forward's time, waiting on those reads
    resident_share: float = 1.0  # of the weights, the share held in memory
    step_seconds: float = 0.0  # wall time inside Engine.step, all steps
    sync_seconds: float = 0.0  # of which waiting for the device (reading a step's tokens): the rest is host time
    step_max_seconds: float = 0.0
    slow_steps: int = 0  # steps over 200 ms
    traces: int = 0  # compiled functions traced (each a compile; engine/shapes.py)
    trace_steps: int = 0  # steps that traced
    prefill_step_tokens: int = 0  # prefill tokens (rows x columns) computed inside steps
    prefill_steps: int = 0  # steps that prefilled
    step_max_prefill_tokens: int = 0


@dataclass
class WorkerStatus:
    """One worker of a `--workers` job, as the dashboard shows it (cluster/pool.py keeps it current)."""

    name: str
    state: str = "starting"  # "starting" | "running" | "restarting" | "dead"
    host: str = ""
    pid: int = 0
    done: int = 0  # completions this worker delivered (samples: rows when n is 1)
    gen_tok_s: float = 0.0  # over the last few seconds
    restarts: int = 0
    busy_s: float = 0.0  # seconds its calls spent adding and stepping (the rest: waiting on the driver, or done)
