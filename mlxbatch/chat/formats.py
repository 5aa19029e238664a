"""The registry of tool-call and reasoning formats, and which one a model uses.

Owns: one `ToolFormat` per family (the markers around a call, how the text between them parses
into calls, whether one message may hold several), detection from the chat template and the
vocabulary in the order mlx-lm uses (`mlx_lm/tokenizer_utils.py: _infer_tool_parser`, thinking by
the `<think>` pair in the vocabulary), and `ChatFormat`, what a model's outputs need split.
Mistral and pythonic calls are parsed by mlx-lm's own parser modules (a library, imported only
when such a model runs); JSON (`<tool_call>`), Llama 3 JSON and harmony (gpt-oss) are parsed here
(mlx-lm has no Llama 3 or harmony parser). Does not own: streaming (parse.py) or grammars (tools.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

THINK = ("<think>", "</think>")
HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")


@dataclass(frozen=True)
class ToolFormat:
    """How one family writes tool calls in its output."""

    name: str
    start: str  # the marker opening a call ("" for none: llama3's call is the whole message)
    end: str  # the marker closing it ("": the call runs to the end of the output)
    parse: Callable[[str], list[dict]]  # the text between the markers -> [{"name", "arguments": dict}]
    is_parallel: bool = True  # one message may hold several calls
    is_whole_message: bool = False  # a call only as the entire output (llama3 JSON)


@dataclass(frozen=True)
class ChatFormat:
    """What one model's outputs may hold besides content: its tool format and its reasoning format."""

    tools: ToolFormat | None
    reasoning: str | None  # "think" (<think>...</think>) | "harmony" (gpt-oss channels) | None
    model: str = ""

    @property
    def is_harmony(self) -> bool:
        return self.reasoning == "harmony"


# ------------------------------------------------------------ parsers of one call's text
def _call(obj, *, args_key: str = "arguments") -> dict:
    """{"name", "arguments": dict} from a decoded call object; ValueError if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError("not a tool call object with a 'name'")
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some templates write the arguments as a JSON string
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError("tool call arguments are not an object")
    return {"name": obj["name"], "arguments": args}


def parse_json_call(text: str) -> list[dict]:
    """Hermes / Qwen: `{"name": ..., "arguments": {...}}` between <tool_call> tags."""
    return [_call(json.loads(text))]


def parse_llama3(text: str) -> list[dict]:
    """Llama 3.1+: `{"name": ..., "parameters": {...}}` (optionally after <|python_tag|>, several split by ';')."""
    text = text.strip().removeprefix("<|python_tag|>").strip()
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        obj, pos = decoder.raw_decode(text, pos)
        calls.append(_call(obj, args_key="parameters"))
        pos = len(text) - len(text[pos:].lstrip().removeprefix(";").lstrip())
    if not calls:
        raise ValueError("no call")
    return calls


def _mlx_lm(module: str) -> Callable[[str], list[dict]]:
    def parse(text: str) -> list[dict]:
        import importlib

        found = importlib.import_module(f"mlx_lm.tool_parsers.{module}").parse_tool_call(text, None)
        return [_call(c) for c in (found if isinstance(found, list) else [found])]

    return parse


TOOL_FORMATS = {
    "json": ToolFormat("json", "<tool_call>", "</tool_call>", parse_json_call),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "", _mlx_lm("mistral")),
    "llama3": ToolFormat("llama3", "<|python_tag|>", "", parse_llama3, is_parallel=False, is_whole_message=True),
    "pythonic": ToolFormat("pythonic", "<|tool_call_start|>", "<|tool_call_end|>", _mlx_lm("pythonic")),
    "harmony": ToolFormat("harmony", "<|channel|>", "<|call|>", parse_json_call, is_parallel=False),
}
# Families mlx-lm parses that mlxbatch does not (yet): a request with tools for them is refused by name.
UNSUPPORTED = {"<minimax:tool_call>": "minimax_m2", "<|tool_call>": "gemma4", "<start_function_call>": "function_gemma",
               "<longcat_tool_call>": "longcat", "<arg_key>": "glm47", "<tool_call>\\n<function=": "qwen3_coder",
               "<tool_call>\n<function=": "qwen3_coder", "<|tool_calls_section_begin|>": "kimi_k2",
               '<function name="': "minicpm5", "<atem:function_calls>": "muse_spark"}


def _vocab_has(tokenizer, token: str) -> bool:
    try:
        tid = tokenizer.convert_tokens_to_ids(token)
    except (KeyError, ValueError, TypeError):
        return False
    unk = getattr(tokenizer, "unk_token_id", None)
    return tid is not None and (unk is None or tid != unk)


def detect_tools(template: str | None, tokenizer) -> tuple[ToolFormat | None, str | None]:
    """(the model's tool format or None, the family name mlx-lm would use when mlxbatch has no parser for it)."""
    if _vocab_has(tokenizer, "<|channel|>") and all(_vocab_has(tokenizer, t) for t in HARMONY_TOKENS):
        return TOOL_FORMATS["harmony"], None
    t = template if isinstance(template, str) else ""
    for marker, family in UNSUPPORTED.items():  # mlx-lm checks these before the plain <tool_call> one
        if marker in t:
            return None, family
    if "<|tool_list_start|>" in t or "<|tool_call_start|>" in t:
        return TOOL_FORMATS["pythonic"], None
    if "[TOOL_CALLS]" in t:
        return TOOL_FORMATS["mistral"], None
    if "<tool_call>" in t:
        return TOOL_FORMATS["json"], None
    if "<|python_tag|>" in t or '"parameters": dictionary of argument name' in t:
        return TOOL_FORMATS["llama3"], None
    if _vocab_has(tokenizer, "<|tool_call_start|>") and _vocab_has(tokenizer, "<|tool_call_end|>"):
        return TOOL_FORMATS["pythonic"], None
    return None, None


def detect_reasoning(tokenizer) -> str | None:
    """"think" when the vocabulary holds the <think> pair (as mlx-lm decides), "harmony" for gpt-oss's channels."""
    if all(_vocab_has(tokenizer, t) for t in HARMONY_TOKENS):
        return "harmony"
    if all(_vocab_has(tokenizer, t) for t in THINK):
        return "think"
    return None


_CACHE: dict[int, tuple[object, object, ChatFormat]] = {}  # id(tokenizer) -> (tokenizer, template, formats)


def chat_format(tokenizer, model: str = "") -> ChatFormat:
    """The model's formats, detected once per tokenizer and chat template."""
    if tokenizer is None:
        return ChatFormat(None, None, model)
    template = getattr(tokenizer, "chat_template", None)
    found = _CACHE.get(id(tokenizer))
    if found is None or found[0] is not tokenizer or found[1] != template:
        fmt = ChatFormat(detect_tools(template, tokenizer)[0], detect_reasoning(tokenizer))
        found = _CACHE[id(tokenizer)] = (tokenizer, template, fmt)
    return ChatFormat(found[2].tools, found[2].reasoning, model)
