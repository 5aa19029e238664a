"""The `mlxbatch` command line: parse options, call one library function, map errors.

No logic lives here: each command builds its inputs and calls into the
library; `MlxbatchError`s become a one-line message and an exit code (1, 2 for
usage, 130 for interrupted). Set MLXBATCH_DEBUG=1 for tracebacks.

Exit guarantee: `main()` leaves through `os._exit` once output is committed and
stdout/stderr are flushed, so no library destructor (OpenBLAS joins its threads
at exit and can wait for ever) runs; a signal before the job loop starts exits
at once (nothing is half-written: commits are atomic).
"""

from __future__ import annotations

import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from mlxbatch import exits
from mlxbatch.errors import EXIT_INTERRUPTED, MlxbatchError
from mlxbatch.types import SamplingParams

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run a local LLM over a big file of prompts, resumably (MLX).")
models_app = typer.Typer(no_args_is_help=True, help="Cached models: list, pull, import, info.")
app.add_typer(models_app, name="models")

_MODEL_HELP = "smollm2-135m (default), gemma3-270m, random:<preset>, a .gguf file, a model folder or a Hugging Face repo id"


def _resume_command() -> str:
    args = [a for a in sys.argv[1:] if a != "--restart"]
    return "mlxbatch " + " ".join(shlex.quote(a) for a in args)


_D = SamplingParams  # its class attributes are the sampling defaults the help shows


@app.command()
def run(
    ctx: typer.Context,
    input: Optional[Path] = typer.Argument(None, help="prompts: .jsonl, .jsonl.gz or .parquet"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output folder (default: INPUT.mlxbatch)"),
    job: Optional[Path] = typer.Option(None, "--job", help="TOML job file; options given here override it"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help=f"tokens to generate per sample (default: {_D.max_tokens})"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help=f"0 is greedy (default: {_D.temperature})"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help=f"nucleus sampling mass, (0, 1] (default: {_D.top_p})"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help=f"sample from the k likeliest tokens, 0: all (default: {_D.top_k})"),
    min_p: Optional[float] = typer.Option(None, "--min-p", help=f"drop tokens below min_p x the likeliest's probability (default: {_D.min_p})"),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"sampling seed; each row and sample draws its own from it (default: {_D.seed})"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt for rows without one"),
    raw: Optional[bool] = typer.Option(None, "--raw", help="send prompts as they are, no chat template"),
    n: Optional[int] = typer.Option(None, "--n", help="samples per prompt (default: 1)"),
    logprobs: Optional[bool] = typer.Option(None, "--logprobs", help="record token logprobs"),
    top_logprobs: Optional[int] = typer.Option(None, "--top-logprobs", help="alternatives per token, 0-20 (default: 0)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="max sequences in flight (default: as many as the KV budget holds)"),
    max_kv_gb: Optional[float] = typer.Option(None, "--max-kv-gb", help="KV cache budget (default: 40% of memory)"),
    max_memory_gb: Optional[float] = typer.Option(None, "--max-memory-gb", help="weights, KV and activations under this many GB; layers that do not fit stream from the model's safetensors each step (default: the machine's memory; docs/performance.md)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto|bf16|fp16|fp32|q4|q8 (default: auto, by backend)"),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="store the KV cache at 8 or 4 bits (~2x / ~3.5x the rows in the same memory); 16: the model dtype (default)"),
    kv_value_bits: Optional[int] = typer.Option(None, "--kv-value-bits", help="values at other bits than keys, 8 or 4 (default: as --kv-bits)"),
    kv_group_size: Optional[int] = typer.Option(None, "--kv-group-size", help="elements per scale in the compressed KV: 32, 64 or 128 (default: 64 where it divides the head dimension)"),
    id_field: Optional[str] = typer.Option(None, "--id-field", help="input field holding the row id (default: id)"),
    prompt_field: Optional[str] = typer.Option(None, "--prompt-field", help="input field holding a plain prompt (default: prompt)"),
    messages_field: Optional[str] = typer.Option(None, "--messages-field", help="input field holding chat messages (default: messages)"),
    output_format: Optional[str] = typer.Option(None, "--output-format", help="results|openai|chat|completions|text (default: openai for OpenAI Batch input, else results)"),
    keep_fields: Optional[str] = typer.Option(None, "--keep-fields", help="input fields to copy into records (a,b)"),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="every output is JSON matching this schema file (rows' response_format wins)"),
    regex: Optional[str] = typer.Option(None, "--regex", help="every output matches this regular expression"),
    parquet: Optional[bool] = typer.Option(None, "--parquet", help="also write results.parquet at the end"),
    ignore_eos: Optional[bool] = typer.Option(None, "--ignore-eos/--stop-at-eos", help="default: ignore for random: models"),
    restart: Optional[bool] = typer.Option(None, "--restart", help="delete this job's results and start over"),
    workers: Optional[int] = typer.Option(None, "--workers", help="run on N Ray workers, 1-64, each loading the model once (default: in this process, no Ray)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="join this Ray cluster: auto or host:port (default: start a local one)"),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help="mlx-lm LoRA/DoRA adapter: a folder, a *_adapters.safetensors checkpoint, NAME=PATH or NAME=none (the base model); repeatable, rows pick one with an 'adapter' field (default: the first)"),
    each_adapter: Optional[bool] = typer.Option(None, "--each-adapter", help="run every row once per --adapter (side-by-side comparison)"),
    reasoning: Optional[str] = typer.Option(None, "--reasoning", help="a thinking model's reasoning: split (a 'reasoning' field beside the output), keep (left in the output) or drop (default: split)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
    profile_start: bool = typer.Option(False, "--profile-start", help="print where the first seconds went (imports, model, tokenizer, first steps)"),
) -> None:
    """Run (or resume) a job: one output record per input row."""
    import gc

    from mlxbatch.job.spec import build_spec
    from mlxbatch.ui.dashboard import Dashboard

    spec = build_spec(job, _options(ctx, "job", "quiet", "profile_start"))  # checked before the model loads
    from mlxbatch.runner import run_job

    try:
        with Dashboard(quiet=quiet) as dash:
            try:
                # Startup objects leave the collector's scans: a full collection over them (~0.1-0.2 s
                # with torch imported) now and then stalls the decode loop. The CLI's choice, not the library's.
                stats = run_job(spec, progress=dash.update, resume_hint=_resume_command(), on_loaded=gc.freeze)
            except MlxbatchError:
                dash.stop()
                raise
            dash.summary(stats, complete=True)
    finally:
        if profile_start:
            from mlxbatch import startup

            startup.print_table()


def _options(ctx: typer.Context, *skip: str) -> dict:
    """The command's parsed parameters by name (they are named as JobSpec's keys), less `skip`."""
    return {k: v for k, v in ctx.params.items() if k not in skip}


@app.command()
def status(folder: Path = typer.Argument(..., help="a job's output folder")) -> None:
    """Rows done / total, errors, tokens, throughput, and how to resume."""
    from mlxbatch.output.status import job_status

    typer.echo(job_status(folder))


@app.command()
def validate(
    ctx: typer.Context,
    input: Path = typer.Argument(..., help="prompts: .jsonl, .jsonl.gz or .parquet"),
    job: Optional[Path] = typer.Option(None, "--job", help="TOML job file to check too (its field names apply)"),
    id_field: Optional[str] = typer.Option(None, "--id-field", help="input field holding the row id (default: id)"),
    prompt_field: Optional[str] = typer.Option(None, "--prompt-field", help="input field holding a plain prompt (default: prompt)"),
    messages_field: Optional[str] = typer.Option(None, "--messages-field", help="input field holding chat messages (default: messages)"),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help="the job's adapters (NAME=PATH): rows' 'adapter' fields must name one"),
    max_problems: int = typer.Option(50, "--max-problems", help="problems to list (all are counted)"),
) -> None:
    """Check every row without loading a model; non-zero exit if any row is bad."""
    from mlxbatch.job.spec import build_spec
    from mlxbatch.job.validate import validate_input

    spec = build_spec(job, _options(ctx, "job", "max_problems"))
    text, problems = validate_input(spec, max_problems=max_problems)
    typer.echo(text)
    raise typer.Exit(1 if problems else 0)


@app.command()
def bench(
    workload: str = typer.Argument(..., help="parallm-325 | shared-prefix | mixed-lengths | long-outputs | adapters | kv-quality | offload"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=_MODEL_HELP),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    dtype: str = typer.Option("auto", "--dtype"),
    peers: str = typer.Option("mlx-lm,hf", "--peers", help="comma list of peers to run: mlx-lm, hf"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    repeat: int = typer.Option(3, "--repeat", min=1, help="timed runs per MLX system; the median is reported"),
    kv_bits: Optional[str] = typer.Option(None, "--kv-bits", help="comma list of KV formats to run at one KV budget: 16,8,4"),
    max_kv_gb: Optional[float] = typer.Option(None, "--max-kv-gb", help="the KV budget of every --kv-bits run"),
    kv_rows: Optional[int] = typer.Option(None, "--kv-rows", help="budget that holds this many rows uncompressed (default 64)"),
    max_memory_gb: Optional[float] = typer.Option(None, "--max-memory-gb", help="bench offload: the cap the streamed run works under (--peers none: no resident run)"),
) -> None:
    """Throughput of mlxbatch vs mlx-lm's batch_generate (and HF transformers) in one process."""
    from mlxbatch.bench import run_bench

    typer.echo(run_bench(workload, model=model, max_tokens=max_tokens, num_prompts=num_prompts,
                         batch_size=batch_size, dtype=dtype, peers=peers.split(","), as_json=json_out,
                         repeat=repeat, kv_bits=_int_list(kv_bits, "--kv-bits"), max_kv_gb=max_kv_gb,
                         kv_rows=kv_rows, max_memory_gb=max_memory_gb))


def _int_list(text: str | None, name: str) -> list[int] | None:
    from mlxbatch.errors import UsageError

    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{name} takes a comma list of integers, got {text!r}") from None


@app.command()
def serve(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (0.0.0.0 exposes it to your network)"),
    port: int = typer.Option(8080, "--port", help="port to listen on"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MLXBATCH_API_KEY", help="require 'Authorization: Bearer KEY' on /v1"),
    data: Path = typer.Option(Path("mlxbatch-data"), "--data", help="folder for uploaded files and batch jobs"),
    job: Optional[Path] = typer.Option(None, "--job", help="TOML job file: its model, sampling, batch and KV keys apply (adapters and workers are refused)"),
    batch_size: Optional[int] = typer.Option(None, "--max-batch", help="rows decoded together (default: as for run)"),
    max_kv_gb: Optional[float] = typer.Option(None, "--max-kv-gb", help="KV cache budget (default: 40% of memory)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto|bf16|fp16|fp32|q4|q8 (default: auto, by backend)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help=f"for requests that give none (default: {_D.max_tokens})"),
    max_queue: int = typer.Option(1024, "--max-queue", min=0, help="interactive requests waiting beyond the batch before 429"),
    ignore_eos: Optional[bool] = typer.Option(None, "--ignore-eos/--stop-at-eos", help="default: ignore for random: models"),
    allowed_hosts: Optional[str] = typer.Option(None, "--allowed-hosts", help="comma list of extra Host names to answer (* for any; default: the bound address, and any name on 0.0.0.0)"),
    allowed_origins: Optional[str] = typer.Option(None, "--allowed-origins", help="comma list of browser origins (web apps) allowed to call the API, with CORS (* for any; default: none)"),
    served_model_name: Optional[List[str]] = typer.Option(None, "--served-model-name", help="another model name requests may give (repeatable; 'default' and the model's own name always work)"),
) -> None:
    """OpenAI-compatible server (chat, completions, Batch API) on one continuous-batching engine."""
    from mlxbatch.server import ServeOptions, serve_spec
    from mlxbatch.server import serve as run_server

    opts = ServeOptions(host=host, port=port, api_key=api_key, data=data, max_queue=max_queue,
                        allowed_hosts=_names(allowed_hosts), allowed_origins=_names(allowed_origins),
                        served_model_names=tuple(served_model_name or ()))  # checked before the model loads
    spec = serve_spec(job, _options(ctx, "host", "port", "api_key", "data", "job", "max_queue", "allowed_hosts",
                                    "allowed_origins", "served_model_name"))
    run_server(spec, opts)


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


@app.command("export")
def export_cmd(
    folder: Path = typer.Argument(..., help="a finished job's output folder"),
    fmt: str = typer.Option("chat", "--format", help="chat | completions | text | records (every record as written, errors too)"),
    order: str = typer.Option("shuffled", "--order", help="shuffled (seeded) | input: input-row order, splits contiguous"),
    split: str = typer.Option("0.9,0.1", "--split", help="train,valid[,test] fractions"),
    to: Path = typer.Option(Path("data"), "--to", help="folder for train.jsonl / valid.jsonl"),
    drop_truncated: bool = typer.Option(False, "--drop-truncated", help="drop outputs that hit max_tokens"),
    dedupe: bool = typer.Option(False, "--dedupe", help="drop exact duplicates"),
    seed: int = typer.Option(0, "--seed", help="shuffle seed"),
    parquet: bool = typer.Option(False, "--parquet", help="also write .parquet files"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="only the records this adapter (of the job's --adapter names) made"),
    by_adapter: bool = typer.Option(False, "--by-adapter", help="one folder of splits per adapter: TO/NAME/train.jsonl ..."),
    reasoning: str = typer.Option("keep", "--reasoning", help="keep (chat: the assistant's reasoning_content; completions: <think>...</think> before the completion) or drop a thinking model's reasoning"),
) -> None:
    """Write train/valid files that mlx-lm's LoRA trainer (and TRL) read as they are."""
    from mlxbatch.output.export import export

    info = export(folder, fmt=fmt, split=split, to=to, drop_truncated=drop_truncated, dedupe=dedupe,
                  seed=seed, parquet=parquet, order=order, adapter=adapter, by_adapter=by_adapter,
                  reasoning=reasoning)
    for where, part in ({to / k: v for k, v in info.items()} if by_adapter else {to: info}).items():
        typer.echo(f"wrote {where}: " + ", ".join(f"{k} {v}" for k, v in part.items() if k != "dropped")
                   + f"; dropped {part['dropped']}")


@models_app.command("list")
def models_list() -> None:
    """Models in the cache."""
    from mlxbatch import models

    rows = models.list_cached()
    typer.echo(f"cache: {models.models_dir()}")
    for name, d in rows:
        typer.echo(f"  {name:40s} {d['size_mb']:>8.1f} MB  {d['architecture']}, {d['quantization']}")
    if not rows:
        typer.echo("  (empty; `mlxbatch models pull smollm2-135m` fetches the default)")
    typer.echo("random presets: " + ", ".join(f"random:{p}" for p in models.RANDOM_PRESETS)
               + " (random:<preset>:<layers> keeps the first layers only)")


class _ConvertProgress:
    """A rich progress bar for `models pull/import`, shown once conversion starts."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
        )

        self.bar = Progress("converting", BarColumn(), DownloadColumn(), TimeRemainingColumn(), transient=True,
                            console=Console(stderr=True))
        self.task = None
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("convert", total=total)
        self.bar.update(self.task, completed=done)

    def __exit__(self, *exc):
        if self.task is not None:
            self.bar.stop()


_DTYPE_HELP = "storage for dequantized tensors: auto|bf16|fp16|fp32|q4|q8 (auto: per backend)"


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="a built-in name (smollm2-135m, gemma3-270m) or a Hugging Face repo id"),
                dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP)) -> None:
    """Download (and convert) a model into the cache."""
    from mlxbatch import models

    with _ConvertProgress() as progress:
        typer.echo(models.local_path(name, dtype=dtype, progress=progress))


@models_app.command("import")
def models_import(file: Path = typer.Argument(..., help="a llama.cpp .gguf file"),
                  dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP)) -> None:
    """Convert a GGUF file into the cache (once; later runs reuse it)."""
    from mlxbatch import models

    with _ConvertProgress() as progress:
        typer.echo(models.import_gguf(file, dtype=dtype, progress=progress))


@models_app.command("info")
def models_info(name: str = typer.Argument(...), dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP)) -> None:
    """Where a model lives, its size, architecture, quantization; for GGUF imports the
    tensor types found and how each was converted."""
    from mlxbatch import models

    if name.startswith("random:"):
        for k, v in models.random_config(name.split(":", 1)[1]).items():
            typer.echo(f"{k}: {v}")
        return
    for k, v in models.describe(models.local_path(name, dtype=dtype)).items():
        typer.echo(f"{k}: {v}")


def main() -> None:
    exits.exit_on_signals()  # the console script did so too, before any slow import (mlxbatch/__init__.py)
    _leave(run_cli())


def run_cli(args: list[str] | None = None) -> int:
    """Run one command and return its exit code: the one error map (main() and the tests both go through it)."""
    code = 0
    try:
        app(args=args, prog_name="mlxbatch")
    except SystemExit as exc:  # typer/click end every command this way
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            typer.echo(str(exc.code), err=True)
    except MlxbatchError as err:  # raised outside a command's own handler
        typer.echo(f"mlxbatch: error: {err}", err=True)
        code = err.exit_code
    except KeyboardInterrupt:
        typer.echo("mlxbatch: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except Exception:
        if os.environ.get("MLXBATCH_DEBUG"):
            traceback.print_exc()
        typer.echo(f"mlxbatch: internal error: {sys.exc_info()[1]!r} (set MLXBATCH_DEBUG=1 for a traceback)", err=True)
        code = 1
    return code


def _leave(code: int) -> None:
    """Flush what we printed, then exit without running library destructors (all output is committed)."""
    exits.run()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
