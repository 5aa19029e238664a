"""Output records: the line shapes of each output format, and Parquet export.

Owns: `results` records, OpenAI Batch output lines (chat.completion and
text_completion bodies, with logprobs in OpenAI's shape), the finetuning shapes
mlx-lm's LoRA trainer reads (`chat`, `completions`, `text`), error records, and
building results.parquet from committed records. Does not own: durability
(checkpoint.py).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import orjson

from .types import Completion
from .render import Item

_DUMP = orjson.OPT_APPEND_NEWLINE


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class RecordMaker:
    """Turns a finished item (all its samples) into the bytes of its output lines."""

    def __init__(self, fmt: str | None, model_name: str, tokenizer):
        self.fmt = fmt
        self.model_name = model_name
        self.tokenizer = tokenizer

    def format_for(self, item: Item) -> str:
        return self.fmt or ("openai" if item.is_openai else "results")

    def records(self, item: Item, done: list[Completion]) -> bytes:
        fmt = self.format_for(item)
        if fmt == "openai":
            return orjson.dumps(self._openai(item, done), option=_DUMP)
        lines = [self._one(fmt, item, c, i) for i, c in enumerate(done)]
        return b"".join(orjson.dumps(x, option=_DUMP) for x in lines)

    def _one(self, fmt: str, item: Item, c: Completion, sample: int) -> dict:
        if fmt == "results":
            rec = {"id": item.id, "output": c.text, "finish_reason": c.finish_reason,
                   "usage": _usage(c.prompt_tokens, c.completion_tokens)}
            if item.n > 1:
                rec["sample"] = sample
            if c.logprobs is not None:
                rec["logprobs"] = self._chat_logprobs(c)
        elif fmt == "chat":
            rec = {"messages": [*(item.messages or [{"role": "user", "content": item.prompt}]),
                                {"role": "assistant", "content": c.text}]}
        elif fmt == "completions":
            rec = {"prompt": item.prompt if item.prompt is not None else item.messages[-1]["content"],
                   "completion": c.text}
        else:  # text: the exact prompt the model saw, then its output
            rec = {"text": self.tokenizer.decode(item.tokens) + c.text}
        if fmt != "results":
            # Bookkeeping for `mlxbatch export` (which strips it): trainers ignore extra keys.
            rec["finish_reason"] = c.finish_reason
            if item.n > 1:
                rec["sample"] = sample
        return {**rec, **item.kept}

    # ------------------------------------------------------------ OpenAI shapes
    def _openai(self, item: Item, done: list[Completion]) -> dict:
        cid = item.custom_id or item.id
        is_completion = item.kind == "openai-completion"
        choices = [self._completion_choice(c, i) if is_completion else self._chat_choice(c, i)
                   for i, c in enumerate(done)]
        body = {
            "id": ("cmpl-" if is_completion else "chatcmpl-") + _short_hash(cid),
            "object": "text_completion" if is_completion else "chat.completion",
            "created": int(time.time()),
            "model": item.model_field or self.model_name,
            "choices": choices,
            "usage": _usage(done[0].prompt_tokens, sum(c.completion_tokens for c in done)),
        }
        return {"id": "batch_req_" + _short_hash(cid), "custom_id": cid,
                "response": {"status_code": 200, "request_id": "req_" + _short_hash(cid), "body": body},
                "error": None, **item.kept}

    def _chat_choice(self, c: Completion, i: int) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": self._chat_logprobs(c) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason}

    def _completion_choice(self, c: Completion, i: int) -> dict:
        lp = None
        if c.logprobs is not None:
            toks = [self._tok(t) for t, _, _ in c.logprobs]
            offsets, pos = [], 0
            for t in toks:
                offsets.append(pos)
                pos += len(t)
            lp = {"tokens": toks, "token_logprobs": [v for _, v, _ in c.logprobs],
                  "top_logprobs": [{self._tok(a): b for a, b in top} for _, _, top in c.logprobs],
                  "text_offset": offsets}
        return {"text": c.text, "index": i, "logprobs": lp, "finish_reason": c.finish_reason}

    def _chat_logprobs(self, c: Completion) -> dict:
        def entry(token: int, value: float) -> dict:
            text = self._tok(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {"content": [{**entry(t, v), "top_logprobs": [entry(a, b) for a, b in top]}
                            for t, v, top in c.logprobs]}

    def _tok(self, token: int) -> str:
        return self.tokenizer.decode([token])

    # ------------------------------------------------------------ errors
    def error(self, *, line: int, rid: str | None, code: str, message: str, custom_id: str | None = None,
              is_openai: bool = False) -> bytes:
        rec = {"id": rid, "line": line, "error": {"code": code, "message": message}}
        if is_openai or custom_id:
            rec = {"id": "batch_req_" + _short_hash(custom_id or f"line-{line}"), "custom_id": custom_id,
                   "line": line, "response": None, "error": {"code": code, "message": message}}
        return orjson.dumps(rec, option=_DUMP)


def write_parquet(folder: Path) -> Path | None:
    """results.parquet from results.jsonl (committed records only), replaced atomically.

    Holds the records in memory while converting (one schema across all rows).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = folder / "results.jsonl"
    if not src.exists() or src.stat().st_size == 0:
        return None
    dest = folder / "results.parquet"
    tmp = folder / "results.parquet.tmp"
    records = [orjson.loads(line) for line in src.read_bytes().splitlines() if line.strip()]
    pq.write_table(pa.Table.from_pylist(records), tmp)
    os.replace(tmp, dest)
    return dest
