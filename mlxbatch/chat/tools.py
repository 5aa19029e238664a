"""OpenAI tools in and out: checking `tools` / `tool_choice`, tool messages, call shapes, forced calls.

Owns: `ToolSpec` (a request's checked tools and choice), the checks with messages that name the
field (`ToolError`, turned into a row error or a 400 by the caller), assistant `tool_calls` and
`role: "tool"` messages as chat templates expect them (arguments as objects), calls in OpenAI's
shape (ids, arguments as a JSON string), and the llguidance grammar that forces a call in the
model's own syntax when `tool_choice` is "required" or names a function (arguments constrained to
the function's schema). Does not own: detecting the format (formats.py) or parsing output (parse.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from mlxbatch.chat.formats import THINK, ChatFormat
from mlxbatch.job.grammar import JSON_OPTIONS, GrammarError, grammar_of, json_constraint
from mlxbatch.types import Constraint

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CHOICES = ("none", "auto", "required")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True)
class ToolSpec:
    """A request's tools as checked: the OpenAI tool objects, the choice, and the function it names."""

    tools: tuple  # ({"type": "function", "function": {"name", "description"?, "parameters"}}, ...)
    choice: str  # "auto" | "none" | "required" | "named"
    name: str | None = None  # the function a named choice forces
    is_parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def is_forced(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def is_on(self) -> bool:
        return self.choice != "none"

    @property
    def template_tools(self) -> list[dict]:
        return [dict(t) for t in self.tools]

    def forced_functions(self) -> list[dict]:
        fns = [t["function"] for t in self.tools]
        return [f for f in fns if f["name"] == self.name] if self.choice == "named" else fns


def check_tools(data: dict) -> ToolSpec | None:
    """The request's ToolSpec (None without tools); ToolError naming the field otherwise."""
    tools, choice, parallel = data.get("tools"), data.get("tool_choice"), data.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError(f"field 'parallel_tool_calls' must be true or false, got {parallel!r}", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice in (None, "none", "auto"):
            return None
        raise ToolError(f"field 'tool_choice' is {_short(choice)} but the request gives no 'tools'", "tool_choice")
    if not isinstance(tools, list):
        raise ToolError("field 'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects, "
                        f"got {type(tools).__name__}", "tools")
    checked = tuple(_tool(t, i) for i, t in enumerate(tools))
    names = [t["function"]["name"] for t in checked]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise ToolError(f"field 'tools' names the function {dup!r} twice", "tools")
    kind, name = _choice(choice, names)
    return ToolSpec(checked, kind, name, parallel is not False)


def _tool(t, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
        raise ToolError(f"field '{where}' must be {{\"type\": \"function\", \"function\": {{\"name\", "
                        "\"parameters\"}}}}", where)
    fn = t["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ToolError(f"field '{where}.function.name' must be 1-64 letters, digits, '_', '.' or '-', "
                        f"got {_short(name)}", f"{where}.function.name")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise ToolError(f"field '{where}.function.description' must be a string", f"{where}.function.description")
    params = fn.get("parameters", EMPTY_PARAMETERS)
    if not isinstance(params, dict):
        raise ToolError(f"field '{where}.function.parameters' must be a JSON schema object",
                        f"{where}.function.parameters")
    try:
        grammar_of(json_constraint(params))  # the schema compiles: a forced call can be held to it
    except GrammarError as exc:
        raise ToolError(f"field '{where}.function.parameters' is not a usable JSON schema ({exc})",
                        f"{where}.function.parameters") from None
    out = {"name": name, "parameters": params}
    if fn.get("description") is not None:
        out["description"] = fn["description"]
    return {"type": "function", "function": out}


def _choice(choice, names: list[str]) -> tuple[str, str | None]:
    if choice is None:
        return "auto", None
    if isinstance(choice, str) and choice in CHOICES:
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ToolError("field 'tool_choice' must be \"none\", \"auto\", \"required\" or "
                        f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {_short(choice)}",
                        "tool_choice")
    if name not in names:
        raise ToolError(f"field 'tool_choice' names the function {name!r}, which is not in 'tools' "
                        f"({', '.join(names)})", "tool_choice")
    return "named", name


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------ messages
def message_extras(m: dict, role: str, where: str) -> dict:
    """The tool fields of one message as templates read them (assistant tool_calls, a tool result's id)."""
    out = {}
    if role == "assistant" and m.get("tool_calls") is not None:
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise ToolError(f"field '{where}.tool_calls' must be a list", f"{where}.tool_calls")
        out["tool_calls"] = [_history_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
    if role == "assistant":
        for key in ("reasoning_content", "reasoning"):
            if isinstance(m.get(key), str):
                out["reasoning_content"] = m[key]
                break
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ToolError(f"field '{where}.{key}' must be a string", f"{where}.{key}")
            if m.get(key) is not None:
                out[key] = m[key]
    return out


def _history_call(c, where: str) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolError(f"field '{where}' must be {{\"id\", \"type\": \"function\", \"function\": "
                        "{\"name\", \"arguments\"}}", where)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ToolError(f"field '{where}.function.arguments' is not valid JSON", f"{where}.function.arguments") \
                from None
    if not isinstance(args, dict):
        raise ToolError(f"field '{where}.function.arguments' must be a JSON object", f"{where}.function.arguments")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(c.get("id"), str):
        out["id"] = c["id"]
    return out


# ------------------------------------------------------------ calls out
def openai_calls(calls: list[dict], id_base: str, start: int = 0) -> list[dict]:
    """Parsed calls as OpenAI `tool_calls`: ids derived from `id_base` and the call's index (a record's
    ids stay the same on a rerun; a streamed call has the id the whole reply would give it)."""
    return [{"id": "call_" + hashlib.blake2b(f"{id_base}\0{k}".encode(), digest_size=12).hexdigest(),
             "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for k, c in enumerate(calls, start)]


# ------------------------------------------------------------ forced calls
def forced_constraint(spec: ToolSpec, fmt: ChatFormat, tokenizer, *, is_reasoning_open: bool,
                      max_reasoning_tokens: int) -> Constraint:
    """A grammar that makes the model call one of the forced functions in its own syntax; a prompt that
    leaves <think> open may think first, for at most `max_reasoning_tokens` (then it must close and call)."""
    tf = fmt.tools
    fns = spec.forced_functions()
    lit = _literal(tokenizer)
    if tf.name == "json":
        block = f'{lit("<tool_call>")} "\\n" call "\\n" {lit("</tool_call>")}'
        body = f'start: pre {block}' + (f' ("\\n" {block})*' if spec.is_parallel else "")
        rules = [f"call: %json {_schema(_any_of([_call_schema(f) for f in fns]))}"]
    elif tf.name == "llama3":
        body = "start: pre call"
        rules = [f"call: %json {_schema(_any_of([_call_schema(f, 'parameters') for f in fns]))}"]
    elif tf.name == "mistral":
        items = {"type": "array", "items": _any_of([_call_schema(f) for f in fns]), "minItems": 1}
        if not spec.is_parallel:
            items["maxItems"] = 1
        body = f"start: pre {lit('[TOOL_CALLS]')} calls"
        rules = [f"calls: %json {_schema(items)}"]
    elif tf.name == "harmony":
        return _harmony(fns, lit, max_reasoning_tokens)
    else:
        raise ToolError(f"tool_choice \"required\" or a named function is not supported for {tf.name} tool calls "
                        "(use \"auto\")", "tool_choice")
    pre = [f'pre: thought {lit(THINK[1])} /\\n{{0,2}}/', _thought(max_reasoning_tokens)] \
        if is_reasoning_open and fmt.reasoning == "think" else ['pre: ""']
    return Constraint("lark", "\n".join([body, *pre, *rules]))


def _thought(max_tokens: int) -> str:
    return f"thought[max_tokens={max(1, max_tokens)}]: /(.|\\n)*/"


def _harmony(fns: list[dict], lit, max_reasoning_tokens: int) -> Constraint:
    lines = [f'start: (analysis {lit("<|start|>")} "assistant")? call',
             f'analysis: {lit("<|channel|>")} "analysis" {lit("<|message|>")} thought {lit("<|end|>")}',
             _thought(max_reasoning_tokens),
             "call: " + " | ".join(f"call{i}" for i in range(len(fns)))]
    for i, f in enumerate(fns):
        lines.append(f'call{i}: {lit("<|channel|>")} "commentary to=functions.{f["name"]} " {lit("<|constrain|>")} '
                     f'"json" {lit("<|message|>")} %json {_schema(f["parameters"])} {lit("<|call|>")}')
    return Constraint("lark", "\n".join(lines))


def _call_schema(fn: dict, args_key: str = "arguments") -> dict:
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: fn["parameters"]},
            "required": ["name", args_key], "additionalProperties": False}


def _any_of(schemas: list[dict]) -> dict:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _schema(schema: dict) -> str:
    return json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def _literal(tokenizer):
    """A marker in lark: the token itself where the vocabulary has it as one token (llguidance matches
    added tokens only by id), else its text."""
    def lit(marker: str) -> str:
        try:
            tid = tokenizer.convert_tokens_to_ids(marker)
        except (KeyError, ValueError, TypeError):
            tid = None
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            return f"<[{tid}]>"
        return json.dumps(marker)

    return lit
