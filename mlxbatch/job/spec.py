"""A job: one frozen JobSpec (sampling settings in its SamplingParams) from a TOML job file and options.

Owns: the rules every setting's value must follow (`RULES`, one table checked for command-line
options, job-file keys and per-row fields alike), job-file loading (unknown keys are errors), the
output folder default, and the settings a resume must match (derived from the fields). The job
file is flat: sampling keys (max_tokens, temperature, ...) sit beside the others. Does not own:
running the job (runner.py) or reading rows (job/render.py applies the same rules to them).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from mlxbatch.errors import UsageError
from mlxbatch.types import DEFAULT_MODEL, DTYPES, SamplingParams

OUTPUT_FORMATS = ("results", "openai", "chat", "completions", "text")
REASONING_MODES = ("split", "keep", "drop")  # a thinking model's reasoning: apart, left in the output, removed
MAX_N = 256
MAX_TOKENS = 1_000_000
MAX_TOP_LOGPROBS = 20
MAX_WORKERS = 64
BASE_ADAPTER = "none"  # an adapter path meaning the base model
KV_BITS = (4, 8, 16)  # as engine/kvquant.py's BITS, plus 16 (off); repeated here so settings load no MLX
KV_GROUP_SIZES = (32, 64, 128)
_KV_KEYS = ("kv_bits", "kv_value_bits", "kv_group_size")


@dataclass(frozen=True)
class Rule:
    """The values one setting accepts; `check` returns the value (normalised) or raises ValueError."""

    kind: str  # "int" | "number" | "bool" | "text" | "name" | "texts" | "choice" | "path"
    lo: float | None = None
    hi: float | None = None
    is_open_low: bool = False
    choices: tuple = ()
    is_optional: bool = False  # None is allowed (it means "automatic")
    sep: str | None = None  # for "texts": one string is split on this

    def check(self, v):
        if v is None and self.is_optional:
            return None
        return _CHECKS[self.kind](self, v)

    @property
    def interval(self) -> str:
        if self.hi is None:
            return f"> {self.lo}" if self.is_open_low else f">= {self.lo}"
        return f"{'(' if self.is_open_low else '['}{self.lo}, {self.hi}]"

    def is_within(self, v) -> bool:
        above = v > self.lo if self.is_open_low else v >= self.lo
        return above and (self.hi is None or v <= self.hi)


def _int(r: Rule, v):
    if isinstance(v, bool) or not isinstance(v, int) or not r.is_within(v):
        raise ValueError(f"must be an integer {'in ' if r.hi is not None else ''}{r.interval}, got {v!r}")
    return v


def _number(r: Rule, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not r.is_within(v):  # NaN fails is_within
        raise ValueError(f"must be a number {'in ' if r.hi is not None else ''}{r.interval}, got {v!r}")
    return float(v)


def _bool(r: Rule, v):
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _text(r: Rule, v):
    if not isinstance(v, str):
        raise ValueError(f"must be a string, got {v!r}")
    return v


def _name(r: Rule, v):
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be a non-empty string, got {v!r}")
    return v


def _texts(r: Rule, v):
    if isinstance(v, str):
        v = v.split(r.sep) if r.sep else [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"must be a non-empty string or a list of them, got {v!r}")
    return tuple(v)


def _choice(r: Rule, v):
    if v not in r.choices:
        raise ValueError(f"must be one of {', '.join(map(str, r.choices))}, got {v!r}")
    return v


def _adapters(r: Rule, v):
    """`PATH`, `NAME=PATH`, `NAME=none`, a list of them, or a {name: path} table -> ((name, path|None), ...)."""
    if isinstance(v, dict):
        items = list(v.items())
    else:
        if isinstance(v, (str, Path)):
            v = [v]
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, (str, Path)) and str(x) for x in v):
            raise ValueError(f"must be PATH or NAME=PATH (or a list of them), got {v!r}")
        items = [_adapter_item(str(x)) for x in v]
    out, names = [], set()
    for name, path in items:
        if not isinstance(name, str) or not name or not isinstance(path, (str, Path)) or not str(path):
            raise ValueError(f"needs a name and a path (or none) for each adapter, got {name!r} = {path!r}")
        if name in names:
            raise ValueError(f"names adapter {name!r} twice")
        names.add(name)
        out.append((name, None if str(path).lower() == BASE_ADAPTER else str(path)))
    return tuple(out)


def _adapter_item(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name:
        return name, path
    if text.lower() == BASE_ADAPTER:
        return "base", text
    stem = Path(text.rstrip("/")).name.removesuffix(".safetensors")  # unnamed: the folder's or file's name
    return stem or text, text


def _path(r: Rule, v):
    if not isinstance(v, (str, Path)) or not str(v):
        raise ValueError(f"must be a path, got {v!r}")
    return Path(v)


_CHECKS = {"int": _int, "number": _number, "bool": _bool, "text": _text, "name": _name, "texts": _texts,
           "choice": _choice, "path": _path, "adapters": _adapters}

# Every key a user can set, by the name they type: `--max-tokens`, `max_tokens = ...` in a job
# file, or `"max_tokens": ...` in a row (ROW_KEYS). One table, so the three can never disagree.
RULES: dict[str, Rule] = {
    "max_tokens": Rule("int", 1, MAX_TOKENS),
    "temperature": Rule("number", 0, 100),
    "top_p": Rule("number", 0, 1, is_open_low=True),
    "top_k": Rule("int", 0, 1 << 30),
    "min_p": Rule("number", 0, 1),
    "seed": Rule("int", -(1 << 63), (1 << 64) - 1),  # what JSON (and the manifest) can hold
    "stop": Rule("texts"),
    "logprobs": Rule("bool"),
    "top_logprobs": Rule("int", 0, MAX_TOP_LOGPROBS),
    "n": Rule("int", 1, MAX_N),
    "input": Rule("path", is_optional=True),
    "output": Rule("path", is_optional=True),
    "model": Rule("name"),
    "dtype": Rule("choice", choices=DTYPES),
    "system": Rule("text", is_optional=True),
    "raw": Rule("bool"),
    "id_field": Rule("name"),
    "prompt_field": Rule("name"),
    "messages_field": Rule("name"),
    "output_format": Rule("choice", choices=OUTPUT_FORMATS, is_optional=True),
    "keep_fields": Rule("texts", sep=","),
    "parquet": Rule("bool"),
    "batch_size": Rule("int", 1, 1 << 20, is_optional=True),
    "max_kv_gb": Rule("number", 0, 1 << 20, is_open_low=True, is_optional=True),
    "max_memory_gb": Rule("number", 0, 1 << 20, is_open_low=True, is_optional=True),  # weights + KV + work
    "ignore_eos": Rule("bool", is_optional=True),
    "restart": Rule("bool"),
    "commit_seconds": Rule("number", 0, 3600),
    "json_schema": Rule("path", is_optional=True),  # every row's output matches this JSON schema file
    "regex": Rule("name", is_optional=True),  # every row's output matches this pattern
    "workers": Rule("int", 1, MAX_WORKERS, is_optional=True),  # None: the in-process engine, no Ray
    "ray_address": Rule("name", is_optional=True),  # None: a local Ray; "auto" or host:port: join one
    "adapter": Rule("adapters"),  # mlx-lm LoRA/DoRA adapters: PATH, NAME=PATH, NAME=none (the base model)
    "each_adapter": Rule("bool"),  # every row once per adapter
    "reasoning": Rule("choice", choices=REASONING_MODES),
    # KV stored packed (engine/kvquant.py): bits of keys (and values), values' own bits, group size.
    "kv_bits": Rule("choice", choices=KV_BITS, is_optional=True),  # None or 16: the model dtype
    "kv_value_bits": Rule("choice", choices=KV_BITS, is_optional=True),  # None: as kv_bits
    "kv_group_size": Rule("choice", choices=KV_GROUP_SIZES, is_optional=True),  # None: 64 where it divides the head
}
# The SamplingParams fields set by a key of the same name; `logprobs` is built from two keys.
SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams) if f.name not in ("logprobs", "constraint"))
# Keys a row may set for itself (OpenAI's max_completion_tokens is an alias of max_tokens).
ROW_KEYS = (*SAMPLING_KEYS, "logprobs", "top_logprobs", "n")

_RUN_ONLY = {"is_resume_setting": False}  # how the job runs, not what it writes: a resume may change it


@dataclass(frozen=True)
class JobSpec:
    input: Path | None = field(default=None, metadata=_RUN_ONLY)
    output: Path | None = field(default=None, metadata=_RUN_ONLY)
    model: str = field(default=DEFAULT_MODEL, metadata=_RUN_ONLY)  # the manifest's model entry checks it
    dtype: str = field(default="auto", metadata=_RUN_ONLY)  # likewise
    sampling: SamplingParams = SamplingParams()
    system: str | None = None
    raw: bool = False
    n: int = 1
    id_field: str = "id"
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    output_format: str | None = None  # None: "openai" for OpenAI Batch input, else "results"
    keep_fields: tuple[str, ...] = ()
    parquet: bool = field(default=False, metadata=_RUN_ONLY)
    batch_size: int | None = field(default=None, metadata=_RUN_ONLY)
    max_kv_gb: float | None = field(default=None, metadata=_RUN_ONLY)
    # Weights, KV and activations under this cap; layers that do not fit stream from the model's
    # files (engine/offload.py). None: the machine's default (models/streamed.py).
    max_memory_gb: float | None = field(default=None, metadata=_RUN_ONLY)
    ignore_eos: bool | None = None  # None: ignore for random: models (resolved by `validate`)
    restart: bool = field(default=False, metadata=_RUN_ONLY)
    commit_seconds: float = field(default=2.0, metadata=_RUN_ONLY)
    # Where the job's constraint came from; what it says is sampling.constraint (a resume setting).
    json_schema: Path | None = field(default=None, metadata=_RUN_ONLY)
    regex: str | None = field(default=None, metadata=_RUN_ONLY)
    # Ray workers: how the job runs, not what it writes (a resume may use another count).
    workers: int | None = field(default=None, metadata=_RUN_ONLY)
    ray_address: str | None = field(default=None, metadata=_RUN_ONLY)
    # Compressed KV changes outputs (a little): resume settings, left out of the manifest while unset.
    kv_bits: int | None = None
    kv_value_bits: int | None = None
    kv_group_size: int | None = None
    # (name, path or None) in order; the manifest checks them by content (runner.build_manifest).
    adapter: tuple[tuple[str, str | None], ...] = field(default=(), metadata=_RUN_ONLY)
    each_adapter: bool = False
    reasoning: str = "split"  # where a thinking model's reasoning goes in records (REASONING_MODES)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.adapter)

    def validate(self) -> "JobSpec":
        """Checks that need several fields; returns the spec with automatic values resolved."""
        if self.input is None:
            raise UsageError("no input file: give INPUT or set `input` in the job file")
        if self.output is not None and self.output.resolve() == self.input.resolve():
            raise UsageError(f"output {self.output} is the input file; choose another folder")
        if self.ray_address is not None and self.workers is None:
            raise UsageError(f"--ray-address {self.ray_address} needs --workers N (how many workers to start there)")
        if self.max_memory_gb is not None and self.workers is not None:
            raise UsageError("--max-memory-gb with --workers is not supported yet: give one or the other")
        if self.each_adapter and not self.adapter:
            raise UsageError("--each-adapter needs adapters: give --adapter NAME=PATH (and base=none for the base model)")
        spec = self._kv_resolved()
        if self.ignore_eos is None:  # resolved here so a resume compares what runs, not what was typed
            spec = replace(spec, ignore_eos=self.model.startswith("random:"))
        if (self.json_schema or self.regex) and self.sampling.constraint is None:
            spec = replace(spec, sampling=replace(self.sampling, constraint=self._constraint()))
        return spec

    def _kv_resolved(self) -> "JobSpec":
        """16 bits is the model dtype (off); the other KV keys need --kv-bits (the head-dimension
        check needs the model's config: runner.py, before the weights load)."""
        spec = replace(self, kv_bits=None) if self.kv_bits == 16 else self
        if spec.kv_value_bits == 16 and spec.kv_bits is None:
            spec = replace(spec, kv_value_bits=None)
        if spec.kv_bits is None:
            extra = [option_name(k) for k in ("kv_value_bits", "kv_group_size") if getattr(spec, k) is not None]
            if extra:
                raise UsageError(f"{' and '.join(extra)} need --kv-bits 8 or 4 (the KV cache is in the model dtype)")
        elif spec.kv_value_bits == 16:
            raise UsageError("--kv-value-bits 16 with --kv-bits: values must be packed too (4 or 8)")
        return spec

    def _constraint(self):
        """The job-wide constraint, checked now: a bad schema or regex stops before the model loads."""
        from mlxbatch.job.grammar import (
            GrammarError,
            grammar_of,
            load_schema_file,
            regex_constraint,
        )

        if self.json_schema and self.regex:
            raise UsageError("--json-schema and --regex are exclusive: give one")
        name = f"--json-schema {self.json_schema}" if self.json_schema else f"--regex {self.regex!r}"
        try:
            c = load_schema_file(self.json_schema) if self.json_schema else regex_constraint(self.regex)
            grammar_of(c)
        except GrammarError as exc:
            raise UsageError(f"{name}: {exc}") from None
        return c

    @property
    def output_dir(self) -> Path:
        if self.output is not None:
            return self.output
        name = self.input.name
        for suffix in (".gz", ".jsonl", ".json", ".parquet", ".ndjson"):
            name = name.removesuffix(suffix)
        return self.input.parent / f"{name}.mlxbatch"

    def resume_settings(self) -> dict:
        """What a resume must match: every field that changes an output, sampling ones flattened."""
        out = dataclasses.asdict(self.sampling)
        if out["constraint"] is None:
            del out["constraint"]  # folders of jobs without one resume as before this setting existed
        if not self.each_adapter:
            out.pop("each_adapter", None)  # likewise
        if self.reasoning == "split":
            out.pop("reasoning", None)  # likewise
        for f in fields(self):
            if f.name != "sampling" and f.metadata.get("is_resume_setting", True):
                out[f.name] = getattr(self, f.name)
        if self.kv_bits is None:  # likewise for jobs with the KV in the model dtype
            for k in _KV_KEYS:
                del out[k]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def check_values(values: dict, name_of) -> dict:
    """Each value through its rule; a bad one is a usage error naming it as `name_of(key)` does."""
    out = {}
    for key, value in values.items():
        try:
            out[key] = RULES[key].check(value)
        except ValueError as exc:
            raise UsageError(f"{name_of(key)} {exc}") from None
    return out


def logprobs_setting(logprobs: bool, top_logprobs: int) -> int | None:
    """SamplingParams.logprobs from the two keys users set: off, or how many alternatives."""
    return top_logprobs if logprobs else None


def make_spec(values: dict) -> JobSpec:
    """A JobSpec from checked flat values: sampling keys go into its SamplingParams."""
    values = dict(values)
    sampling = {k: values.pop(k) for k in SAMPLING_KEYS if k in values}
    logprobs = logprobs_setting(values.pop("logprobs", False), values.pop("top_logprobs", 0) or 0)
    return JobSpec(**values, sampling=SamplingParams(**sampling, logprobs=logprobs)).validate()


def load_job_file(path: Path) -> dict:
    """Checked options from a TOML job file; relative paths are relative to the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such job file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from exc
    if "adapters" in data:  # the job file's table of them: [adapters] name = "path"
        if "adapter" in data:
            raise UsageError(f"{path}: give adapters as `adapter = [...]` or an [adapters] table, not both")
        data["adapter"] = data.pop("adapters")
    unknown = sorted(set(data) - set(RULES))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(RULES))}")
    data = check_values(data, lambda key: f"{path}: {key}")
    for key in ("input", "output", "json_schema"):
        if data.get(key) is not None and not data[key].is_absolute():
            data[key] = (path.parent / data[key]).resolve()
    if "adapter" in data:
        data["adapter"] = tuple((n, p if p is None or Path(p).expanduser().is_absolute() else str(path.parent / p))
                                for n, p in data["adapter"])
    return data


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def build_spec(job_file: Path | None, options: dict) -> JobSpec:
    """Job file values, then the command-line options that were given (not None, not empty)."""
    values = load_job_file(job_file) if job_file else {}
    given = {k: v for k, v in options.items() if v is not None and v not in ((), [])}
    values.update(check_values(given, option_name))
    return make_spec(values)
