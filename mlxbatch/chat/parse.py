"""A model's output split into content, reasoning and tool calls: streamed delta by delta, or whole.

Owns: `OutputParser` (`TaggedParser` for <think> tags and marker-delimited calls, `HarmonyParser`
for gpt-oss's channels), `ParsedOutput`, and the rule that makes streaming safe: text is passed
on only once no marker can start in it, so the events of any split of the text into deltas add
up to the same result as the whole text at once. A call that does not parse (or names a function
the request did not give) comes back as content, markers and all, never as a broken call.
Leading whitespace of each run of content or reasoning is dropped and trailing whitespace is held
until more text follows (the blank lines templates put around tags). Does not own: which format a
model uses (formats.py) or the OpenAI shapes of calls (tools.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from mlxbatch.chat.formats import THINK, ChatFormat

HEADER_MAX = 256  # harmony: a header this long without <|message|> is not a header (the model left the format)
_HARMONY_ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")


@dataclass
class ParsedOutput:
    content: str
    reasoning: str | None = None
    tool_calls: list = field(default_factory=list)  # [{"name", "arguments": dict}]


def held(text: str, markers) -> int:
    """How many characters at the end of `text` could be the start of a marker (kept back for now)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class _Run:
    """One channel's text as events, leading whitespace of a run dropped, trailing held until more follows."""

    def __init__(self, kind: str, out: list):
        self.kind, self.out = kind, out
        self.pending = ""
        self.is_start = True

    def add(self, text: str) -> None:
        if self.is_start:
            text = text.lstrip()
            if not text:
                return
            self.is_start = False
        body = text.rstrip()
        if not body:
            self.pending += text
            return
        self.out.append((self.kind, self.pending + body))
        self.pending = text[len(body):]

    def end(self) -> None:
        self.pending, self.is_start = "", True


class OutputParser:
    """feed(delta) -> events, finish() -> the last events; events are ("content" | "reasoning", text)
    or ("tool_call", {"name", "arguments"})."""

    def __init__(self, fmt: ChatFormat, *, tool_names=None, is_reasoning_open: bool = False):
        self.fmt = fmt
        self.tool_names = set(tool_names) if tool_names is not None else None  # None: tools off
        self.buf, self.pos = "", 0
        self.events: list = []
        self.content, self.reasoning = _Run("content", self.events), _Run("reasoning", self.events)
        self.all_events: list = []
        self.is_reasoning_open = is_reasoning_open

    @property
    def is_tools(self) -> bool:
        return self.tool_names is not None and self.fmt.tools is not None

    def feed(self, text: str) -> list:
        self.buf += text
        self._run(is_final=False)
        return self._take()

    def finish(self) -> list:
        self._run(is_final=True)
        return self._take()

    def _take(self) -> list:
        out = list(self.events)
        self.events.clear()
        self.all_events += out
        return out

    def result(self) -> ParsedOutput:
        parts = {"content": [], "reasoning": []}
        calls = []
        for kind, value in self.all_events:
            (calls.append(value) if kind == "tool_call" else parts[kind].append(value))
        reasoning = "".join(parts["reasoning"])
        return ParsedOutput("".join(parts["content"]), reasoning or None, calls)

    def _call(self, text: str, raw: str) -> None:
        """The calls in `text`, or `raw` as content when it is not a call of a given function."""
        try:
            calls = self.fmt.tools.parse(text)
            if any(c["name"] not in self.tool_names for c in calls):
                raise ValueError("a function the request did not give")
        except (ValueError, TypeError, KeyError, SyntaxError, RecursionError):
            self.content.add(raw)
            return
        self.content.end()
        self.events.extend(("tool_call", c) for c in calls)

    def _run(self, *, is_final: bool) -> None:
        raise NotImplementedError


class TaggedParser(OutputParser):
    """<think>...</think> reasoning and calls between a family's markers (or a whole-message JSON call)."""

    def __init__(self, fmt: ChatFormat, **kw):
        super().__init__(fmt, **kw)
        self.state = "reasoning" if self.is_reasoning_open and fmt.reasoning == "think" else "content"
        self.call_start = 0  # where the current call's text starts (state "tool")
        self.marker_start = 0  # where its opening marker starts
        self.is_message_start = True  # nothing but whitespace so far (a whole-message call may come)

    def _run(self, *, is_final: bool) -> None:
        while True:
            step = {"reasoning": self._reasoning, "content": self._content, "tool": self._tool}[self.state]
            if not step(is_final):
                return

    def _reasoning(self, is_final: bool) -> bool:
        i = self.buf.find(THINK[1], self.pos)
        if i < 0:
            stop = len(self.buf) if is_final else len(self.buf) - held(self.buf[self.pos:], [THINK[1]])
            self.reasoning.add(self.buf[self.pos:stop])
            self.pos = stop
            return False
        self.reasoning.add(self.buf[self.pos:i])
        self.reasoning.end()
        self.content.end()
        self.pos, self.state = i + len(THINK[1]), "content"
        return True

    def _content(self, is_final: bool) -> bool:
        tf = self.fmt.tools if self.is_tools else None
        if tf is not None and tf.is_whole_message and self.is_message_start:
            rest = self.buf[self.pos:].lstrip()
            if not rest or (not is_final and tf.start.startswith(rest)):
                return False  # not yet known whether this message is a call
            self.is_message_start = False
            if rest.startswith("{") or rest.startswith(tf.start):
                self.state, self.call_start = "tool", len(self.buf) - len(rest)
                self.marker_start = self.call_start
                return True
        markers = ([THINK[0]] if self.fmt.reasoning == "think" else []) + \
                  ([tf.start] if tf is not None and not tf.is_whole_message else [])
        found = min(((self.buf.find(m, self.pos), m) for m in markers if self.buf.find(m, self.pos) >= 0),
                    default=None)
        if found is None:
            stop = len(self.buf) if is_final else len(self.buf) - held(self.buf[self.pos:], markers)
            self.content.add(self.buf[self.pos:stop])
            self.is_message_start = self.is_message_start and not self.buf[self.pos:stop].strip()
            self.pos = stop
            return False
        i, m = found
        self.content.add(self.buf[self.pos:i])
        self.is_message_start = False
        self.pos = i + len(m)
        if m == THINK[0]:
            self.content.end()
            self.state = "reasoning"
        else:
            self.state, self.call_start, self.marker_start = "tool", self.pos, i
        return True

    def _tool(self, is_final: bool) -> bool:
        end = self.fmt.tools.end
        i = self.buf.find(end, self.call_start) if end else -1
        if i < 0:
            if is_final:  # cut off (or a format whose call runs to the end)
                self._call(self.buf[self.call_start:], self.buf[self.marker_start:])
                self.pos, self.state = len(self.buf), "content"
            return False
        self._call(self.buf[self.call_start:i], self.buf[self.marker_start:i + len(end)])
        self.pos, self.state = i + len(end), "content"
        return True


_CHANNEL = re.compile(r"<\|channel\|>\s*([\w.-]+)")
_RECIPIENT = re.compile(r"to=([^\s<]+)")


class HarmonyParser(OutputParser):
    """gpt-oss: messages `<|channel|>NAME [to=functions.F] [<|constrain|>json]<|message|>BODY<|end|>`;
    analysis -> reasoning, a message to functions.F -> a call, anything else -> content."""

    def __init__(self, fmt: ChatFormat, **kw):
        super().__init__(fmt, **kw)
        self.state, self.kind, self.name = "header", "content", ""
        self.body_start = 0

    def _run(self, *, is_final: bool) -> None:
        while self._header(is_final) if self.state == "header" else self._body(is_final):
            pass

    def _header(self, is_final: bool) -> bool:
        window = HEADER_MAX + len("<|message|>")  # decided on this much text alone: the same for any split
        i = self.buf.find("<|message|>", self.pos, self.pos + window)
        if i < 0:
            if len(self.buf) - self.pos < window and not is_final:
                return False
            self.kind, self.state, self.body_start = "content", "body", self.pos  # not harmony after all
            return True
        header = self.buf[self.pos:i]
        channel, to = _CHANNEL.search(header), _RECIPIENT.search(header)
        if to and to.group(1).startswith("functions.") and self.is_tools:
            self.kind, self.name = "tool", to.group(1).removeprefix("functions.")
        else:
            self.kind = "reasoning" if channel and channel.group(1) == "analysis" else "content"
        self.state, self.pos = "body", i + len("<|message|>")
        self.body_start = self.pos
        return True

    def _body(self, is_final: bool) -> bool:
        run = self.reasoning if self.kind == "reasoning" else self.content
        ends = [(self.buf.find(e, self.pos), e) for e in _HARMONY_ENDS]
        found = min(((i, e) for i, e in ends if i >= 0), default=None)
        if found is None:
            if self.kind != "tool":
                stop = len(self.buf) if is_final else len(self.buf) - held(self.buf[self.pos:], _HARMONY_ENDS)
                run.add(self.buf[self.pos:stop])
                self.pos = stop
            elif is_final:
                self._harmony_call(self.buf[self.body_start:])
                self.pos = len(self.buf)
            return False
        i, e = found
        if self.kind == "tool":
            self._harmony_call(self.buf[self.body_start:i])
        else:
            run.add(self.buf[self.pos:i])
        run.end()
        self.state, self.pos = "header", i + len(e)
        return True

    def _harmony_call(self, body: str) -> None:
        try:
            args = json.loads(body)
            if not isinstance(args, dict) or self.name not in self.tool_names:
                raise ValueError("not a call of a given function")
        except ValueError:
            self.content.add(body)
            return
        self.content.end()
        self.events.append(("tool_call", {"name": self.name, "arguments": args}))


def make_parser(fmt: ChatFormat, *, tool_names=None, is_reasoning_open: bool = False,
                is_reasoning: bool = True) -> OutputParser | None:
    """The parser this output needs, or None when it is all content (no tools, no reasoning format)."""
    if not is_reasoning and not fmt.is_harmony:
        fmt = ChatFormat(fmt.tools, None, fmt.model)
    if tool_names is None and fmt.reasoning is None:
        return None
    cls = HarmonyParser if fmt.is_harmony else TaggedParser
    return cls(fmt, tool_names=tool_names, is_reasoning_open=is_reasoning_open)


def split_output(text: str, fmt: ChatFormat, **kw) -> ParsedOutput:
    """The whole output split at once (the same as feeding it in any number of deltas)."""
    parser = make_parser(fmt, **kw)
    if parser is None:
        return ParsedOutput(text)
    parser.feed(text)
    parser.finish()
    return parser.result()
