"""OpenAI-shaped HTTP errors: `{"error": {"message", "type", "param", "code"}}` with a status.

Owns: `ApiError` and turning a row's RowError (the job rules' message) into one. Does not own:
the rules themselves (job/spec.py, job/render.py).
"""

from __future__ import annotations

import re

from mlxbatch.errors import RowError

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_LINE = re.compile(r"^line \d+: ")
_FIELD = re.compile(r"field '([^']+)'|^(body\.[\w.\[\]]+)|response_format")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def from_row_error(err: RowError) -> ApiError:
    """A request body that breaks a row rule: 400, the same message as in a batch's error file."""
    message = _LINE.sub("", err.message)
    param = err.param
    m = _FIELD.search(message) if param is None else None
    if m:
        param = (m.group(1) or m.group(2) or m.group(0)).removeprefix("body.")
    return ApiError(404 if err.code == "model_not_found" else 400, message, param=param, code=err.code)
