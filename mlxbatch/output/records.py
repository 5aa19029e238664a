"""Output records: the line shapes of each output format, and Parquet export.

Owns: `results` records, OpenAI Batch output lines (chat.completion and
text_completion bodies, with logprobs in OpenAI's shape), the finetuning shapes
mlx-lm's LoRA trainer reads (`chat`, `completions`, `text`), error records, which
fields a format generates (kept input fields may not clash with them), and
streaming results.parquet from committed records. Does not own: durability or
file names (output/checkpoint.py).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import orjson

from mlxbatch.chat.formats import chat_format
from mlxbatch.chat.parse import ParsedOutput, make_parser, split_output
from mlxbatch.chat.tools import openai_calls
from mlxbatch.errors import UsageError
from mlxbatch.job.render import Item
from mlxbatch.output import journal
from mlxbatch.output.checkpoint import PARQUET
from mlxbatch.output.fs import create_temp, io_error, publish
from mlxbatch.output.journal import RESULTS
from mlxbatch.types import Completion

_DUMP = orjson.OPT_APPEND_NEWLINE


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _parsed(c: Completion, text: str):
    """A JSON-constrained output's value; None when it was cut off before the JSON closed."""
    if c.finish_reason != "stop":
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # a stop string cut it short
        return None


class RecordMaker:
    """Turns a finished item (all its samples) into the bytes of its output lines."""

    def __init__(self, fmt: str | None, model_name: str, tokenizer, adapters: tuple[str, ...] = (), *,
                 reasoning: str = "split"):
        self.fmt = fmt
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.adapters = adapters  # the job's adapter names: records say which one made them
        self.reasoning = reasoning  # "split": apart from the output; "keep": left in it; "drop": removed
        self.chat = chat_format(tokenizer, model_name)

    def split(self, item: Item, c: Completion) -> ParsedOutput:
        """The output as content, reasoning and tool calls (what the model wrote, where it wrote them)."""
        tools = item.tools if item.tools is not None and item.tools.is_on else None
        if self.reasoning == "keep" and tools is None:
            return ParsedOutput(c.text)
        return split_output(c.text, self.chat, tool_names=tools.names if tools else None,
                            is_reasoning_open=item.is_reasoning_open, is_reasoning=self.reasoning != "keep")

    def stream_parser(self, item: Item):
        """A streaming parser for one sample's deltas (None: every delta is content), as `split` decides."""
        tools = item.tools if item.tools is not None and item.tools.is_on else None
        if self.reasoning == "keep" and tools is None:
            return None
        return make_parser(self.chat, tool_names=tools.names if tools else None,
                           is_reasoning_open=item.is_reasoning_open, is_reasoning=self.reasoning != "keep")

    def _has_reasoning(self) -> bool:
        return self.reasoning == "split" and self.chat.reasoning is not None

    def format_for(self, item: Item) -> str:
        return self.fmt or ("openai" if item.is_openai else "results")

    def records(self, item: Item, done: list[Completion]) -> bytes:
        """The item's lines: `done` holds n samples per adapter it ran with, adapter after adapter."""
        fmt = self.format_for(item)
        if fmt == "openai":  # one Batch line per adapter, its body's model naming it
            groups = [done[i : i + item.n] for i in range(0, len(done), item.n)]
            return b"".join(orjson.dumps(self._openai(item, g, self._adapter(item, k * item.n)), option=_DUMP)
                            for k, g in enumerate(groups))
        lines = [self._one(fmt, item, c, i % item.n, self._adapter(item, i)) for i, c in enumerate(done)]
        return b"".join(orjson.dumps(x, option=_DUMP) for x in lines)

    def _adapter(self, item: Item, i: int) -> str | None:
        return self.adapters[item.adapters[i // item.n]] if item.adapters else None

    def _one(self, fmt: str, item: Item, c: Completion, sample: int, adapter: str | None = None) -> dict:
        out = self.split(item, c)
        calls = openai_calls(out.tool_calls, f"{item.id}:{sample}")
        finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
        if fmt == "results":
            rec = {"id": item.id, "output": out.content}
            if self._has_reasoning():
                rec["reasoning"] = out.reasoning
            if item.tools is not None and item.tools.is_on:
                rec["tool_calls"] = calls
            rec |= {"finish_reason": finish, "usage": _usage(c.prompt_tokens, c.completion_tokens)}
            if item.params.constraint is not None and item.params.constraint.is_json:
                rec["parsed"] = _parsed(c, out.content)
            if item.n > 1:
                rec["sample"] = sample
            if c.logprobs is not None:
                rec["logprobs"] = self.chat_logprobs(c.logprobs)
        elif fmt == "chat":
            rec = {"messages": [*(item.messages or [{"role": "user", "content": item.prompt}]),
                                self._assistant(out, calls)]}
        elif fmt == "completions":
            rec = {"prompt": item.prompt if item.prompt is not None else item.messages[-1]["content"],
                   "completion": out.content}
        else:  # text: the exact prompt the model saw, then its output
            rec = {"text": self.tokenizer.decode(item.tokens) + out.content}
        if fmt != "results":
            # Bookkeeping for `mlxbatch export` (which strips it): trainers ignore extra keys.
            rec["finish_reason"] = finish
            if fmt != "chat" and self._has_reasoning():
                rec["reasoning"] = out.reasoning
            if item.n > 1:
                rec["sample"] = sample
        if adapter is not None:  # `mlxbatch export --adapter` filters on it (and strips it)
            rec["adapter"] = adapter
        return {**rec, **item.kept}

    # ------------------------------------------------------------ OpenAI shapes
    def _openai(self, item: Item, done: list[Completion], adapter: str | None = None) -> dict:
        cid = item.custom_id or item.id
        body = self.openai_body(item, done, ("cmpl-" if item.kind == "openai-completion" else "chatcmpl-")
                                + _short_hash(cid), adapter)
        return {"id": "batch_req_" + _short_hash(cid), "custom_id": cid,
                "response": {"status_code": 200, "request_id": "req_" + _short_hash(cid), "body": body},
                "error": None, **item.kept}

    def openai_body(self, item: Item, done: list[Completion], rid: str, adapter: str | None = None) -> dict:
        """A chat.completion or text_completion object: a Batch line's response body, a server's reply."""
        is_completion = item.kind == "openai-completion"
        choices = [self._completion_choice(c, i) if is_completion else self._chat_choice(item, c, i, rid)
                   for i, c in enumerate(done)]
        return {
            "id": rid,
            "object": "text_completion" if is_completion else "chat.completion",
            "created": int(time.time()),
            "model": adapter or item.model_field or self.model_name,
            "choices": choices,
            "usage": _usage(done[0].prompt_tokens, sum(c.completion_tokens for c in done)),
        }

    def _assistant(self, out: ParsedOutput, calls: list, *, is_api: bool = False) -> dict:
        """The assistant message: content (null beside calls, as OpenAI sends), reasoning_content, tool_calls."""
        msg = {"role": "assistant", "content": None if calls and not out.content else out.content}
        if is_api:
            msg["refusal"] = None
        if self._has_reasoning() and out.reasoning is not None:
            msg["reasoning_content"] = out.reasoning
        if calls:
            msg["tool_calls"] = calls
        return msg

    def _chat_choice(self, item: Item, c: Completion, i: int, rid: str) -> dict:
        out = self.split(item, c)
        calls = openai_calls(out.tool_calls, f"{rid}:{i}")
        return {"index": i, "message": self._assistant(out, calls, is_api=True),
                "logprobs": self.chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason}

    def _completion_choice(self, c: Completion, i: int) -> dict:
        lp = self.completion_logprobs(c.logprobs) if c.logprobs is not None else None
        return {"text": c.text, "index": i, "logprobs": lp, "finish_reason": c.finish_reason}

    def completion_logprobs(self, entries: list, start: int = 0) -> dict:
        """Completions-style logprobs of (token, logprob, top) entries; offsets count from `start`."""
        toks = [self._tok(t) for t, _, _ in entries]
        offsets, pos = [], start
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": toks, "token_logprobs": [v for _, v, _ in entries],
                "top_logprobs": [{self._tok(a): b for a, b in top} for _, _, top in entries],
                "text_offset": offsets}

    def chat_logprobs(self, entries: list) -> dict:
        """Chat-style logprobs of (token, logprob, top) entries."""
        def entry(token: int, value: float) -> dict:
            text = self._tok(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {"content": [{**entry(t, v), "top_logprobs": [entry(a, b) for a, b in top]}
                            for t, v, top in entries]}

    def _tok(self, token: int) -> str:
        return self.tokenizer.decode([token])

    # ------------------------------------------------------------ errors
    def error(self, *, line: int, rid: str | None, code: str, message: str, custom_id: str | None = None,
              is_openai: bool = False) -> bytes:
        rec = {"id": rid, "line": line, "error": {"code": code, "message": message}}
        if is_openai or custom_id or self.fmt == "openai":  # an OpenAI Batch error file: every record alike
            rec = {"id": "batch_req_" + _short_hash(custom_id or f"line-{line}"), "custom_id": custom_id,
                   "line": line, "response": None, "error": {"code": code, "message": message}}
        return orjson.dumps(rec, option=_DUMP)


# ------------------------------------------------------------ kept fields
GENERATED_FIELDS = {
    "results": ("id", "output", "reasoning", "tool_calls", "finish_reason", "usage", "sample", "logprobs", "parsed"),
    "openai": ("id", "custom_id", "response", "error"),
    "chat": ("messages", "finish_reason", "sample"),
    "completions": ("prompt", "completion", "reasoning", "finish_reason", "sample"),
    "text": ("text", "reasoning", "finish_reason", "sample"),
}


def check_kept_fields(fmt: str | None, keep: tuple[str, ...]) -> None:
    """Refuse --keep-fields that name a field the record generates (it would replace the model's output).

    Refused rather than nested: kept fields stay top-level, where trainers and
    readers of each format expect them, and a clash is a mistake to fix before any work.
    """
    formats = (fmt,) if fmt else ("results", "openai")  # no format: results, or openai for Batch lines
    clash = sorted({k for f in formats for k in GENERATED_FIELDS[f]} & set(keep))
    if clash:
        generated = ", ".join(sorted({k for f in formats for k in GENERATED_FIELDS[f]}))
        raise UsageError(f"--keep-fields {', '.join(clash)}: the {' / '.join(formats)} records generate "
                         f"{'that field' if len(clash) == 1 else 'those fields'} themselves ({generated}); "
                         "kept fields never replace generated ones: rename the input field or drop it from "
                         "--keep-fields")


# ------------------------------------------------------------ Parquet
_PARQUET_ROWS = 4096  # records per row group: memory stays ~one group, whatever the file size
_JSON = "json"  # a column whose values have no one Arrow type: each value stored as JSON text


def write_parquet(folder: Path) -> Path | None:
    """results.parquet from the committed records of results.jsonl, streamed in row groups.

    Two passes over the records: the first finds every key and one Arrow type per
    key (keys whose values have no common type become JSON text columns, marked
    in the field metadata), the second writes row groups. Replaced atomically.
    """
    view = journal.read(folder)  # checked once: every pass reads the same committed records
    if view.ends[RESULTS] == 0:
        return None
    dest = folder / PARQUET
    types = _column_types(view)
    while True:
        try:
            _write_groups(view, dest, types)
            return dest
        except _BadColumn as bad:  # a value the inferred type cannot hold: store that column as JSON
            types[bad.key] = _JSON


class _BadColumn(Exception):
    def __init__(self, key: str):
        self.key = key


def _chunks(view: journal.Journal):
    chunk = []
    for line in view.lines(RESULTS):
        chunk.append(orjson.loads(line))
        if len(chunk) == _PARQUET_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _column_types(view: journal.Journal) -> dict:
    """key -> one Arrow type unifying every value seen (or _JSON), in first-seen key order."""
    import pyarrow as pa

    types: dict = {}
    for chunk in _chunks(view):
        keys = dict.fromkeys(k for rec in chunk for k in rec)
        for key in keys:
            if types.get(key) == _JSON:
                continue
            try:
                new = pa.array([rec.get(key) for rec in chunk]).type
                old = types.get(key, pa.null())
                types[key] = pa.unify_schemas([pa.schema([(key, old)]), pa.schema([(key, new)])],
                                              promote_options="permissive").field(key).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
                types[key] = _JSON
    return types


def _schema(types: dict):
    import pyarrow as pa

    return pa.schema([pa.field(k, pa.string(), metadata={"mlxbatch": "json"}) if t == _JSON else pa.field(k, t)
                      for k, t in types.items()])


def _write_groups(view: journal.Journal, dest: Path, types: dict) -> None:
    import pyarrow.parquet as pq

    schema = _schema(types)
    tmp, handle = create_temp(dest)
    try:
        with pq.ParquetWriter(handle, schema) as writer:
            for chunk in _chunks(view):
                writer.write_table(_table(chunk, types, schema), row_group_size=_PARQUET_ROWS)
        publish(tmp, dest, handle)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise io_error(f"writing {dest}", exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        handle.close()


def _table(chunk: list, types: dict, schema):
    import pyarrow as pa

    columns = []
    for key, t in types.items():
        values = [rec.get(key) for rec in chunk]
        if t == _JSON:
            values = [None if v is None else orjson.dumps(v).decode() for v in values]
        try:
            columns.append(pa.array(values, type=schema.field(key).type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            raise _BadColumn(key) from None
    return pa.Table.from_arrays(columns, schema=schema)
