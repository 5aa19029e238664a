"""`mlxbatch bench`: the table's numbers come from the runs it says it made."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_json_reports_median_of_repeats_and_peak_memory():
    out = subprocess.run([sys.executable, "-m", "mlxbatch", "bench", "parallm-325", "--model", "random:tiny",
                          "--num-prompts", "6", "--max-tokens", "4", "--peers", "mlx-lm", "--repeat", "3", "--json"],
                         capture_output=True, text=True, timeout=600, check=True)
    d = json.loads(out.stdout)
    assert d["repeat"] == 3 and d["num_prompts"] == 6
    for name in ("mlxbatch", "mlx-lm batch_generate"):
        r = d["results"][name]
        assert r["tokens"] == 6 * 4  # random models ignore EOS: exactly max_tokens each
        assert len(r["runs_tok_s"]) == 3
        assert round(r["tok_s"], 1) == sorted(r["runs_tok_s"])[1]
        assert r["peak_memory_gb"] > 0
    assert d["ratio"] == round(d["results"]["mlxbatch"]["tok_s"] / d["results"]["mlx-lm batch_generate"]["tok_s"], 2)
