"""Structured output: JSON schemas and regexes as token grammars (llguidance).

Owns: reading a constraint (OpenAI `response_format`, a `--json-schema` file, `--regex`) into a
`Constraint`, checking it without a model (`validate`, usage errors before the model loads),
compiling it once per distinct constraint for the model's tokenizer, the per-row `Guide` (the
grammar's state) and the token bitmask a batch of guides fills at once. Does not own: applying
the mask to logits (engine/sampling.py) or parsing outputs (output/records.py).

Why llguidance (over xgrammar and outlines-core): MIT, abi3 wheels (one per platform for every
Python), no torch; the bitmask of a whole batch is filled in Rust threads (~2-3 ms for 256 rows
of a 49k vocabulary on 2 CPU cores); schemas compile lazily (no vocabulary-wide index up front);
keywords it cannot enforce are errors that name them (never silently dropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from mlxbatch.types import Constraint

if TYPE_CHECKING:
    import numpy as np

ANY_JSON_OBJECT = {"type": "object"}  # OpenAI's {"type": "json_object"}
# JSON laid out as json.dumps does, no free whitespace: small models otherwise loop on blank lines until
# max_tokens. A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A constraint that cannot be compiled: the message is llguidance's (or ours), for the user."""


def json_constraint(schema) -> Constraint:
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        text = orjson.dumps(schema).decode()  # keys kept in order: properties are generated so
    except orjson.JSONEncodeError as exc:  # nested past orjson's limit (255 levels), or not JSON at all
        raise GrammarError(f"the schema cannot be read ({exc}; JSON nested over 255 levels is refused)") from None
    return Constraint("json", text)


def regex_constraint(pattern) -> Constraint:
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError(f"a regex must be a non-empty string, got {pattern!r}")
    return Constraint("regex", pattern)


def from_response_format(rf) -> Constraint | None:
    """OpenAI's `response_format`: {"type": "text"} (free text: None), "json_object", or
    "json_schema" with {"name", "schema", "strict"} (strict is what we always do)."""
    if not isinstance(rf, dict):
        raise GrammarError(f"must be an object with a 'type', got {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_constraint(ANY_JSON_OBJECT)
    if kind != "json_schema":
        raise GrammarError(f"type is {kind!r}; supported: text, json_object, json_schema")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise GrammarError("json_schema must be an object with a 'schema' (and 'name', 'strict')")
    return json_constraint(spec["schema"])


def load_schema_file(path: Path) -> Constraint:
    try:
        return json_constraint(orjson.loads(Path(path).read_bytes()))
    except OSError as exc:
        raise GrammarError(f"cannot read {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise GrammarError(f"{path} is not valid JSON ({exc})") from None


_CHECKED: dict[Constraint, str | GrammarError] = {}  # grammar text or the error, per distinct constraint
_MAX_CHECKED = 1024


def grammar_of(c: Constraint) -> str:
    """The llguidance grammar of a constraint, checked without a tokenizer (cached per constraint)."""
    found = _CHECKED.get(c)
    if found is None:
        found = _compile_text(c)
        if len(_CHECKED) >= _MAX_CHECKED:
            _CHECKED.clear()
        _CHECKED[c] = found
    if isinstance(found, GrammarError):
        raise found
    return found


def _compile_text(c: Constraint) -> str | GrammarError:
    from llguidance import LLMatcher

    try:
        if c.kind == "lark":  # a forced tool call (chat/tools.py), written for one model's tokenizer
            grammar = LLMatcher.grammar_from_lark(c.text)
        elif c.is_json:
            grammar = LLMatcher.grammar_from_json_schema(c.text, defaults=JSON_OPTIONS)
        else:
            grammar = LLMatcher.grammar_from_regex(c.text)
    except ValueError as exc:
        return GrammarError(str(exc))
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    messages = [m for m in messages if not m.startswith("no tokenizer")]  # token ids: checked when compiled
    if is_error or messages:  # a warning names something the grammar would not enforce: refused, not dropped
        return GrammarError(" ".join(m.strip() for m in messages))
    return grammar


class Grammars:
    """One model's tokenizer as llguidance sees it; a compiled matcher per distinct constraint."""

    def __init__(self, tokenizer):
        self._hf = tokenizer
        self._tokenizer = None  # built on the first constraint (~0.3 s)
        self._templates: dict = {}
        self._executor = None

    def guide(self, c: Constraint) -> "Guide":
        """A fresh guide for one row; raises GrammarError if the constraint does not compile."""
        template = self._templates.get(c)
        if template is None:
            template = self._compile(c)
            self._templates[c] = template
        return Guide(template.deep_copy(), self)

    def _compile(self, c: Constraint):
        import llguidance as llg

        grammar = grammar_of(c)
        if self._tokenizer is None:
            hf = getattr(self._hf, "_tokenizer", self._hf)
            try:
                self._tokenizer = llg.LLTokenizer(hf.backend_tokenizer.to_str(), n_vocab=len(hf),
                                                  eos_token=sorted(self._hf.eos_token_ids or [hf.eos_token_id]))
            except (AttributeError, ValueError, TypeError) as exc:
                raise GrammarError(f"this model's tokenizer cannot be used for constraints ({exc})") from None
            self._executor = llg.LLExecutor()
        matcher = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher

    @property
    def num_words(self) -> int:
        return (self._tokenizer.vocab_size + 31) // 32

    def masks(self, guided: list, batch: int) -> np.ndarray:
        """uint32 bitmask [batch, words] of allowed tokens: `guided` (row, Guide) rows filled in
        parallel, every other row all ones."""
        import numpy as np  # here, not at import: a job without constraints never needs it (~0.2 s)
        from llguidance.numpy import fill_next_token_bitmask_par

        out = np.full((batch, self.num_words), -1, dtype=np.int32)
        fill_next_token_bitmask_par(self._executor, [(g.matcher, i) for i, g in guided], out)
        return out.view(np.uint32)


class Guide:
    """One row's grammar state: which tokens it may take next, advanced token by token."""

    __slots__ = ("matcher", "grammars")

    def __init__(self, matcher, grammars: Grammars):
        self.matcher = matcher
        self.grammars = grammars

    def consume(self, token: int) -> bool:
        """Advance by the sampled token; True once the row must stop (grammar complete, or broken)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped() or self.matcher.is_error()

    def reset(self) -> None:
        """Back to the start (the engine reruns a row from its first token after running out of memory)."""
        self.matcher.reset()

    def masks(self, guided: list, batch: int) -> np.ndarray:
        """The batch bitmask for `guided` (row, Guide) pairs of this guide's tokenizer."""
        return self.grammars.masks(guided, batch)
