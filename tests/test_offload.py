"""Models larger than the memory cap: layers streamed from safetensors give the resident run's outputs.

A 346 MB float32 model (tests/offload_model.py) under a cap of half that: greedy outputs equal the
resident run token for token (shared prefixes, rows joining mid-decode), MLX's peak memory stays
under the cap plus PEAK_SLACK, kill -9 and resume stay exactly once; bad plans are usage errors.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, read_jsonl, write_jsonl
from offload_model import write_model

from mlxbatch.engine.offload import ModelSizes, OffloadPlan
from mlxbatch.errors import UsageError

CAP_GB = 0.175  # half the model
PEAK_SLACK = 0.10  # of the cap: MLX's allocator rounding and the sampling temporaries past the estimate
EXE = str(Path(sys.executable).with_name("mlxbatch"))
SYSTEM = "You are a careful assistant who answers questions about the sea in one short sentence. " * 2


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("offload") / "model")


def _rows(n=14):
    rows = [{"id": f"s{i}", "messages": [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": f"Question {i}: why is the sea salty?"}]}
            for i in range(n // 2)]
    return rows + [{"id": f"p{i}", "prompt": f"Fact {i} about whales: " + "deep " * (i % 6)} for i in range(n - n // 2)]


def _run(src, out, model, *extra):
    res = cli("run", src, "-o", out, "--model", model, "--max-tokens", "12", "--batch-size", "4", "-q", *extra)
    assert res.exit_code == 0, res.output
    return {r["id"]: r["output"] for r in read_jsonl(out / "results.jsonl")}


def _sizes(layers=8, layer=100, fixed=200):
    return ModelSizes(fixed, (layer,) * layers, kv_bytes_per_token=1, act_bytes_per_token=1, logits_bytes_per_row=1)


def test_the_plan_streams_only_what_does_not_fit_and_spreads_resident_layers():
    fits = OffloadPlan.make(_sizes(), cap_bytes=2000, row_tokens=10, max_batch=4, max_prefill_tokens=64)
    assert not fits.streamed and fits.kv_bytes >= 40
    plan = OffloadPlan.make(_sizes(), cap_bytes=800, row_tokens=10, max_batch=4, max_prefill_tokens=64)
    resident = [i for i in range(8) if i not in plan.streamed]
    assert plan.streamed and len(resident) >= 2 and resident != list(range(len(resident)))  # spread, not the first ones
    assert plan.resident_bytes + plan.buffer_bytes + plan.kv_bytes + plan.workspace_bytes <= 800
    assert plan.with_bandwidth(1000.0).expected_step_s == pytest.approx(plan.streamed_bytes / 1000)


def test_a_cap_below_one_layer_and_one_row_is_a_usage_error():
    with pytest.raises(UsageError, match="too small for this model: it needs at least"):
        OffloadPlan.make(_sizes(), cap_bytes=300, row_tokens=10, max_batch=4, max_prefill_tokens=64)


def test_too_small_a_cap_and_a_folder_without_safetensors_stop_before_the_weights_load(tmp_path, big_model, monkeypatch):
    from mlxbatch import models

    monkeypatch.setattr(models.weights_io, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    src = write_jsonl(tmp_path / "in.jsonl", _rows(2))
    res = cli("run", src, "-o", tmp_path / "o", "--model", big_model, "--max-memory-gb", "0.05", "-q")
    assert res.exit_code == 2 and "--max-memory-gb 0.05 is too small for this model" in res.output, res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((big_model / "config.json").read_text())
    res = cli("run", src, "-o", tmp_path / "o2", "--model", empty, "--max-memory-gb", "1", "-q")
    assert res.exit_code == 2 and "no safetensors that can be memory-mapped" in res.output, res.output


def test_streamed_outputs_equal_the_resident_run_under_the_cap(tmp_path, big_model):
    import mlx.core as mx

    src = write_jsonl(tmp_path / "in.jsonl", _rows())
    resident = _run(src, tmp_path / "resident", big_model)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()  # what earlier tests in this process still hold (session fixtures)
    streamed = _run(src, tmp_path / "streamed", big_model, "--max-memory-gb", str(CAP_GB))
    peak = (mx.get_peak_memory() - base) / 1e9
    assert streamed == resident and len(set(resident.values())) > 1
    assert peak <= CAP_GB * (1 + PEAK_SLACK), f"peak {peak:.3f} GB over the cap {CAP_GB} GB"
    print(f"streamed == resident for {len(resident)} rows; peak {peak:.3f} GB under a {CAP_GB} GB cap")


@pytest.mark.slow
def test_a_streamed_job_killed_and_resumed_writes_every_row_once(tmp_path, big_model):
    src = write_jsonl(tmp_path / "in.jsonl", _rows(40))
    ref = _run(src, tmp_path / "ref", big_model)
    out = tmp_path / "out"
    args = [EXE, "run", str(src), "-o", str(out), "--model", str(big_model), "--max-tokens", "12", "--batch-size",
            "4", "-q", "--max-memory-gb", str(CAP_GB)]
    toml = tmp_path / "job.toml"
    toml.write_text("commit_seconds = 0.1\n")
    kills = 0
    for _ in range(2):
        p = subprocess.Popen([*args, "--job", str(toml)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, journal = time.monotonic() + 120, out / "done.idx"
        while p.poll() is None and time.monotonic() < deadline and not (journal.exists() and journal.stat().st_size):
            time.sleep(0.05)
        time.sleep(1.0 + kills)  # mid-job: some rows committed, others decoding
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        ids = [r["id"] for r in read_jsonl(out / "results.jsonl")]
        assert len(ids) == len(set(ids)), "a row written twice after kill -9"
    assert kills >= 1
    assert _run(src, out, big_model, "--max-memory-gb", str(CAP_GB)) == ref
