"""Rows -> rendered items: what to ask the model, with which settings.

Owns: recognising the three row shapes (plain prompt, chat messages, OpenAI
Batch request line), validating fields with messages that name the line and
field, chat templating (Jinja's sandbox with transformers' settings, through
models/tokenizer.py), per-row sampling overrides and per-sample seeds. Does not own:
reading files (job/source.py) or running the model (engine/core.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from mlxbatch.chat.formats import THINK, chat_format
from mlxbatch.chat.tools import ToolError, forced_constraint, message_extras
from mlxbatch.errors import RowError
from mlxbatch.job.deadline import TimeLimitExceeded, time_limit
from mlxbatch.job.grammar import GrammarError, from_response_format, grammar_of
from mlxbatch.job.openai_body import DEFAULT_MODEL_NAME, check_body, model_names, tools_of
from mlxbatch.job.spec import ROW_KEYS, RULES, JobSpec, logprobs_setting
from mlxbatch.types import Item, Row, SamplingParams

OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
ROLES = {"system", "developer", "user", "assistant", "tool"}

MAX_TEMPLATE_SECONDS = 5.0  # per row; a real template renders in well under a millisecond


def raw_id(row: Row, id_field: str):
    """The id a row declares (or its line-derived one), without validating the row."""
    if row.data is None:
        return None
    if "custom_id" in row.data or "body" in row.data:
        return row.data.get("custom_id")
    rid = row.data.get(id_field)
    return f"line-{row.line}" if rid is None else rid


def derive_seed(*parts) -> int:
    """A 32-bit seed from the row identity, so a rerun draws the same samples."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class Renderer:
    def __init__(self, spec: JobSpec, tokenizer, context_length: int, *, names: set[str] | None = None):
        """`names`: what a Batch line's `model` may say (the loaded model's `names`; without a model,
        those of the job's --model); the job's adapter names too, as a line's model selects one."""
        self.spec = spec
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.has_template = getattr(tokenizer, "chat_template", None) is not None
        self.names = (names or model_names(spec.model)) | set(spec.adapter_names)
        self.chat = chat_format(tokenizer, spec.model)

    def render(self, row: Row) -> Item:
        if row.error:
            raise row.error
        data = row.data
        if "custom_id" in data or "body" in data:
            return self._openai(row, data)
        rid = self._row_id(row, data)
        overrides = data
        if self.spec.messages_field in data:
            messages = _messages(data[self.spec.messages_field], row.line, self.spec.messages_field)
            return self._item(row, rid, "chat", overrides, messages=self._with_system(messages))
        if self.spec.prompt_field in data:
            prompt = _text(data[self.spec.prompt_field], row.line, self.spec.prompt_field)
            if self.spec.raw or not self.has_template:
                return self._item(row, rid, "prompt", overrides, prompt=prompt)
            msgs = self._with_system([{"role": "user", "content": prompt}])
            return self._item(row, rid, "prompt", overrides, prompt=prompt, messages=msgs)
        raise RowError("missing_prompt", f"line {row.line}: no {self.spec.prompt_field!r} or "
                       f"{self.spec.messages_field!r} field (fields: {', '.join(sorted(data)) or 'none'})")

    def _row_id(self, row: Row, data: dict) -> str:
        rid = raw_id(row, self.spec.id_field)
        if rid is None:
            return f"line-{row.line}"
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            raise RowError("invalid_field", f"line {row.line}: field {self.spec.id_field!r} must be a non-empty string or integer")
        return str(rid)

    def _with_system(self, messages: list) -> list:
        if self.spec.system and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.spec.system}, *messages]
        return messages

    def _openai(self, row: Row, data: dict) -> Item:
        line = row.line
        cid = data.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise RowError("invalid_field", f"line {line}: field 'custom_id' must be a non-empty string")
        if data.get("method", "POST") != "POST":
            raise RowError("invalid_field", f"line {line}: field 'method' must be \"POST\"")
        url = data.get("url")
        if url not in OPENAI_URLS:
            raise RowError("unsupported_url", f"line {line}: field 'url' is {url!r}; supported: {', '.join(OPENAI_URLS)}")
        body = data.get("body")
        if not isinstance(body, dict):
            raise RowError("invalid_field", f"line {line}: field 'body' must be an object")
        is_chat = OPENAI_URLS[url] == "chat"
        check_body(body, line=line, is_chat=is_chat, names=self.names, model=self.spec.model)
        model_field = body.get("model") if body.get("model") != DEFAULT_MODEL_NAME else None
        if is_chat:
            messages = _messages(body.get("messages"), line, "body.messages")
            return self._item(row, cid, "openai-chat", body, messages=self._with_system(messages),
                              custom_id=cid, model_field=model_field)
        prompt = _text(body.get("prompt"), line, "body.prompt")
        return self._item(row, cid, "openai-completion", body, prompt=prompt, custom_id=cid, model_field=model_field)

    def _item(self, row: Row, rid: str, kind: str, overrides: dict, *, messages=None, prompt=None, **extra) -> Item:
        """An item without tokens yet: `render_many` tokenizes a whole batch of them at once."""
        params, n = self._params(overrides, row.line, kind == "openai-chat")
        kept = {k: row.data[k] for k in self.spec.keep_fields if k in row.data}
        adapters = self._adapters(row, overrides if kind.startswith("openai") else None)
        tools = tools_of(overrides, row.line) if kind != "openai-completion" else None
        if tools is not None and tools.is_on and self.tokenizer is not None and self.chat.tools is None:
            raise RowError("invalid_field", f"line {row.line}: field 'tools': the model {self.spec.model!r} has no "
                           "tool-call format mlxbatch can parse (supported: JSON <tool_call> as Qwen/Hermes write "
                           "it, Mistral, Llama 3 JSON, pythonic, gpt-oss harmony); see docs/server.md", param="tools")
        if tools is not None and tools.is_forced and params.constraint is not None:
            raise RowError("invalid_field", f"line {row.line}: field 'tool_choice' forces a call, which cannot be "
                           "combined with 'response_format'", param="tool_choice")
        return Item(row.index, row.line, rid, kind, None, params, n, messages, prompt, kept=kept,
                    adapters=adapters, tools=tools, enable_thinking=_thinking(overrides, row.line), **extra)

    def _adapters(self, row: Row, body: dict | None) -> tuple[int, ...]:
        """The job's adapters this row runs with: its `adapter` field's (or an OpenAI body.model naming
        one), else every adapter with --each-adapter, else the first; () for a job without adapters."""
        names = self.spec.adapter_names
        chosen = row.data.get("adapter")
        if chosen is None and body is not None and body.get("model") in names:
            chosen = body["model"]
        if chosen is None:
            return tuple(range(len(names))) if self.spec.each_adapter else (0,) if names else ()
        if not isinstance(chosen, str) or chosen not in names:
            known = f"this job's adapters: {', '.join(names)}" if names else "this job has none (give --adapter NAME=PATH)"
            raise RowError("invalid_field", f"line {row.line}: field 'adapter' is {chosen!r}, no adapter of this job; "
                           f"{known}")
        return (names.index(chosen),)

    def render_many(self, rows: list[Row]) -> list:
        """Each row's Item (tokenized) or RowError, in order; one tokenizer call for all."""
        out = []
        for row in rows:
            try:
                out.append(self.render(row))
            except RowError as err:
                out.append(err)
        if self.tokenizer is None:  # `validate`: rules only, no model
            return out
        texts = {i: self._text(x) for i, x in enumerate(out) if isinstance(x, Item)}
        for i, text in texts.items():
            is_templated = isinstance(text, str) and self._is_templated(out[i])
            out[i] = text if isinstance(text, RowError) else self._with_reasoning(out[i], text) if is_templated \
                else out[i]
        templated = [i for i in texts if isinstance(out[i], Item) and self._is_templated(out[i])]
        plain = [i for i in texts if isinstance(out[i], Item) and not self._is_templated(out[i])]
        for group, special in ((templated, False), (plain, True)):
            if group:
                ids = self.tokenizer.encode_batch([texts[i] for i in group], add_special_tokens=special)
                for i, tokens in zip(group, ids):
                    out[i] = self._with_tokens(out[i], list(tokens))
        return out

    def _is_templated(self, item: Item) -> bool:
        return item.messages is not None and item.kind != "openai-completion"

    def _text(self, item: Item):
        """The exact text the model sees, or a RowError if the chat template rejects the row."""
        if not self._is_templated(item):
            return item.prompt
        if not self.has_template:
            return RowError("template_error", f"line {item.line}: the model has no chat template, so chat messages "
                            "cannot be rendered; give the text as a plain prompt instead")
        extra = {} if item.enable_thinking is None else {"enable_thinking": item.enable_thinking}
        if item.tools is not None and (item.tools.is_on or self.chat.tools is not None):
            extra["tools"] = item.tools.template_tools
        try:
            with time_limit(MAX_TEMPLATE_SECONDS):  # a template can loop for ever: a row error, not a hang
                return self.tokenizer.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=False,
                                                          **extra)
        except TimeLimitExceeded:
            return RowError("template_timeout", f"line {item.line}: the chat template took over "
                            f"{MAX_TEMPLATE_SECONDS:g} s to render this row")
        except Exception as exc:  # template errors (e.g. raise_exception in Jinja)
            return RowError("template_error", f"line {item.line}: the chat template rejected this row ({exc})")

    def _with_reasoning(self, item: Item, text: str):
        """Whether the prompt leaves a <think> open (the output starts as reasoning), and the grammar of a
        forced tool call (its reasoning prefix depends on that)."""
        is_open = self.chat.reasoning == "think" and text.rfind(THINK[0]) > text.rfind(THINK[1])
        item = replace(item, is_reasoning_open=is_open)
        if item.tools is None or not item.tools.is_forced:
            return item
        try:
            c = forced_constraint(item.tools, self.chat, self.tokenizer, is_reasoning_open=is_open,
                                  max_reasoning_tokens=item.params.max_tokens // 2)
            grammar_of(c)
        except ToolError as exc:
            return RowError("invalid_field", f"line {item.line}: {exc.message}", param=exc.param)
        except GrammarError as exc:
            return RowError("invalid_schema", f"line {item.line}: the forced tool call's grammar: {exc}",
                            param="tools")
        return replace(item, params=replace(item.params, constraint=c))

    def _with_tokens(self, item: Item, tokens: list):
        if len(tokens) >= self.context_length:
            return RowError("prompt_too_long", f"line {item.line}: prompt has {len(tokens)} tokens; the model's "
                            f"context is {self.context_length}")
        if not tokens:
            return RowError("missing_prompt", f"line {item.line}: the prompt renders to no tokens")
        return replace(item, tokens=tokens)

    def _params(self, o: dict, line: int, is_chat_api: bool) -> tuple[SamplingParams, int]:
        """The row's own settings where it gives them (checked by the job's RULES), else the job's."""
        base = self.spec.sampling
        given = {k: o[k] for k in ROW_KEYS if o.get(k) is not None}  # null means "the job's value"
        if o.get("max_completion_tokens") is not None:  # OpenAI's newer name for max_tokens
            given["max_tokens"] = o["max_completion_tokens"]
        if not is_chat_api and _is_int(given.get("logprobs")):
            given["logprobs"], given["top_logprobs"] = True, given["logprobs"]  # completions-style "logprobs": n
        given = {k: _checked(k, v, line) for k, v in given.items()}
        if "logprobs" in given or "top_logprobs" in given:
            is_on = given.pop("logprobs", base.logprobs is not None)
            given["logprobs"] = logprobs_setting(is_on, given.pop("top_logprobs", base.logprobs or 0))
        if o.get("response_format") is not None:  # OpenAI's structured output; {"type": "text"} frees a row of the job's
            given["constraint"] = _constraint(o["response_format"], line)
        n = given.pop("n", self.spec.n)
        return replace(base, **given), n


def request_params(item: Item, sample: int) -> SamplingParams:
    """The item's settings with this sample's own seed (job or row seed, id, sample index)."""
    return replace(item.params, seed=derive_seed(item.params.seed, item.id, sample))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked(key: str, value, line: int):
    try:
        return RULES[key].check(value)
    except ValueError as exc:
        raise RowError("invalid_field", f"line {line}: field {key!r} {exc}") from None


def _constraint(rf, line: int):
    """A row's response_format as a checked Constraint (None for free text)."""
    try:
        c = from_response_format(rf)
        if c is not None:
            grammar_of(c)  # cached per distinct schema: a job's thousand rows check it once
        return c
    except GrammarError as exc:
        raise RowError("invalid_schema", f"line {line}: response_format: {exc}") from None


def _text(v, line: int, name: str) -> str:
    if not isinstance(v, str):
        raise RowError("invalid_field", f"line {line}: field {name!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise RowError("missing_prompt", f"line {line}: field {name!r} is empty")
    return v


def _messages(v, line: int, name: str) -> list:
    if not isinstance(v, list) or not v:
        raise RowError("invalid_field", f"line {line}: field {name!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(v):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise RowError("invalid_field", f"line {line}: {where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise RowError("invalid_field", f"line {line}: {where}.role is {role!r}; expected one of {', '.join(sorted(ROLES))}")
        try:
            extras = message_extras(m, role, where)
        except ToolError as exc:
            raise RowError("invalid_field", f"line {line}: {exc.message}", param=exc.param) from None
        # An assistant turn that only calls tools has no content (OpenAI sends null).
        is_call_only = "tool_calls" in extras and m.get("content") is None
        content = None if is_call_only else _content(m.get("content"), line, f"{where}.content")
        out.append({"role": role, "content": content, **extras})
    return out


def _thinking(data: dict, line: int) -> bool | None:
    """The row's `enable_thinking` (or vLLM's `chat_template_kwargs.enable_thinking`); None: the template's."""
    kwargs = data.get("chat_template_kwargs")
    value = data.get("enable_thinking", kwargs.get("enable_thinking") if isinstance(kwargs, dict) else None)
    if value is not None and not isinstance(value, bool):
        raise RowError("invalid_field", f"line {line}: field 'enable_thinking' must be true or false, got {value!r}",
                       param="enable_thinking")
    return value


def _content(v, line: int, where: str) -> str:
    if isinstance(v, str):
        return v
    # OpenAI content parts: keep the text ones.
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
        return "".join(p["text"] for p in v)
    raise RowError("invalid_field", f"line {line}: {where} must be a string or a list of text parts")
