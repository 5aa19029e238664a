"""One validation of an OpenAI request body, for the server's requests and Batch API lines alike.

Owns: the OpenAI fields mlxbatch refuses rather than ignores (`REFUSED`), the `model` a body may
name (`model_names`: what a loaded model answers to), and the tool fields' checks (through
chat/tools.py), each failure a RowError naming the field (`param`), so `mlxbatch run`, a server
batch and an interactive request give the same message: an error record for a line, a 400 (404
for an unknown model) for a request. Does not own: the sampling fields' rules (job/spec.py RULES,
applied by job/render.py) or the server-only fields (`stream`, `stream_options`: server/app.py).
"""

from __future__ import annotations

from pathlib import Path

from mlxbatch.chat.tools import ToolError, ToolSpec, check_tools
from mlxbatch.errors import RowError

DEFAULT_MODEL_NAME = "default"  # a body's `model` that means "whatever this server or job runs"

# OpenAI fields mlxbatch cannot honour: refused (naming the field) rather than silently ignored.
REFUSED = {
    "functions": lambda v: bool(v), "function_call": lambda v: v not in (None, "none"),
    "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0, 0.0), "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "best_of": lambda v: v not in (None, 1), "echo": lambda v: bool(v), "suffix": lambda v: v is not None,
    "audio": lambda v: v is not None, "prediction": lambda v: v is not None,
}


def model_names(spec: str, path: Path | None = None) -> set[str]:
    """The names a body's `model` may give for the model loaded as `spec` (from `path`): the spec, the
    folder's or file's path and name, and "default"."""
    names = {spec, DEFAULT_MODEL_NAME}
    for p in (path, None if spec.startswith("random:") else Path(spec)):
        if p is not None:
            names |= {str(p), p.name, p.name.removesuffix(".gguf")}
    return names


def check_body(body: dict, *, line: int, is_chat: bool, names: set[str], model: str) -> ToolSpec | None:
    """Raise RowError for a refused field, an unknown model or bad tools; return the checked tools."""
    for key, is_refused in REFUSED.items():
        if key in body and is_refused(body[key]):
            raise RowError("unsupported_parameter", f"line {line}: field {key!r} is not supported by mlxbatch "
                           "(refused rather than ignored)", param=key)
    given = body.get("model")
    if given is not None and (not isinstance(given, str) or given not in names):
        raise RowError("model_not_found", f"line {line}: field 'model' is {given!r}; this runs {model!r} "
                       f"(give that, {DEFAULT_MODEL_NAME!r}, or leave 'model' out)", param="model")
    if not is_chat and body.get("tools"):
        raise RowError("invalid_field", f"line {line}: field 'tools' needs /v1/chat/completions", param="tools")
    return tools_of(body, line)


def tools_of(data: dict, line: int) -> ToolSpec | None:
    """A row's or body's tools, checked (RowError naming the field)."""
    try:
        return check_tools(data)
    except ToolError as exc:
        raise RowError("invalid_field", f"line {line}: {exc.message}", param=exc.param) from None
