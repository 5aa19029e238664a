"""Which requests reach the API at all: the Host names the server answers, and browser origins.

Owns: refusing a Host header the server was not bound for (DNS rebinding: a web page whose name
now points at this machine), refusing requests a browser sends from another origin (a page's
`fetch` or form POST), and CORS headers for the origins the user allows. Does not own: the API
key (server/app.py), which is checked after this.

The rules: a loopback bind (127.0.0.1, ::1, localhost) answers localhost, 127.0.0.1 and [::1]
on any port; a bind to one address answers that address (and the loopback names); a bind to
0.0.0.0 or :: is meant to be reached from the network by any name, so it answers any Host.
`--allowed-hosts` adds names (on 0.0.0.0 it pins them); `*` accepts any. Whatever the bind, a
request with an `Origin` header (browsers send one on cross-origin requests and on every POST) is
refused unless `--allowed-origins` names that origin or is `*`: the server serves no pages, so no
browser request is its own.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

from mlxbatch.server.errors import ApiError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})


def host_names(host: str, allowed: tuple[str, ...]) -> frozenset[str] | None:
    """The Host names answered (without ports), or None for any."""
    extra = {_name(h) for h in allowed}
    if "*" in extra or (_name(host) in ANY_ADDRESS and not extra):
        return None
    bound = set() if _name(host) in ANY_ADDRESS else {_name(host)}
    return frozenset(LOOPBACK_NAMES | bound | extra)


def _name(value: str) -> str:
    """A Host header's (or address's) name: lower case, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def guard(app, *, host: str, allowed_hosts: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = ()):
    """`app` behind the Host and Origin checks (and CORS for the allowed origins)."""
    origins = frozenset(o.strip().rstrip("/").lower() for o in allowed_origins)
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(app, allow_origins=["*"] if "*" in origins else sorted(origins), allow_methods=["*"],
                             allow_headers=["*"])
    return _Guard(app, host_names(host, allowed_hosts), origins)


class _Guard:
    def __init__(self, app, names: frozenset[str] | None, origins: frozenset[str]):
        self.app, self.names, self.origins = app, names, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self.refusal(dict(scope["headers"]))
            if err is not None:
                await Response(orjson.dumps(err.body), status_code=err.status,
                               media_type="application/json")(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: dict) -> ApiError | None:
        host = headers.get(b"host")
        if host is not None and self.names is not None and _name(host.decode("latin-1")) not in self.names:
            return ApiError(400, f"this server does not answer to the host name {host.decode('latin-1')!r}; "
                            "start it with --allowed-hosts NAME to accept it", code="invalid_host")
        origin = headers.get(b"origin")
        if origin is not None and "*" not in self.origins and \
                origin.decode("latin-1").rstrip("/").lower() not in self.origins:
            return ApiError(403, f"requests from the web origin {origin.decode('latin-1')!r} are refused; "
                            "start the server with --allowed-origins ORIGIN to allow a web app", code="origin_not_allowed")
        return None
