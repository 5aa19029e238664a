"""Start-up benchmark (issue 26): `mlxbatch run` as whole processes, now and through transformers.

"before" is the same code with MLXBATCH_TOKENIZER=transformers MLXBATCH_EAGER_MLX_LM=1: the
tokenizer through transformers (mlx-lm's TokenizerWrapper) and mlx_lm imported with its
__init__, which is what main did at f710b3f (the weights loader is ours in both).

usage: python scripts/startup_bench.py OUT_DIR [--small]
Writes OUT_DIR/startup.json and prints a table last.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

BEFORE_ENV = {"MLXBATCH_TOKENIZER": "transformers", "MLXBATCH_EAGER_MLX_LM": "1"}
TOPICS = ["harbours", "glaciers", "bridges", "volcanoes", "orchards", "railways", "deserts", "libraries"]


def rag_rows(n: int, seed: int = 26) -> list[dict]:
    """Held-out-style RAG chat rows: a system prompt, a retrieved passage and a question (deterministic)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        facts = " ".join(f"Fact {rng.randint(1, 999)}: the {topic} of region {rng.randint(1, 60)} "
                         f"changed by {rng.randint(2, 90)} percent." for _ in range(rng.randint(3, 8)))
        rows.append({"id": f"rag-{i:05d}", "messages": [
            {"role": "system", "content": "Answer from the passage only, in one sentence."},
            {"role": "user", "content": f"Passage: {facts}\n\nQuestion: what changed most for the {topic}?"}]})
    return rows


def run(src: Path, out: Path, *, model: str, max_tokens: int, env_extra: dict) -> dict:
    """One `python -m mlxbatch run` process: wall seconds and its --profile-start phases."""
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, "-m", "mlxbatch", "run", str(src), "-m", model, "-o", str(out), "--restart", "-q",
           "--max-tokens", str(max_tokens), "--profile-start"]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    phases = {}
    for line in res.stderr.splitlines():
        m = re.match(r"^(\S.*?)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)$", line)
        if m:
            phases[m.group(1)] = float(m.group(2))
    rows = sum(1 for _ in open(out / "results.jsonl"))
    return {"wall_s": round(wall, 3), "rows": rows, "phases": phases}


IMPORTS = {"mlxbatch.cli (--help, status, validate)": "import mlxbatch.cli",
           "mlxbatch run path (runner + mlx_lm llama)": "import mlxbatch.runner, mlx_lm.models.llama"}


def imports(env_extra: dict, snippets: dict = IMPORTS) -> dict:
    """Seconds to import things, each in a fresh process."""
    out = {}
    for name, code in snippets.items():
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, **env_extra})
        out[name] = round(time.perf_counter() - t, 3) if res.returncode == 0 else None
    return out


def load_times(small: bool) -> dict:
    """models.load of the embedded model, and a 1B random preset saved as safetensors and loaded back."""
    code = r'''
import json, sys, time, tempfile, shutil
from pathlib import Path
import mlx.core as mx
from mlx.utils import tree_flatten
from mlxbatch import models
from mlxbatch.models import weights
small = sys.argv[1] == "1"
out = {}
name = "random:tiny" if small else "smollm2-135m"
t = time.perf_counter(); lm = models.load(name); out[f"models.load {name}"] = round(time.perf_counter() - t, 3)
preset = "tiny" if small else "llama-1b"
lm = models.load(f"random:{preset}", dtype="bf16" if not small else "fp32")
folder = Path(tempfile.mkdtemp())
try:
    flat = dict(tree_flatten(lm.model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), flat)
    cfg = dict(models.RANDOM_PRESETS[preset]); (folder / "config.json").write_text(json.dumps(cfg))
    size = (folder / "model.safetensors").stat().st_size
    t = time.perf_counter(); weights.load_model(folder); secs = time.perf_counter() - t
    out[f"load random:{preset} from safetensors ({size / 1e9:.2f} GB, page cache)"] = round(secs, 3)
    out[f"  = GB/s"] = round(size / 1e9 / secs, 2)
finally:
    shutil.rmtree(folder, ignore_errors=True)
print(json.dumps(out))
'''
    res = subprocess.run([sys.executable, "-c", code, "1" if small else "0"], capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr[-1000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    out_dir = Path(sys.argv[1])
    small = "--small" in sys.argv
    out_dir.mkdir(parents=True, exist_ok=True)
    model = "random:tiny" if small else "smollm2-135m"
    num_rows, max_tokens, repeats = (40, 4, 2) if small else (2000, 48, 3)
    big = out_dir / "rag.jsonl"
    big.write_text("".join(json.dumps(r) + "\n" for r in rag_rows(num_rows)))
    one = out_dir / "one.jsonl"
    one.write_text(json.dumps(rag_rows(1)[0]) + "\n")
    result = {"model": model, "rows": num_rows, "max_tokens": max_tokens, "before_env": BEFORE_ENV}
    # Untimed first runs of both shapes: the CUDA backend builds (and caches) kernels per shape on first use.
    result["warm_run"] = run(one, out_dir / "o-warm", model=model, max_tokens=max_tokens, env_extra={})
    result["warm_rows"] = run(big, out_dir / "o-warm-big", model=model, max_tokens=max_tokens, env_extra={})
    result["import_transformers"] = imports({}, {"transformers": "import transformers"})["transformers"]
    for label, env in (("after", {}), ("before", BEFORE_ENV)):
        result[f"one_row_{label}"] = [run(one, out_dir / f"o-one-{label}", model=model, max_tokens=max_tokens,
                                          env_extra=env) for _ in range(repeats)]
        result[f"rows_{label}"] = run(big, out_dir / f"o-big-{label}", model=model, max_tokens=max_tokens,
                                      env_extra=env)
        result[f"imports_{label}"] = imports(env)
    result["load"] = load_times(small)
    (out_dir / "startup.json").write_text(json.dumps(result, indent=1))
    print_table(result)


def print_table(r: dict) -> None:
    print(f"\nstart-up, {r['model']}, whole `mlxbatch run` processes (before = {' '.join(f'{k}={v}' for k, v in r['before_env'].items())})")
    for label in ("before", "after"):
        walls = ", ".join(f"{x['wall_s']:.2f}" for x in r[f"one_row_{label}"])
        print(f"  1-row job {label:6s}: {walls} s wall")
    for label in ("before", "after"):
        x = r[f"rows_{label}"]
        print(f"  {r['rows']}-row job {label:6s}: {x['wall_s']:.2f} s wall, {x['rows']} records")
    names = list(dict.fromkeys(k for label in ("before", "after") for k in r[f"rows_{label}"]["phases"]))
    print(f"  {'phase of the ' + str(r['rows']) + '-row job':44s} {'before':>8s} {'after':>8s}")
    for n in names:
        b, a = (r[f"rows_{label}"]["phases"].get(n) for label in ("before", "after"))
        print(f"  {n:44s} {b if b is not None else '-':>8} {a if a is not None else '-':>8}")
    for k in r["imports_after"]:
        print(f"  import {k:37s} {r['imports_before'][k]!s:>8} {r['imports_after'][k]!s:>8}")
    print(f"  import transformers (alone): {r['import_transformers']} s")
    for k, v in r["load"].items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
