"""Dataset generation: chat datasets mlx-lm's trainer loads, OpenAI output schema, n samples."""

from types import SimpleNamespace
from typing import Literal, Optional

import pytest
from conftest import ROOT, cli, read_jsonl, write_jsonl
from pydantic import BaseModel, ConfigDict


# The OpenAI Batch output line schema (https://platform.openai.com/docs/guides/batch), strict.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopLogprob(_Strict):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Strict):
    content: Optional[list[TokenLogprob]]


class Message(_Strict):
    role: Literal["assistant"]
    content: Optional[str]
    refusal: Optional[str] = None


class ChatChoice(_Strict):
    index: int
    message: Message
    logprobs: Optional[ChoiceLogprobs]
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"]


class Usage(_Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Strict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Response(_Strict):
    status_code: int
    request_id: str
    body: ChatCompletion


class BatchOutputLine(_Strict):
    id: str
    custom_id: str
    response: Optional[Response]
    error: Optional[dict]


def test_openai_output_matches_batch_schema(tmp_path):
    rows = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "random:tiny", "messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 4,
                      "logprobs": True, "top_logprobs": 2, "n": 1 + i % 2, "temperature": 0.5}} for i in range(4)]
    src = write_jsonl(tmp_path / "b.jsonl", rows)
    res = cli("run", src, "-o", tmp_path / "o", "--model", "random:tiny", "-q")
    assert res.exit_code == 0, res.output
    lines = read_jsonl(tmp_path / "o" / "results.jsonl")
    assert len(lines) == 4
    for line in lines:
        parsed = BatchOutputLine.model_validate(line)
        for choice in parsed.response.body.choices:
            assert len(choice.logprobs.content) == 4 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_n_samples_are_reproducible_records(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Say something"}, {"id": "b", "prompt": "Again"}])
    args = ["--model", "random:tiny", "--max-tokens", "8", "--n", "4", "--temperature", "1.0", "--seed", "5", "-q"]
    assert cli("run", src, "-o", tmp_path / "o1", *args).exit_code == 0
    assert cli("run", src, "-o", tmp_path / "o2", *args).exit_code == 0
    one, two = read_jsonl(tmp_path / "o1" / "results.jsonl"), read_jsonl(tmp_path / "o2" / "results.jsonl")
    key = lambda r: (r["id"], r["sample"])  # noqa: E731
    assert sorted(map(key, one)) == [(i, s) for i in "ab" for s in range(4)]
    assert {key(r): r["output"] for r in one} == {key(r): r["output"] for r in two}
    assert len({r["output"] for r in one if r["id"] == "a"}) > 1, "samples should differ"


@pytest.mark.realmodel
@pytest.mark.slow
def test_chat_dataset_loads_in_mlx_lm_trainer(tmp_path, smol):
    out, data = tmp_path / "sft", tmp_path / "data"
    res = cli("run", "--job", ROOT / "jobs" / "sft_dataset.toml", "-o", out, "--max-tokens", "24", "-q")
    assert res.exit_code == 0, res.output
    res = cli("export", out, "--format", "chat", "--split", "0.8,0.2", "--to", data, "--dedupe")
    assert res.exit_code == 0, res.output
    from mlx_lm.tuner.datasets import load_local_dataset

    train, valid, _ = load_local_dataset(data, smol.tokenizer, SimpleNamespace(mask_prompt=True))
    assert len(train) == 16 and len(valid) == 4
    tokens, offset = train.process(train._data[0])
    assert len(tokens) > offset > 0
    first = read_jsonl(data / "train.jsonl")[0]
    assert set(first) == {"messages"} and first["messages"][0]["role"] == "system"
    assert first["messages"][-1]["role"] == "assistant"
