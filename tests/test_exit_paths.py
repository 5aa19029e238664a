"""Every exit path ends within seconds, with OpenBLAS loaded (it can hang in exit destructors).

Runs the real `mlxbatch` console script: signals at random moments around the
first commit (SIGINT, SIGTERM, SIGHUP), SIGINT right after start, and error
exits (a file-size limit standing in for a full disk). MLXBATCH_LONG=1 runs more.
"""

import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import LONG, write_jsonl

EXE = str(Path(sys.executable).with_name("mlxbatch"))
MAX_EXIT_SECONDS = 10.0
NUM_SIGNAL_RUNS = 100 if LONG else 30
NUM_ERROR_RUNS = 10 if LONG else 5
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _args(src, out, *extra):
    return [EXE, "run", str(src), "-o", str(out), "--model", "random:tiny", "--max-tokens", "8",
            "--batch-size", "8", "-q", *extra]


def _wait_exit(proc, since: float) -> float:
    """Seconds from `since` until the process ended; kills it (and fails) past the bound."""
    try:
        proc.wait(timeout=MAX_EXIT_SECONDS + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"pid {proc.pid} still alive {MAX_EXIT_SECONDS + 5:.0f} s after its signal/error (exit hang)")
    return time.monotonic() - since


def _first_commit(out: Path, proc, limit: float = 60.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        journal = out / "done.idx"
        if journal.exists() and journal.stat().st_size > 0:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def job(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"exit test {i} " * (1 + i % 5)}
                                              for i in range(600)])
    toml = tmp_path / "job.toml"
    toml.write_text("commit_seconds = 0.1\n")  # commits land early and often: signals hit around them
    return src, toml


@pytest.mark.slow
def test_signals_around_first_commit_never_hang(tmp_path, job):
    src, toml = job
    rng = random.Random(12)
    worst, codes = 0.0, []
    for i in range(NUM_SIGNAL_RUNS):
        out = tmp_path / f"o{i}"
        proc = subprocess.Popen(_args(src, out, "--job", str(toml)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if i % 3 == 0:  # some land before the first commit (model loading, prefill)
            time.sleep(rng.uniform(0.3, 3.0))
        else:
            _first_commit(out, proc)
            time.sleep(rng.uniform(0.0, 0.6))
        sent = time.monotonic()
        proc.send_signal(SIGNALS[i % 3])
        took = _wait_exit(proc, sent)
        worst = max(worst, took)
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        assert proc.returncode in (0, 130), (proc.returncode, err)
        codes.append(proc.returncode)
    print(f"{NUM_SIGNAL_RUNS} signalled runs: worst exit {worst:.2f} s after the signal; exit codes {sorted(set(codes))}")
    assert worst < MAX_EXIT_SECONDS
    assert codes.count(130) >= NUM_SIGNAL_RUNS // 2  # most were really interrupted, not finished first


@pytest.mark.slow
def test_sighup_stops_cleanly_and_resumes(tmp_path, job):
    src, toml = job
    out = tmp_path / "o"
    proc = subprocess.Popen(_args(src, out, "--job", str(toml)), stderr=subprocess.PIPE, text=True)
    assert _first_commit(out, proc)
    proc.send_signal(signal.SIGHUP)
    _wait_exit(proc, time.monotonic())
    err = proc.stderr.read()
    assert proc.returncode == 130 and "stopped:" in err and "rows committed" in err, err
    done = subprocess.run(_args(src, out, "--job", str(toml)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_sigint_right_after_start_prints_no_traceback(tmp_path, job):
    src, _ = job
    for i, delay in enumerate((0.05, 0.1, 0.2, 0.4, 0.8)):
        proc = subprocess.Popen(_args(src, tmp_path / f"s{i}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(delay)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _wait_exit(proc, sent)
        err = proc.stderr.read()
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert proc.returncode == 130, (proc.returncode, err)


def _file_size_limit(limit: int):
    def preexec():  # ENOSPC's stand-in: writes past `limit` fail with EFBIG instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow
def test_error_exits_never_hang(tmp_path, job):
    src, toml = job
    worst = 0.0
    for i in range(NUM_ERROR_RUNS):
        out = tmp_path / f"e{i}"
        proc = subprocess.Popen(_args(src, out, "--job", str(toml)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=_file_size_limit(4000 + 1500 * i))
        seen = {}

        def watch():  # when the error message appears
            for line in proc.stderr:
                seen.setdefault("at", time.monotonic())
                seen["text"] = seen.get("text", "") + line

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        took = _wait_exit(proc, time.monotonic())
        t.join(5)
        after_error = time.monotonic() - seen.get("at", time.monotonic() - took)
        worst = max(worst, after_error)
        assert proc.returncode == 1, seen.get("text")
        assert "mlxbatch: error:" in seen.get("text", "") and "internal error" not in seen["text"], seen
        assert after_error < MAX_EXIT_SECONDS
    print(f"{NUM_ERROR_RUNS} error exits: worst {worst:.2f} s from the message to exit")
