#!/usr/bin/env bash
# Start-up benchmark (issue 26) on the GPU box (torch installed there): whole `mlxbatch run`
# processes with the embedded model, now and through transformers (see scripts/startup_bench.py).
# Wheels beyond the bundle: none (tokenizers, jinja2 and huggingface_hub come with the box's transformers).
# usage: OUT=/tmp/out bash scripts/gpu/startup.sh      (SMALL=1: random:tiny and tiny counts, for a CPU try)
# Writes $OUT/startup/startup.json and prints a table last. Full run: ~3 minutes.
set -uo pipefail
out=${OUT:-/tmp/out}/startup; mkdir -p "$out"
if [ -z "${SMALL:-}" ]; then
  if [ ! -d ~/site/mlx ]; then
    (cd ~/gpu && cat chunk_* | tar xf - && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site whl/*.whl) || exit 1
  fi
  export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh
  mkdir -p ~/mbh/models && ln -sfn ~/gpu/extra/smollm2-135m ~/mbh/models/smollm2-135m
  PY=${PY:-python3}
  $PY -c "import mlx.core as mx; print(mx.default_device(), mx.device_info().get('device_name'))"
  $PY -c "import torch; print('torch', torch.__version__)" 2>/dev/null || echo "torch: not installed"
  $PY scripts/startup_bench.py "$out"
else
  export PYTHONPATH=$PWD
  ${PY:-python3} scripts/startup_bench.py "$out" --small
fi
