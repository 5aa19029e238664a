"""The output folder's safety rules: folder lock, kept fields, Parquet, ids as written, symlinks, and the weaker list.

Exit paths are in test_exit_paths.py, memory in test_constant_memory.py.
"""

import errno
import os
import subprocess
import sys
import time

import orjson
import pyarrow.parquet as pq
import pytest
from conftest import cli, read_jsonl, write_jsonl

from mlxbatch.errors import OutputError, ResumeError
from mlxbatch.job import render, source
from mlxbatch.job.spec import JobSpec
from mlxbatch.output import journal
from mlxbatch.output import records as sink
from mlxbatch.output.checkpoint import RESULTS, Checkpoint
from mlxbatch.runner import run_job
from mlxbatch.types import SamplingParams

TINY = ["--model", "random:tiny", "--max-tokens", "4", "-q", "--batch-size", "4"]
MANIFEST = {"input": {"sha256": "x"}, "settings": {}}


def rows(n, **extra):
    return [{"id": f"r{i}", "prompt": f"question {i}", **extra} for i in range(n)]


# ------------------------------------------------------------------ 2: the folder lock
def test_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    src, out = write_jsonl(tmp_path / "in.jsonl", rows(6)), tmp_path / "out"
    assert cli("run", src, "-o", out, "--output-format", "completions", *TINY).exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from mlxbatch.output.fs import lock\n"
        f"fd = lock(Path({str(out)!r})); print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        res = cli("run", src, "-o", out, *TINY)
        assert res.exit_code == 1 and f"pid {holder.pid}" in res.output and "in use" in res.output, res.output
        assert time.monotonic() - started < 30
        status = cli("status", out)
        assert status.exit_code == 0 and f"running:   pid {holder.pid}" in status.output, status.output
        assert cli("export", out, "--format", "completions", "--to", tmp_path / "data").exit_code == 0
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    res = cli("run", src, "-o", out, "--output-format", "completions", *TINY)
    assert res.exit_code == 0, res.output
    assert len(read_jsonl(out / "results.jsonl")) == 6


def test_lock_is_taken_before_restart_deletes(tmp_path):
    Checkpoint.open(tmp_path / "o", MANIFEST).commit()  # a first run, still open (holds the lock)
    with pytest.raises(ResumeError, match="in use"):
        Checkpoint.open(tmp_path / "o", MANIFEST, restart=True)
    assert (tmp_path / "o" / "manifest.json").exists()


# ------------------------------------------------------------------ 3: kept fields never replace generated ones
def test_keep_fields_clash_is_a_usage_error_before_the_model_loads(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a0", "prompt": "p", "output": "REFERENCE", "src": "s"}])
    res = cli("run", src, "-o", tmp_path / "o", "--model", "no-such-model-xyz", "--keep-fields", "output,usage,src")
    assert res.exit_code == 2 and "output" in res.output and "usage" in res.output, res.output
    res = cli("run", src, "-o", tmp_path / "o2", "--keep-fields", "messages", "--output-format", "chat", *TINY)
    assert res.exit_code == 2, res.output
    res = cli("run", src, "-o", tmp_path / "o3", "--keep-fields", "src", *TINY)
    rec = read_jsonl(tmp_path / "o3" / "results.jsonl")[0]
    assert res.exit_code == 0 and rec["src"] == "s" and rec["output"] != "REFERENCE"


# ------------------------------------------------------------------ 4: Parquet holds what the JSONL holds
def _decoded(table):
    json_cols = {f.name for f in table.schema if (f.metadata or {}).get(b"mlxbatch") == b"json"}
    return [{k: (orjson.loads(v) if k in json_cols and v is not None else v) for k, v in r.items() if v is not None}
            for r in table.to_pylist()]


def test_parquet_unified_schema_streamed_in_row_groups(tmp_path, monkeypatch):
    data = rows(7, tag=1)
    data[3]["n"] = 3  # `sample` appears only from row 3
    data[5]["logprobs"] = True  # `logprobs` only on row 5
    data[6]["tag"] = "seven"  # a kept column of mixed types
    src, out = write_jsonl(tmp_path / "in.jsonl", data), tmp_path / "out"
    monkeypatch.setattr(sink, "_PARQUET_ROWS", 2)
    res = cli("run", src, "-o", out, "--parquet", "--keep-fields", "tag", *TINY)
    assert res.exit_code == 0, res.output
    pf = pq.ParquetFile(out / "results.parquet")
    assert pf.metadata.num_row_groups > 1
    expected = [{k: v for k, v in r.items() if v is not None} for r in read_jsonl(out / "results.jsonl")]
    assert _decoded(pf.read()) == expected
    assert {"sample", "logprobs", "tag"} <= set(pf.schema_arrow.names)


def test_parquet_disk_full_is_a_clean_output_error(tmp_path, monkeypatch):
    src, out = write_jsonl(tmp_path / "in.jsonl", rows(3)), tmp_path / "out"

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    res = cli("run", src, "-o", out, "--parquet", *TINY)
    assert res.exit_code == 1 and "disk full" in res.output and "internal error" not in res.output, res.output
    assert not (out / "results.parquet.tmp").exists()
    monkeypatch.undo()
    assert cli("run", src, "-o", out, "--parquet", *TINY).exit_code == 0
    assert pq.read_table(out / "results.parquet").num_rows == 3


# ------------------------------------------------------------------ 5: ids unique as written
CLASHING = [{"id": 77, "prompt": "a"}, {"id": "77", "prompt": "b"}, {"prompt": "no id, line 3"},
            {"id": "line-3", "prompt": "d"}, {"id": "ok", "prompt": "e"}]


def test_ids_unique_as_written_in_run_and_validate(tmp_path):
    src, out = write_jsonl(tmp_path / "in.jsonl", CLASHING), tmp_path / "out"
    assert cli("run", src, "-o", out, *TINY).exit_code == 0
    ids = [r["id"] for r in read_jsonl(out / "results.jsonl")]
    assert sorted(ids) == ["77", "line-3", "ok"]
    assert {e["line"]: e["error"]["code"] for e in read_jsonl(out / "errors.jsonl")} == {2: "duplicate_id",
                                                                                        4: "duplicate_id"}
    res = cli("validate", src)
    assert res.exit_code == 1 and "2 with problems" in res.output and res.output.count("duplicate_id") == 2


# ------------------------------------------------------------------ 6: symlinks are never followed
@pytest.mark.parametrize("name", ["results.jsonl", "errors.jsonl", "done.idx"])
def test_symlinked_output_file_is_refused(tmp_path, name):
    src, out = write_jsonl(tmp_path / "in.jsonl", rows(3)), tmp_path / "out"
    assert cli("run", src, "-o", out, *TINY).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    (out / name).unlink()
    (out / name).symlink_to(victim)
    res = cli("run", src, "-o", out, *TINY)
    assert res.exit_code == 1 and "symbolic link" in res.output, res.output
    assert victim.read_bytes() == b"precious\n"


def test_symlinked_temporaries_are_replaced_not_followed(tmp_path):
    src, out = write_jsonl(tmp_path / "in.jsonl", rows(3)), tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("manifest.json.tmp", "checkpoint.json.tmp", "results.parquet.tmp", "metrics.jsonl"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_bytes(b"precious\n")
        (out / name).symlink_to(victims[name])
    (out / "metrics.jsonl").unlink()  # metrics is opened for append: a link there is refused (tested above)
    res = cli("run", src, "-o", out, "--parquet", *TINY)
    assert res.exit_code == 0, res.output
    assert all(v.read_bytes() == b"precious\n" for v in victims.values())
    assert pq.read_table(out / "results.parquet").num_rows == 3


# ------------------------------------------------------------------ 7: the weaker list
def test_export_skips_torn_tail_and_writes_splits_atomically(tmp_path, monkeypatch):
    src, out = write_jsonl(tmp_path / "in.jsonl", rows(20)), tmp_path / "out"
    assert cli("run", src, "-o", out, "--output-format", "completions", *TINY).exit_code == 0
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"prompt": "torn", "compl')  # a running job's uncommitted tail
    data = tmp_path / "data"
    res = cli("export", out, "--format", "completions", "--to", data, "--parquet")
    assert res.exit_code == 0 and "train 18, valid 2" in res.output, res.output
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    from mlxbatch.output import export as export_mod

    def full(part, handle):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_mod, "_parquet", full)
    res = cli("export", out, "--format", "completions", "--to", data, "--parquet", "--seed", "3")
    assert res.exit_code == 1 and "disk full" in res.output, res.output
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # old splits intact, no temporaries


def test_damaged_state_or_manifest_gives_a_clear_answer(tmp_path):
    src, out = write_jsonl(tmp_path / "in.jsonl", rows(4)), tmp_path / "out"
    assert cli("run", src, "-o", out, *TINY).exit_code == 0
    (out / "checkpoint.json").write_bytes(b'{"format": "mlxbatch-state v1", "rows_do')
    assert cli("status", out).exit_code == 0
    res = cli("run", src, "-o", out, *TINY)
    assert res.exit_code == 0, res.output
    (out / "manifest.json").write_bytes(b"[]")
    for res in (cli("run", src, "-o", out, *TINY), cli("status", out)):
        assert res.exit_code == 1 and "damaged" in res.output and "internal error" not in res.output, res.output


@pytest.mark.parametrize("how", ["insert", "overwrite"])
def test_zero_bytes_inside_results_lose_no_row(tmp_path, how):
    cp = Checkpoint.open(tmp_path, MANIFEST)
    recs = [orjson.dumps({"id": f"r{i}", "output": "x" * 40}) + b"\n" for i in range(10)]
    for i, rec in enumerate(recs):
        cp.add(i, RESULTS, rec)
    cp.commit()
    cp.close()
    path = tmp_path / "results.jsonl"
    data, at = path.read_bytes(), sum(len(r) for r in recs[:4]) + 10
    path.write_bytes(data[:at] + b"\0" * 300 + data[at + (300 if how == "overwrite" else 0):])
    cp = Checkpoint.open(tmp_path, MANIFEST)
    kept = [orjson.loads(x)["id"] for x in path.read_bytes().splitlines()]
    assert b"\0" not in path.read_bytes()
    assert kept == [f"r{i}" for i in range(10) if cp.is_done(i)]  # every done row has its record
    for i in range(10):
        if not cp.is_done(i):
            cp.add(i, RESULTS, recs[i])
    cp.commit()
    cp.close()
    assert sorted(orjson.loads(x)["id"] for x in path.read_bytes().splitlines()) == sorted(f"r{i}" for i in range(10))


def test_recovery_from_a_long_damaged_tail_is_linear(tmp_path):
    cp = Checkpoint.open(tmp_path, MANIFEST)
    for i in range(30_000):
        cp.add(i, RESULTS, b'{"id": "r%d", "o": "xyzxyzxyzxyz"}\n' % i)
    cp.commit()
    cp.close()
    path = tmp_path / "results.jsonl"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - (1 << 20))
        f.write(b"\0" * (1 << 20))  # 1 MB of zeros over the committed tail
    started = time.monotonic()
    cp = Checkpoint.open(tmp_path, MANIFEST)
    assert time.monotonic() - started < 5
    assert 0 < cp.num_done < 30_000 and b"\0" not in path.read_bytes()
    cp.close()


def test_results_deleted_mid_run_stops_with_an_error(tmp_path):
    cp = Checkpoint.open(tmp_path, MANIFEST)
    cp.add(0, RESULTS, b'{"id": "a"}\n')
    cp.commit()
    (tmp_path / "results.jsonl").unlink()
    cp.add(1, RESULTS, b'{"id": "b"}\n')
    with pytest.raises(OutputError, match="deleted or replaced"):
        cp.commit()
    cp.close()
    cp = Checkpoint.open(tmp_path, MANIFEST)
    assert not cp.is_done(0) and not cp.is_done(1)  # both rows run again: nothing is counted without its record
    cp.close()


def test_bom_only_first_line_counts_like_it_reads(tmp_path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf\n" + b"".join(orjson.dumps(r) + b"\n" for r in rows(20)))
    out = tmp_path / "out"
    assert cli("run", src, "-o", out, *TINY).exit_code == 0
    res = cli("status", out)
    assert "20 / 20 done" in res.output and "status:    complete" in res.output, res.output


def test_chat_template_rendering_is_time_bound(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(render, "MAX_TEMPLATE_SECONDS", 0.5)
    old = tiny.tokenizer.chat_template
    tiny.tokenizer.chat_template = ("{% for m in messages %}{% if m.content == 'slow' %}{% for i in range(100000) %}"
                                    "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
                                    "{{ m.content }}{% endfor %}")
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [{"id": "slow", "prompt": "slow"}, {"id": "fast", "prompt": "fast"}])
        spec = JobSpec(input=src, output=tmp_path / "out", model="random:tiny",
                       sampling=SamplingParams(max_tokens=2)).validate()
        started = time.monotonic()
        run_job(spec, lm=tiny)
        assert time.monotonic() - started < 30
    finally:
        tiny.tokenizer.chat_template = old
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")] == ["fast"]
    assert read_jsonl(tmp_path / "out" / "errors.jsonl")[0]["error"]["code"] == "template_timeout"


def test_line_length_is_bounded(tmp_path):
    src = tmp_path / "in.jsonl"
    with open(src, "wb") as f:
        f.write(b'{"id": "huge", "prompt": "' + b"word " * (12 << 20) + b'"}\n')  # 60 MB on one line
        f.write(b'{"id": "ok", "prompt": "fine"}\n')
    started = time.monotonic()
    assert source.count_rows(src) == 2
    got = list(source.read_rows(src))
    assert time.monotonic() - started < 20
    assert got[0].error.code == "line_too_long" and got[1].data["id"] == "ok" and got[1].line == 2


def test_commits_by_finished_rows_not_only_by_time(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from standin import EchoEngine

    from mlxbatch import models

    src = write_jsonl(tmp_path / "in.jsonl", rows(3000))
    spec = JobSpec(input=src, output=tmp_path / "out", model="random:tiny", raw=True, batch_size=256,
                   commit_seconds=3600).validate()
    seen = []
    run_job(spec, lm=models.load("random:tiny"), engine_factory=EchoEngine,
            progress=lambda s: seen.append(journal.read(tmp_path / "out").num_rows))
    assert max(seen) > 0  # committed before the end, although the commit interval is an hour


def test_chat_rows_for_a_model_without_a_template_say_so(tmp_path, tiny):
    old = tiny.tokenizer.chat_template
    tiny.tokenizer.chat_template = None
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [{"id": "chat", "messages": [{"role": "user", "content": "hi"}]},
                                                  {"id": "plain", "prompt": "hi"}])
        spec = JobSpec(input=src, output=tmp_path / "out", model="random:tiny",
                       sampling=SamplingParams(max_tokens=2)).validate()
        run_job(spec, lm=tiny)
    finally:
        tiny.tokenizer.chat_template = old
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")] == ["plain"]
    err = read_jsonl(tmp_path / "out" / "errors.jsonl")[0]["error"]
    assert err["code"] == "template_error" and "line 1: the model has no chat template" in err["message"], err
