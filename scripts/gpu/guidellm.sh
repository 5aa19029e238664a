#!/usr/bin/env bash
# GuideLLM against `mlxbatch serve` and `mlx_lm.server` on the lent GPU (scripts/guidellm_bench.py).
# Wheels beyond the MLX bundle travel in .gpu/xtra.tar: glw/ (guidellm 0.3.1 and the needs the GPU
# image lacks; installed apart, in ~/glsite, because it pins click) and srv/ (starlette, uvicorn,
# python-multipart). Setup as scripts/gpu_bench.sh (chunks in ~/gpu).
# usage: OUT=/tmp/out bash scripts/gpu/guidellm.sh [MODEL] [LEVELS] [REQUESTS]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/out}/guidellm; mkdir -p "$out"
if [ ! -d ~/site/mlx ]; then
  (cd ~/gpu && cat chunk_* | tar xf - && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site whl/*.whl) || exit 1
fi
if [ ! -d ~/glsite/guidellm ]; then
  mkdir -p ~/xtra && tar xf ~/gpu/xtra.tar -C ~/xtra || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site ~/xtra/srv/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target ~/glsite ~/xtra/glw/*.whl || exit 1
fi
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
python3 scripts/guidellm_bench.py --model "${1:-random:llama-1b}" --concurrency "${2:-1,8,64,256}" \
  --requests "${3:-0}" --guidellm-python "env PYTHONPATH=$HOME/glsite:$HOME/site python3" --out "$out" \
  2> "$out/stderr.txt" | tee "$out/table.txt" || tail -30 "$out/stderr.txt"
