"""Tool calls and reasoning: parsers per format on canned outputs (whole, and streamed split at every
boundary), the checks of `tools` / `tool_choice` and of refused OpenAI fields in Batch lines, and a
batch job on a tiny model whose template renders tools and thinks."""

import json

import pytest

from mlxbatch.chat.formats import TOOL_FORMATS, ChatFormat
from mlxbatch.chat.parse import make_parser, split_output
from mlxbatch.chat.tools import ToolError, check_tools
from tests.conftest import read_jsonl, write_jsonl

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
    "additionalProperties": False}}}
NAMES = ["get_weather", "get_time"]


def fmt(tools: str | None, reasoning: str | None = None) -> ChatFormat:
    return ChatFormat(TOOL_FORMATS[tools] if tools else None, reasoning)


def streamed(text: str, f: ChatFormat, pieces: list[str], **kw):
    p = make_parser(f, **kw)
    for piece in pieces:
        p.feed(piece)
    p.finish()
    return p.result()


def assert_any_split_agrees(text: str, f: ChatFormat, **kw):
    """Every split of the text in two, and one character at a time, gives the whole text's result."""
    whole = split_output(text, f, **kw)
    for i in range(len(text) + 1):
        assert streamed(text, f, [text[:i], text[i:]], **kw) == whole, i
    assert streamed(text, f, list(text), **kw) == whole
    return whole


CASES = [  # (format, reasoning, output, content, reasoning, calls)
    ("json", None, 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>',
     "Let me look.", None, [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"tz": "CET"})]),
    ("json", "think", '<think>\nIt is cold there?\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Oslo", "unit": "c"}}\n</tool_call>', "", "It is cold there?", [("get_weather", {"city": "Oslo", "unit": "c"})]),
    ("mistral", None, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}]', "", None,
     [("get_weather", {"city": "Rome", "unit": "c"})]),
    ("mistral", None, 'ok[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}', "ok", None, [("get_time", {"tz": "UTC"})]),
    ("llama3", None, '{"name": "get_weather", "parameters": {"city": "Lima", "unit": "f"}}', "", None,
     [("get_weather", {"city": "Lima", "unit": "f"})]),
    ("llama3", None, '<|python_tag|>{"name": "get_time", "parameters": {"tz": "PST"}}', "", None,
     [("get_time", {"tz": "PST"})]),
    ("llama3", None, 'The answer is {"a": 1}.', 'The answer is {"a": 1}.', None, []),
    ("pythonic", None, '<|tool_call_start|>[get_weather(city="Kyiv", unit="c"), get_time(tz="EET")]'
     '<|tool_call_end|>Checking.', "Checking.", None,
     [("get_weather", {"city": "Kyiv", "unit": "c"}), ("get_time", {"tz": "EET"})]),
    ("harmony", "harmony", '<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>'
     'commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Tokyo", "unit": "c"}<|call|>', "",
     "Need the weather.", [("get_weather", {"city": "Tokyo", "unit": "c"})]),
    ("harmony", "harmony", '<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>'
     'Four.<|return|>', "Four.", "Easy.", []),
]


@pytest.mark.parametrize("tools,reasoning,text,content,thought,calls", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parser_gives_the_same_result_for_any_split(tools, reasoning, text, content, thought, calls):
    out = assert_any_split_agrees(text, fmt(tools, reasoning), tool_names=NAMES)
    assert (out.content, out.reasoning) == (content, thought)
    assert [(c["name"], c["arguments"]) for c in out.tool_calls] == calls


@pytest.mark.parametrize("tools,text", [
    ("json", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut off by max_tokens
    ("json", '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>'),  # not a given function
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": 3}]'),
    ("pythonic", "<|tool_call_start|>[get_weather(city=]<|tool_call_end|>"),
])
def test_a_malformed_call_comes_back_as_text(tools, text):
    out = assert_any_split_agrees(text, fmt(tools), tool_names=NAMES)
    assert out.tool_calls == [] and out.content == text.strip()


def test_reasoning_split_on_think_tags_and_an_open_prompt():
    f = fmt(None, "think")
    out = assert_any_split_agrees("<think>\nsum it\n</think>\n\nThe answer is 4.", f)
    assert (out.reasoning, out.content) == ("sum it", "The answer is 4.")
    out = assert_any_split_agrees("the prompt opened it</think>The answer.", f, is_reasoning_open=True)
    assert (out.reasoning, out.content) == ("the prompt opened it", "The answer.")
    out = assert_any_split_agrees("still thinking when max_tokens hit", f, is_reasoning_open=True)
    assert (out.reasoning, out.content) == ("still thinking when max_tokens hit", "")
    assert split_output("<think>x</think>y", f, is_reasoning=False).content == "<think>x</think>y"


def test_harmony_without_the_format_is_content():
    text = "plain words " * 40  # a model that never writes a harmony header
    out = assert_any_split_agrees(text, fmt("harmony", "harmony"), tool_names=NAMES)
    assert out.content == text.strip() and out.reasoning is None


@pytest.mark.parametrize("body,param", [
    ({"tools": {"name": "f"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tools_name_the_field(body, param):
    with pytest.raises(ToolError) as err:
        check_tools(body)
    assert err.value.param == param


# ------------------------------------------------------------ on a model
@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    from tests.chat_model import write_tool_model

    return write_tool_model(tmp_path_factory.mktemp("toolmodel") / "qwenish")


def _line(cid: str, **body) -> dict:
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 48, **body}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def test_batch_job_with_tools_and_a_thinking_template(tool_model, tmp_path):
    from mlxbatch.job.spec import build_spec
    from mlxbatch.runner import run_job

    forced = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 128}
    rows = [_line("forced", **forced),
            _line("named", **{**forced, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
            _line("free", tools=[WEATHER]),
            _line("logit_bias", logit_bias={"50": 5}),
            _line("echo", echo=True),
            _line("gpt", model="gpt-4o"),
            _line("default", model="default"),
            _line("bad_tools", tools="get_weather"),
            _line("unknown_named", tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}})]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    spec = build_spec(None, {"input": src, "model": str(tool_model), "dtype": "fp32"})
    run_job(spec)
    out = {r["custom_id"]: r for r in read_jsonl(spec.output_dir / "results.jsonl")}
    errs = {r["custom_id"]: r["error"] for r in read_jsonl(spec.output_dir / "errors.jsonl")}
    assert set(errs) == {"logit_bias", "echo", "gpt", "bad_tools", "unknown_named"}
    for cid, word in [("logit_bias", "'logit_bias'"), ("echo", "'echo'"), ("gpt", "'model'"),
                      ("bad_tools", "'tools'"), ("unknown_named", "'tool_choice'")]:
        assert word in errs[cid]["message"], errs[cid]
    jsonschema = pytest.importorskip("jsonschema")
    for cid in ("forced", "named"):
        msg = out[cid]["response"]["body"]["choices"][0]
        assert msg["finish_reason"] == "tool_calls", msg
        (call,) = msg["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
        assert isinstance(msg["message"]["reasoning_content"], str)  # the prompt opened <think>
    assert out["default"]["response"]["body"]["model"] == str(tool_model)


def test_results_records_carry_reasoning_and_tool_calls(tool_model, tmp_path):
    from mlxbatch.job.spec import build_spec
    from mlxbatch.runner import run_job

    rows = [{"id": "a", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER],
             "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 128},
            {"id": "b", "prompt": "Hi", "enable_thinking": False, "max_tokens": 8}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    for mode in ("split", "drop", "keep"):
        spec = build_spec(None, {"input": src, "model": str(tool_model), "dtype": "fp32", "reasoning": mode,
                                 "output": tmp_path / mode})
        run_job(spec)
        recs = {r["id"]: r for r in read_jsonl(spec.output_dir / "results.jsonl")}
        assert recs["a"]["finish_reason"] == "tool_calls" and len(recs["a"]["tool_calls"]) == 1
        assert ("reasoning" in recs["a"]) == (mode == "split")
        assert "tool_calls" not in recs["b"]


def test_tools_on_a_model_without_a_tool_format_name_the_model(tiny):
    from mlxbatch.errors import RowError
    from mlxbatch.job.render import Renderer
    from mlxbatch.job.spec import JobSpec
    from mlxbatch.types import Row

    r = Renderer(JobSpec(model="random:tiny"), tiny.tokenizer, tiny.context_length, names=tiny.names)
    (err,) = r.render_many([Row(0, 1, _line("t", tools=[WEATHER]))])
    assert isinstance(err, RowError) and err.param == "tools" and "'random:tiny'" in err.message


# ------------------------------------------------------------ a real server, the official client
def _call_args(call) -> dict:
    return json.loads(call.function.arguments)


def test_openai_client_runs_a_two_turn_tool_loop(tool_model, tmp_path):
    pytest.importorskip("openai")
    jsonschema = pytest.importorskip("jsonschema")
    from tests.test_server import ServerProc

    srv = ServerProc(tmp_path / "data", model=str(tool_model)).start()
    try:
        client = srv.client()
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        ask = dict(model="default", tools=[WEATHER], parallel_tool_calls=False, max_tokens=128)
        r = client.chat.completions.create(messages=messages, tool_choice="required", **ask)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        jsonschema.validate(_call_args(call), WEATHER["function"]["parameters"])
        assert isinstance(choice.message.model_extra.get("reasoning_content"), str)

        # The same request streamed: one call delta with the same call, then finish_reason tool_calls.
        calls, finish, reasoning = {}, None, ""
        for chunk in client.chat.completions.create(messages=messages, stream=True, **ask,
                                                    tool_choice={"type": "function",
                                                                 "function": {"name": "get_weather"}}):
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            for tc in delta.tool_calls or []:
                calls.setdefault(tc.index, tc)
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and list(calls) == [0]
        assert _call_args(calls[0]) == _call_args(call) and calls[0].id
        assert reasoning == choice.message.model_extra["reasoning_content"]

        # Turn two: the assistant's call and the tool's result render through the template.
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 14})}]
        final = client.chat.completions.create(messages=messages, tools=[WEATHER], tool_choice="none",
                                               max_tokens=16, model="default",
                                               extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert final.choices[0].finish_reason in ("stop", "length")
        assert final.choices[0].message.tool_calls is None and isinstance(final.choices[0].message.content, str)

        # Bad tools: a 400 naming the field.
        for extra, param in [({"tools": "get_weather"}, "tools"),
                             ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                                 "type": "nope"}}}]}, "tools[0].function.parameters"),
                             ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
                              "tool_choice"),
                             ({"logit_bias": {"1": 2}}, "logit_bias"), ({"suffix": "x"}, "suffix"),
                             ({"model": "gpt-4o"}, "model")]:
            status, body = srv.request("POST", "/v1/chat/completions",
                                       {"messages": messages[:1], "max_tokens": 2, **extra})
            assert status == (404 if param == "model" else 400) and body["error"]["param"] == param, body
    finally:
        assert srv.stop() in (0, 130), srv.read_log()


def test_export_keeps_or_drops_the_reasoning(tool_model, tmp_path):
    from mlxbatch.job.spec import build_spec
    from mlxbatch.output.export import export
    from mlxbatch.runner import run_job

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"Think about {i}", "max_tokens": 6}
                                               for i in range(3)])
    spec = build_spec(None, {"input": src, "model": str(tool_model), "dtype": "fp32", "output_format": "chat"})
    run_job(spec)
    for mode in ("keep", "drop"):
        export(spec.output_dir, fmt="chat", split="1", to=tmp_path / mode, drop_truncated=False, dedupe=False,
               reasoning=mode)
        recs = read_jsonl(tmp_path / mode / "train.jsonl")
        assert len(recs) == 3
        assert all(("reasoning_content" in r["messages"][-1]) == (mode == "keep") for r in recs), recs
