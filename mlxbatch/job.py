"""A job: one frozen JobSpec from a TOML job file merged with command-line options.

Owns: the option names and defaults, job-file loading (unknown keys are
errors), validation, the output folder default, and the settings that a
resume must match. Does not own: running the job (runner.py).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .models import DEFAULT_MODEL, DTYPES

OUTPUT_FORMATS = ("results", "openai", "chat", "completions", "text")
MAX_N = 256


@dataclass(frozen=True)
class JobSpec:
    input: Path | None = None
    output: Path | None = None
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    system: str | None = None
    raw: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    id_field: str = "id"
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    output_format: str | None = None  # None: "openai" for OpenAI Batch input, else "results"
    keep_fields: tuple[str, ...] = ()
    parquet: bool = False
    batch_size: int | None = None
    max_kv_gb: float | None = None
    ignore_eos: bool | None = None
    restart: bool = False
    commit_seconds: float = 2.0

    def validate(self) -> "JobSpec":
        if self.input is None:
            raise UsageError("no input file: give INPUT or set `input` in the job file")
        _check(self.max_tokens >= 1, "max_tokens must be >= 1")
        _check(self.temperature >= 0, "temperature must be >= 0")
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _check(self.top_k >= 0, "top_k must be >= 0")
        _check(0 <= self.min_p <= 1, "min_p must be in [0, 1]")
        _check(1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}]")
        _check(0 <= self.top_logprobs <= 20, "top_logprobs must be in [0, 20]")
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}")
        _check(self.output_format in (None, *OUTPUT_FORMATS),
               f"output_format must be one of {', '.join(OUTPUT_FORMATS)}")
        _check(self.batch_size is None or self.batch_size >= 1, "batch_size must be >= 1")
        if self.output is not None and self.output.resolve() == self.input.resolve():
            raise UsageError(f"output {self.output} is the input file; choose another folder")
        return self

    @property
    def output_dir(self) -> Path:
        if self.output is not None:
            return self.output
        name = self.input.name
        for suffix in (".gz", ".jsonl", ".json", ".parquet", ".ndjson"):
            name = name.removesuffix(suffix)
        return self.input.parent / f"{name}.mlxbatch"

    def resume_settings(self) -> dict:
        """What a resume must match: everything that changes an output."""
        keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "system", "raw",
                "n", "logprobs", "top_logprobs", "id_field", "prompt_field", "messages_field",
                "output_format", "keep_fields", "ignore_eos")
        return {k: _plain(getattr(self, k)) for k in keys}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


_FIELDS = {f.name: f for f in dataclasses.fields(JobSpec)}
_PATHS = ("input", "output")


def load_job_file(path: Path) -> dict:
    """Options from a TOML job file; relative paths are relative to the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such job file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from exc
    unknown = sorted(set(data) - set(_FIELDS) - {"restart"})
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    for key in _PATHS:
        if key in data:
            data[key] = (path.parent / data[key]).resolve() if not Path(data[key]).is_absolute() else Path(data[key])
    for key in ("stop", "keep_fields"):
        if key in data:
            data[key] = tuple([data[key]] if isinstance(data[key], str) else data[key])
    return data


def build_spec(job_file: Path | None, overrides: dict) -> JobSpec:
    """Job file values, then command-line values that were given (not None)."""
    values = load_job_file(job_file) if job_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    try:
        return JobSpec(**values).validate()
    except TypeError as exc:
        raise UsageError(f"bad job settings: {exc}") from exc
