"""The CLI end to end on random:tiny: formats, errors, resume, kill -9, signals."""

import os
import random
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import LONG, ROOT, cli, read_jsonl, write_jsonl

TINY = ["--model", "random:tiny", "--max-tokens", "12", "-q"]


def ids_of(folder):
    return [r["id"] for r in read_jsonl(folder / "results.jsonl")] + [r["id"] for r in read_jsonl(folder / "errors.jsonl")]


def outputs(folder):
    return {r["id"]: r["output"] for r in read_jsonl(folder / "results.jsonl")}


def test_run_jsonl_and_status(prompts_file, tmp_path):
    out = tmp_path / "out"
    res = cli("run", prompts_file, "-o", out, *TINY, "--batch-size", "8")
    assert res.exit_code == 0, res.output
    assert sorted(ids_of(out)) == sorted(f"r{i}" for i in range(40))
    rec = read_jsonl(out / "results.jsonl")[0]
    assert set(rec) == {"id", "output", "finish_reason", "usage"} and rec["finish_reason"] == "length"
    assert rec["usage"]["completion_tokens"] == 12
    st = cli("status", out)
    assert "40 / 40 done" in st.output and "complete" in st.output
    again = cli("run", prompts_file, "-o", out, *TINY, "--batch-size", "8")  # a rerun adds nothing
    assert again.exit_code == 0 and len(ids_of(out)) == 40


def test_parquet_input_and_output(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"qid": f"p{i}", "question": f"Question {i}?", "label": i % 2}
                                         for i in range(10)]), src)
    out = tmp_path / "out"
    res = cli("run", src, "-o", out, *TINY, "--id-field", "qid", "--prompt-field", "question",
              "--keep-fields", "label", "--parquet")
    assert res.exit_code == 0, res.output
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted(r["id"] for r in table) == [f"p{i}" for i in range(10)]
    assert all("label" in r for r in table)


def test_openai_batch_round_trip(tmp_path):
    rows = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "default", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 5}}
            for i in range(4)]
    rows.append({"custom_id": "t", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once", "max_tokens": 4, "n": 2}})
    src = write_jsonl(tmp_path / "batch.jsonl", rows)
    out = tmp_path / "out"
    res = cli("run", src, "-o", out, *TINY)
    assert res.exit_code == 0, res.output
    lines = {r["custom_id"]: r for r in read_jsonl(out / "results.jsonl")}
    assert set(lines) == {"c0", "c1", "c2", "c3", "t"}
    body = lines["c0"]["response"]["body"]
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 5
    assert lines["t"]["response"]["body"]["object"] == "text_completion"
    assert len(lines["t"]["response"]["body"]["choices"]) == 2


def test_bad_rows_become_error_records(tmp_path):
    out = tmp_path / "out"
    res = cli("run", ROOT / "sample_data" / "bad_rows.jsonl", "-o", out, *TINY)
    assert res.exit_code == 0, res.output
    errors = read_jsonl(out / "errors.jsonl")
    results = read_jsonl(out / "results.jsonl")
    assert len(results) + len(errors) == 14  # one record per row; the blank line is not a row
    assert {r["id"] for r in results} == {"good-1", "good-2"}
    codes = {e["error"]["code"] for e in errors}
    assert {"invalid_json", "invalid_row", "missing_prompt", "invalid_field", "duplicate_id",
            "unsupported_url", "invalid_utf8"} <= codes
    assert all(e["line"] > 0 and e["error"]["message"].startswith(f"line {e['line']}") for e in errors)


@pytest.mark.slow
def test_changed_setting_is_refused(prompts_file, tmp_path):
    out = tmp_path / "out"
    assert cli("run", prompts_file, "-o", out, *TINY).exit_code == 0
    res = cli("run", prompts_file, "-o", out, *TINY, "--temperature", "0.5")
    assert res.exit_code == 1 and "temperature: 0.0 -> 0.5" in res.output
    res = cli("run", prompts_file, "-o", out, "--model", "random:smollm2-135m", "--max-tokens", "12", "-q")
    assert res.exit_code == 1 and "model.name" in res.output
    res = cli("run", prompts_file, "-o", out, *TINY, "--temperature", "0.5", "--restart")
    assert res.exit_code == 0


def test_job_level_errors(tmp_path, prompts_file):
    assert cli("run", tmp_path / "missing.jsonl", *TINY).exit_code == 1
    res = cli("run", prompts_file, "-o", prompts_file, *TINY)
    assert res.exit_code == 2 and "is the input file" in res.output
    res = cli("run", prompts_file, "-o", tmp_path / "o", "--model", "no-such-model", "-q")
    assert res.exit_code == 1 and "unknown model" in res.output
    res = cli("run", prompts_file, "-o", tmp_path / "o2", *TINY, "--top-p", "0")
    assert res.exit_code == 2 and "--top-p must be" in res.output


def test_validate(tmp_path):
    good = cli("validate", ROOT / "sample_data" / "prompts.jsonl")
    assert good.exit_code == 0 and "0 with problems" in good.output
    bad = cli("validate", ROOT / "sample_data" / "bad_rows.jsonl")
    assert bad.exit_code == 1 and "bad_rows.jsonl:2:" in bad.output


def _spawn(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "mlxbatch", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _wait_started(out, p, timeout=120):
    """Until the job has committed something (model loaded, loop running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if (out / "done.idx").exists() and (out / "done.idx").stat().st_size > 0:
            return
        time.sleep(0.2)
    raise AssertionError("job did not start")


def _big_input(tmp_path, n=150):
    rows = [{"id": f"k{i}", "prompt": f"Row {i}: " + "word " * (i % 13)} for i in range(n)]
    return write_jsonl(tmp_path / "big.jsonl", rows)


def _job_args(src, out):
    # Small commits and batches so kills land between commits mid-run.
    return ["run", src, "-o", out, "--model", "random:tiny", "--max-tokens", "24", "--batch-size", "6", "-q"]


@pytest.mark.slow
def test_kill_loop_resumes_exactly(tmp_path):
    n = 4000 if LONG else 800  # enough rows that every planned kill lands before the end
    src = _big_input(tmp_path, n)
    ref = tmp_path / "ref"
    assert cli(*_job_args(src, ref)).exit_code == 0
    out, kills, rng = tmp_path / "out", 0, random.Random(7)
    target = 50 if LONG else 5
    while kills < target:
        p = _spawn(_job_args(src, out))
        time.sleep(rng.uniform(1.0, 3.0))
        if p.poll() is not None:
            break  # finished before the kill
        p.kill()
        p.wait()
        kills += 1
        got = ids_of(out)
        assert len(got) == len(set(got)), "duplicate after kill -9"
    res = cli(*_job_args(src, out))
    assert res.exit_code == 0, res.output
    got = ids_of(out)
    assert sorted(got) == sorted(f"k{i}" for i in range(n)) and len(got) == n
    assert outputs(out) == outputs(ref)
    assert kills >= target, f"only {kills} kills landed before the job finished"
    print(f"kill loop: {kills} kills survived, {n} rows, every id once, outputs equal the uninterrupted run")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.slow
def test_signal_commits_and_exits_130(tmp_path, sig):
    src, out = _big_input(tmp_path, 300), tmp_path / "out"
    p = _spawn(_job_args(src, out))
    _wait_started(out, p)
    p.send_signal(sig)
    t = time.monotonic()
    text = p.communicate(timeout=30)[0].decode()
    assert p.returncode == 130, text
    assert time.monotonic() - t < 10
    assert "resume with: mlxbatch run" in text
    done = len(ids_of(out))
    assert cli(*_job_args(src, out)).exit_code == 0
    assert len(ids_of(out)) == 300 and done <= 300


@pytest.mark.slow
def test_double_sigint_exits_at_once_and_resumes(tmp_path):
    src, out = _big_input(tmp_path, 200), tmp_path / "out"
    p = _spawn(_job_args(src, out))
    _wait_started(out, p)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=30)
    assert p.returncode == 130
    assert cli(*_job_args(src, out)).exit_code == 0
    got = ids_of(out)
    assert sorted(got) == sorted(f"k{i}" for i in range(200))
