"""Trying hard to break it: I/O faults, a corpus of bad input, changed jobs, memory."""

import errno
import os
import re
import subprocess
import sys

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, read_jsonl, write_jsonl

from mlxbatch.output import fs

TINY = ["--model", "random:tiny", "--max-tokens", "6", "-q", "--batch-size", "4"]


def all_ids(out):
    return [r.get("id") or r.get("custom_id") for r in read_jsonl(out / "results.jsonl")] + \
           [r.get("custom_id") or r.get("id") for r in read_jsonl(out / "errors.jsonl")]


# ------------------------------------------------------------------ I/O faults
def _failing(real, k: int, code: int, persistent: bool):
    calls = {"n": 0}

    def wrapper(*a, **kw):
        calls["n"] += 1
        if calls["n"] == k or (persistent and calls["n"] > k):
            raise OSError(code, os.strerror(code))
        return real(*a, **kw)

    return wrapper


@pytest.mark.parametrize("target", ["append", "fsync", "replace"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("persistent", [False, True])
def test_io_fault_exits_cleanly_and_resumes(tmp_path, monkeypatch, target, code, persistent):
    rows = [{"id": f"f{i}", "prompt": f"fault test {i}"} for i in range(30)]
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text("commit_seconds = 0\n")  # commit every step, so the k-th call lands mid-run
    real = {"append": fs.append, "fsync": fs.fsync, "replace": os.replace}[target]
    k = 3 if target != "replace" else 2
    with monkeypatch.context() as m:
        where = (fs.os, "replace") if target == "replace" else (fs, target)
        m.setattr(*where, _failing(real, k, code, persistent))
        res = cli("run", src, "-o", out, "--job", job, *TINY)
    assert res.exit_code == 1, res.output
    assert "failed" in res.output and "rerun the same command to resume" in res.output
    if code == errno.ENOSPC:
        assert "disk full" in res.output
    ids = all_ids(out)
    assert len(ids) == len(set(ids))  # what is there is intact and unique
    res = cli("run", src, "-o", out, "--job", job, *TINY)
    assert res.exit_code == 0, res.output
    assert sorted(all_ids(out)) == sorted(r["id"] for r in rows)


# ------------------------------------------------------------------ bad input corpus
GOOD = {"id": "ok", "prompt": "fine"}
JSONL_CASES = [  # (raw line, expected error code)
    (b'{"id": "a", "prompt": "unterminated', "invalid_json"),
    (b"not json at all", "invalid_json"),
    (b"[1, 2]", "invalid_row"),
    (b'"a string"', "invalid_row"),
    (b"42", "invalid_row"),
    (b"null", "invalid_row"),
    (b'{"id": "u", "prompt": "\xff\xfe bad"}', "invalid_utf8"),
    (b'{"id": "nop"}', "missing_prompt"),
    (b'{"id": "empty", "prompt": ""}', "missing_prompt"),
    (b'{"id": "ws", "prompt": "   \\n "}', "missing_prompt"),
    (b'{"id": "num", "prompt": 5}', "invalid_field"),
    (b'{"id": "lst", "prompt": ["a"]}', "invalid_field"),
    (b'{"id": {"x": 1}, "prompt": "bad id"}', "invalid_field"),
    (b'{"id": "", "prompt": "empty id"}', "invalid_field"),
    (b'{"id": "m1", "messages": []}', "invalid_field"),
    (b'{"id": "m2", "messages": "hi"}', "invalid_field"),
    (b'{"id": "m3", "messages": [{"role": "wizard", "content": "x"}]}', "invalid_field"),
    (b'{"id": "m4", "messages": [{"role": "user", "content": 7}]}', "invalid_field"),
    (b'{"id": "m5", "messages": ["hi"]}', "invalid_field"),
    (b'{"id": "t0", "prompt": "x", "max_tokens": 0}', "invalid_field"),
    (b'{"id": "t1", "prompt": "x", "max_tokens": -5}', "invalid_field"),
    (b'{"id": "t2", "prompt": "x", "max_tokens": 99999999999}', "invalid_field"),
    (b'{"id": "t3", "prompt": "x", "max_tokens": "10"}', "invalid_field"),
    (b'{"id": "t4", "prompt": "x", "temperature": -0.1}', "invalid_field"),
    (b'{"id": "t5", "prompt": "x", "top_p": 0}', "invalid_field"),
    (b'{"id": "t6", "prompt": "x", "top_p": 1.01}', "invalid_field"),
    (b'{"id": "t7", "prompt": "x", "top_k": -1}', "invalid_field"),
    (b'{"id": "t8", "prompt": "x", "stop": [1, 2]}', "invalid_field"),
    (b'{"id": "t9", "prompt": "x", "n": 0}', "invalid_field"),
    (b'{"id": "ok", "prompt": "duplicate of the first good row"}', "duplicate_id"),
    (b'{"id": "long", "prompt": "' + b"word " * 9000 + b'"}', "prompt_too_long"),
]
OPENAI_CASES = [
    ({"custom_id": "o1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}, "unsupported_url"),
    ({"custom_id": "o2", "method": "GET", "url": "/v1/chat/completions", "body": {}}, "invalid_field"),
    ({"custom_id": "", "method": "POST", "url": "/v1/chat/completions", "body": {}}, "invalid_field"),
    ({"custom_id": "o4", "method": "POST", "url": "/v1/chat/completions", "body": "text"}, "invalid_field"),
    ({"custom_id": "o5", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}, "invalid_field"),
    ({"custom_id": "o6", "method": "POST", "url": "/v1/completions", "body": {"prompt": 3}}, "invalid_field"),
    ({"custom_id": "o7", "method": "POST", "url": "/v1/chat/completions",
      "body": {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}}, "invalid_field"),
    ({"custom_id": "o8", "method": "POST", "url": "/v1/chat/completions",
      "body": {"messages": [{"role": "user", "content": "x"}], "temperature": -1}}, "invalid_field"),
]


def _check_corpus(out, expected: dict, good_ids: set):
    errors = read_jsonl(out / "errors.jsonl")
    results = read_jsonl(out / "results.jsonl")
    assert {r.get("custom_id") or r.get("id") for r in results} == good_ids
    by_line = {e["line"]: e for e in errors}
    assert set(by_line) == set(expected), (sorted(by_line), sorted(expected))
    for line, code in expected.items():
        err = by_line[line]["error"]
        assert err["code"] == code, (line, err)
        assert err["message"].startswith(f"line {line}:") and len(err["message"]) > 20


def test_bad_jsonl_corpus(tmp_path):
    lines = [orjson.dumps(GOOD)] + [raw for raw, _ in JSONL_CASES] + [b"", b'{"id": "ok2", "prompt": "also fine"}']
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a BOM first, a blank line near the end
    out = tmp_path / "out"
    assert cli("run", src, "-o", out, *TINY).exit_code == 0
    _check_corpus(out, {i + 2: code for i, (_, code) in enumerate(JSONL_CASES)}, {"ok", "ok2"})


def test_bad_openai_corpus(tmp_path):
    good = {"custom_id": "g", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}
    src = write_jsonl(tmp_path / "b.jsonl", [good] + [c for c, _ in OPENAI_CASES])
    out = tmp_path / "out"
    assert cli("run", src, "-o", out, *TINY).exit_code == 0
    _check_corpus(out, {i + 2: code for i, (_, code) in enumerate(OPENAI_CASES)}, {"g"})
    assert all(e["response"] is None for e in read_jsonl(out / "errors.jsonl"))


def test_bad_parquet_corpus(tmp_path):
    rows = [{"id": "ok", "prompt": "fine", "max_tokens": 4, "temperature": 0.0},
            {"id": "nul", "prompt": None, "max_tokens": 4, "temperature": 0.0},
            {"id": "empty", "prompt": "", "max_tokens": 4, "temperature": 0.0},
            {"id": "zero", "prompt": "x", "max_tokens": 0, "temperature": 0.0},
            {"id": "neg", "prompt": "x", "max_tokens": 4, "temperature": -2.0},
            {"id": "ok", "prompt": "dup", "max_tokens": 4, "temperature": 0.0},
            {"id": None, "prompt": "no id", "max_tokens": 4, "temperature": 0.0}]
    src = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "out"
    assert cli("run", src, "-o", out, *TINY).exit_code == 0
    _check_corpus(out, {2: "invalid_field", 3: "missing_prompt", 4: "invalid_field", 5: "invalid_field",
                        6: "duplicate_id"}, {"ok", "line-7"})


def test_job_level_input_problems(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    bad_schema = tmp_path / "schema.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), bad_schema)
    res = cli("run", bad_schema, "-o", tmp_path / "o1", *TINY)
    assert res.exit_code == 1 and "no 'prompt'" in res.output and "columns: text" in res.output
    truncated = tmp_path / "trunc.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD] * 50), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    res = cli("run", truncated, "-o", tmp_path / "o2", *TINY)
    assert res.exit_code == 1 and "not a readable Parquet file" in res.output
    res = cli("run", tmp_path, "-o", tmp_path / "o3", *TINY)
    assert res.exit_code == 1 and "not a file" in res.output
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder's parent should be")
    res = cli("run", src, "-o", blocker / "out", *TINY)
    assert res.exit_code == 1 and "output folder" in res.output
    res = cli("run", tmp_path / "in.txt", *TINY)
    assert res.exit_code == 1


def test_edited_input_is_refused(tmp_path):
    src, out = write_jsonl(tmp_path / "in.jsonl", [GOOD]), tmp_path / "out"
    assert cli("run", src, "-o", out, *TINY).exit_code == 0
    write_jsonl(src, [GOOD, {"id": "new", "prompt": "added later"}])
    res = cli("run", src, "-o", out, *TINY)
    assert res.exit_code == 1 and "input.sha256" in res.output and "--restart" in res.output


@pytest.mark.slow
def test_million_rows_constant_memory(tmp_path):
    n = 1_000_000
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "memory_job.py"), str(n), str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    print(line)
    growth = float(re.search(r"growth_mb=([\d.]+)", line).group(1))
    assert f"rows={n}" in line and growth < 200, line
