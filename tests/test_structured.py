"""Structured output: response_format per row, --json-schema / --regex for all rows,
mixed constrained and free rows in one batch, records, errors, validate, status."""

import re

import jsonschema
import orjson
import pytest
from conftest import cli, read_jsonl, write_jsonl
from structured_data import PEOPLE, SCHEMA

from mlxbatch import models
from mlxbatch.engine import Engine, Request, SamplingParams
from mlxbatch.job.grammar import (
    GrammarError,
    Grammars,
    from_response_format,
    grammar_of,
    json_constraint,
    regex_constraint,
)

TINY = ["--model", "random:tiny", "-q"]
PHONE = "[0-9]{3}-[0-9]{4}"



def _rf(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the constraint was checked")
    monkeypatch.setattr(models, "load", refuse)


def _by_id(folder) -> dict:
    return {r["id"]: r for r in read_jsonl(folder / "results.jsonl")}


# ------------------------------------------------------------ constraints without a model
def test_response_format_shapes():
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}) == json_constraint({"type": "object"})
    assert from_response_format(_rf({"type": "integer"})).text == '{"type":"integer"}'
    for bad in ({"type": "xml"}, {"type": "json_schema"}, "json", {"type": "json_schema", "json_schema": {"name": "x"}}):
        with pytest.raises(GrammarError):
            from_response_format(bad)


def test_unsupported_schema_features_are_named_never_dropped():
    with pytest.raises(GrammarError, match=r'Unimplemented keys: \["not"\]'):
        grammar_of(json_constraint({"not": {"type": "string"}}))
    with pytest.raises(GrammarError, match="if"):
        grammar_of(json_constraint({"type": "object", "if": {"required": ["a"]}, "then": {}}))
    with pytest.raises(GrammarError, match="look-around"):
        grammar_of(json_constraint({"type": "string", "pattern": "(?<=a)b"}))
    assert grammar_of(json_constraint(SCHEMA))


def test_bad_json_schema_file_or_regex_is_a_usage_error_before_the_model_loads(tmp_path, no_model):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    (tmp_path / "bad.json").write_text('{"type": "object", "not": {}}')
    (tmp_path / "broken.json").write_text('{"type": ')
    res = cli("run", rows, *TINY, "--json-schema", tmp_path / "bad.json")
    assert res.exit_code == 2 and "--json-schema" in res.output and "Unimplemented keys" in res.output
    res = cli("run", rows, *TINY, "--json-schema", tmp_path / "broken.json")
    assert res.exit_code == 2 and "not valid JSON" in res.output
    res = cli("run", rows, *TINY, "--json-schema", tmp_path / "missing.json")
    assert res.exit_code == 2 and "cannot read" in res.output
    res = cli("run", rows, *TINY, "--regex", "[0-9")
    assert res.exit_code == 2 and "--regex" in res.output and "unclosed character class" in res.output
    res = cli("run", rows, *TINY, "--regex", PHONE, "--json-schema", tmp_path / "bad.json")
    assert res.exit_code == 2 and "exclusive" in res.output


def test_validate_reports_bad_schemas_with_file_and_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "x", "response_format": _rf(SCHEMA)},
        {"id": "b", "prompt": "x", "response_format": _rf({"type": "object", "not": {}})},
        {"id": "c", "prompt": "x", "response_format": {"type": "yaml"}},
    ])
    res = cli("validate", src)
    assert res.exit_code == 1 and "2 with problems" in res.output
    assert "in.jsonl:2: [invalid_schema] line 2: response_format: Unimplemented keys" in res.output
    assert "in.jsonl:3: [invalid_schema] line 3: response_format: type is 'yaml'" in res.output


# ------------------------------------------------------------ the engine
def test_engine_free_rows_unchanged_by_guided_neighbours(tiny):
    grammars = Grammars(tiny.tokenizer)
    phone, obj = regex_constraint(PHONE), json_constraint({"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"enum": ["x", "y"]}}, "required": ["a", "b"]})
    prompts = [tiny.tokenizer.encode(f"hello number {i} " * (1 + i % 3)) for i in range(6)]

    def run(requests):
        engine, out = Engine(tiny, max_batch=8), {}
        for r in requests:
            engine.add(r)
        while engine.has_work:
            out.update((c.key, c) for c in engine.step())
        return out

    free = [Request(("free", i), t, SamplingParams(max_tokens=20)) for i, t in enumerate(prompts)]
    guided = [Request((c.kind, i), t, SamplingParams(max_tokens=30, constraint=c), grammars.guide(c))
              for c in (phone, obj) for i, t in enumerate(prompts)]
    alone, mixed = run(free), run(guided[::2] + free + guided[1::2])  # guided rows join before and after
    assert {k: c.tokens for k, c in alone.items()} == {k: mixed[k].tokens for k in alone}
    for i in range(6):
        assert re.fullmatch(PHONE, mixed[("regex", i)].text) and mixed[("regex", i)].finish_reason == "stop"


# ------------------------------------------------------------ whole jobs (random:tiny)
def test_regex_outputs_all_match(tmp_path):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"Call me {i}"} for i in range(12)])
    res = cli("run", rows, *TINY, "--regex", PHONE, "--max-tokens", "30", "--temperature", "1.0",
              "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    out = _by_id(tmp_path / "out")
    assert len(out) == 12 and all(re.fullmatch(PHONE, r["output"]) for r in out.values())
    assert all(r["finish_reason"] == "stop" and "parsed" not in r for r in out.values())


def test_mixed_job_free_rows_equal_a_run_without_constrained_rows(tmp_path):
    free = [{"id": f"f{i}", "prompt": f"Tell me about {i} " * (1 + i % 4)} for i in range(10)]
    rf = _rf({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    guided = [{"id": f"g{i}", "prompt": f"Give {i} as JSON", "response_format": rf} for i in range(10)]
    mixed = [r for pair in zip(free, guided) for r in pair]
    args = (*TINY, "--max-tokens", "16")
    assert cli("run", write_jsonl(tmp_path / "free.jsonl", free), *args, "-o", tmp_path / "a").exit_code == 0
    assert cli("run", write_jsonl(tmp_path / "mixed.jsonl", mixed), *args, "-o", tmp_path / "b").exit_code == 0
    alone, both = _by_id(tmp_path / "a"), _by_id(tmp_path / "b")
    assert all(both[k]["output"] == r["output"] and "parsed" not in both[k] for k, r in alone.items())
    for i in range(10):
        rec = both[f"g{i}"]
        if rec["finish_reason"] == "stop":
            assert rec["parsed"] == orjson.loads(rec["output"]) and isinstance(rec["parsed"]["n"], int)
        else:
            assert rec["parsed"] is None


def test_bad_row_schema_is_an_error_record_and_the_job_goes_on(tmp_path):
    rows = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "good", "prompt": "x", "response_format": {"type": "json_object"}},
        {"id": "bad", "prompt": "x", "response_format": _rf({"type": "object", "dependentRequired": {"a": ["b"]}})},
        {"id": "free", "prompt": "x", "response_format": {"type": "text"}},
    ])
    res = cli("run", rows, *TINY, "--max-tokens", "8", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert [(e["id"], e["error"]["code"]) for e in errors] == [("bad", "invalid_schema")]
    assert "dependentRequired" in errors[0]["error"]["message"]
    assert set(_by_id(tmp_path / "out")) == {"good", "free"}


def test_cut_off_rows_get_length_and_parsed_null_and_are_counted(tmp_path):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"p {i}"} for i in range(4)])
    schema = tmp_path / "s.json"
    schema.write_text(orjson.dumps({"type": "object", "properties": {"text": {"type": "string"}},
                                    "required": ["text"]}).decode())
    job = tmp_path / "job.toml"
    job.write_text('json_schema = "s.json"\nmax_tokens = 3\n')  # relative to the job file
    res = cli("run", rows, *TINY, "--job", job, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    out = _by_id(tmp_path / "out")
    assert all(r["finish_reason"] == "length" and r["parsed"] is None for r in out.values())
    status = cli("status", tmp_path / "out")
    assert "4 constrained outputs, 4 cut off by max_tokens" in status.output


def test_openai_lines_carry_the_json_in_message_content(tmp_path):
    body = {"model": "default", "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 40,
            "response_format": _rf({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                    "required": ["ok"], "additionalProperties": False})}
    rows = write_jsonl(tmp_path / "batch.jsonl", [{"custom_id": f"c{i}", "method": "POST",
                                                   "url": "/v1/chat/completions", "body": body} for i in range(3)])
    assert cli("run", rows, *TINY, "-o", tmp_path / "out").exit_code == 0
    for line in read_jsonl(tmp_path / "out" / "results.jsonl"):
        choice = line["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert orjson.loads(choice["message"]["content"]) in ({"ok": True}, {"ok": False})


def test_changed_schema_refuses_resume(tmp_path):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    assert cli("run", rows, *TINY, "--regex", PHONE, "-o", tmp_path / "out").exit_code == 0
    res = cli("run", rows, *TINY, "--regex", "[0-9]{4}", "-o", tmp_path / "out")
    assert res.exit_code != 0 and "constraint" in res.output


# ------------------------------------------------------------ the embedded model
@pytest.mark.realmodel
@pytest.mark.slow
def test_extraction_with_the_embedded_model_validates(tmp_path):
    rows = write_jsonl(tmp_path / "in.jsonl", [
        {"id": f"p{i}", "prompt": "Extract the person (name, age), the city, the sentiment and the topics as "
                                  f"JSON.\nText: {n}, aged {a}, lives in {c}. {d}."}
        for i, (n, a, c, d) in enumerate(PEOPLE)])
    (tmp_path / "schema.json").write_text(orjson.dumps(SCHEMA).decode())
    res = cli("run", rows, "--json-schema", tmp_path / "schema.json", "--max-tokens", "200", "--dtype", "fp32",
              "-q", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    out = list(_by_id(tmp_path / "out").values())
    stopped = [r for r in out if r["finish_reason"] == "stop"]
    for r in stopped:
        jsonschema.validate(r["parsed"], SCHEMA)
        assert r["parsed"] == orjson.loads(r["output"])
    assert len(out) == 20 and len(stopped) >= 18
