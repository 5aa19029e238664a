"""`mlxbatch serve`: an OpenAI-compatible local server whose requests and batches share one engine.

Modules: `app` (HTTP routes, request rules, response shapes), `engine_loop` (the one engine thread
and the priority of interactive requests over batch rows), `batches` and `files` (the Batch API on
durable job folders), `errors` (OpenAI-shaped errors). This module wires them and runs uvicorn.

Why Starlette + uvicorn (the `serve` extra): a small ASGI stack made for this (streaming
responses, client-disconnect detection, multipart uploads through python-multipart), kept out of
the base install because a batch-only user never needs a web server.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mlxbatch.errors import UsageError

EXTRA_HINT = "pip install 'mlxbatch[serve]'"


def require_serve() -> None:
    missing = []
    for mod, pkg in (("starlette", "starlette"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise UsageError(f"`mlxbatch serve` needs {', '.join(missing)}: {EXTRA_HINT}")


def serve_spec(job_file: Path | None, options: dict):
    """The job settings the server runs with: a job file's keys, then the options given; no input."""
    import os

    from mlxbatch.job.spec import build_spec

    # A batch's input is its uploaded file; a placeholder lets the job rules check everything else.
    values = {k: v for k, v in options.items() if v is not None}
    spec = replace(build_spec(job_file, {**values, "input": Path(os.devnull)}), input=None, output=None)
    check_serve_spec(spec, job_file)
    return spec


# Job settings the server cannot apply: refused, never accepted and dropped. Adapters would need a
# way for a request to choose one (and the server's engine built over them); workers, Ray workers.
_NOT_SERVED = {"adapter": "adapters", "workers": "Ray workers", "ray_address": "a Ray cluster"}


def check_serve_spec(spec, job_file: Path | None = None) -> None:
    """A usage error for a setting `serve` cannot apply (the KV format and the rest it applies)."""
    from mlxbatch.job.spec import JobSpec

    where = f"{job_file}: " if job_file else ""
    for key, what in _NOT_SERVED.items():
        if getattr(spec, key) != getattr(JobSpec, key):
            raise UsageError(f"{where}`{key}`: `mlxbatch serve` does not run {what}; remove it "
                             f"(`mlxbatch run` applies it)")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    data: Path = Path("mlxbatch-data")
    max_queue: int = 1024  # interactive samples waiting beyond the batch before 429
    allowed_hosts: tuple[str, ...] = ()  # Host names answered beyond the bound address ("*": any)
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any)
    served_model_names: tuple[str, ...] = ()  # names a request's `model` may give besides the model's own

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty, so no request could ever match it; give a key, or leave "
                             "--api-key (and MLXBATCH_API_KEY) out to serve without one")


def build(spec, opts: ServeOptions, lm=None):
    """The Server object (model loaded, engine thread not started yet) and its ASGI app."""
    from mlxbatch import models
    from mlxbatch.engine.config import EngineConfig
    from mlxbatch.job.render import Renderer
    from mlxbatch.output.records import RecordMaker
    from mlxbatch.server.app import Server, _LockedGrammars, build_app
    from mlxbatch.server.batches import BatchStore
    from mlxbatch.server.engine_loop import EngineLoop
    from mlxbatch.server.files import FileStore

    check_serve_spec(spec)
    lm = lm or models.load(spec.model, dtype=spec.dtype, ignore_eos=spec.ignore_eos)
    # Batches are jobs with the server's settings: their output lines are OpenAI Batch lines.
    spec = replace(spec, output_format="openai", ignore_eos=spec.ignore_eos if spec.ignore_eos is not None
                   else lm.is_random, commit_seconds=min(spec.commit_seconds, 1.0))
    # Interactive: each step's prefill is bounded, so no stream waits behind a long prompt.
    config = replace(EngineConfig.from_spec(spec), is_interactive=True)
    engine_loop = EngineLoop(lm, config, max_queue=opts.max_queue)
    files = FileStore(opts.data / "files")
    grammars = _LockedGrammars(lm.tokenizer)
    batches = BatchStore(opts.data / "batches", files, lm=lm, engine_loop=engine_loop, spec=spec,
                         grammars=grammars)
    names = lm.names | set(opts.served_model_names)  # the rule for the API and for Batch lines alike
    srv = Server(lm, engine_loop, files, batches, Renderer(spec, lm.tokenizer, lm.context_length, names=names),
                 RecordMaker("openai", lm.name, lm.tokenizer), grammars, opts.api_key, time.time(),
                 aliases=opts.served_model_names)

    def on_start():
        engine_loop.start()
        resumed = batches.resume_all()
        print(f"mlxbatch serve: {lm.name} on http://{opts.host}:{opts.port}/v1 (data {opts.data}, batch "
              f"{engine_loop.max_batch}{', resuming ' + ', '.join(resumed) if resumed else ''})", flush=True)

    def on_stop():
        batches.stop_all()
        engine_loop.stop()

    return srv, build_app(srv, on_start=on_start, on_stop=on_stop, host=opts.host,
                          allowed_hosts=opts.allowed_hosts, allowed_origins=opts.allowed_origins)


def serve(spec, opts: ServeOptions) -> None:
    """Load the model, serve until SIGINT/SIGTERM, then stop the batches (each commits) and return."""
    require_serve()
    import uvicorn

    _, app = build(spec, opts)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        print(f"mlxbatch serve: could not listen on {opts.host}:{opts.port}", file=sys.stderr)
        raise UsageError(f"could not listen on {opts.host}:{opts.port} (is the port in use?)")
