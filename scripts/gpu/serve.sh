#!/usr/bin/env bash
# `mlxbatch serve` vs `mlx_lm.server` over HTTP (scripts/serve_bench.py), on the lent GPU.
# Pure-Python wheels needed beyond the bundle (mlx, mlx-cuda-13, mlx-lm, orjson):
#   starlette uvicorn h11 anyio sniffio idna python-multipart   (typing_extensions, click: already there)
# usage: OUT=/tmp/out bash scripts/gpu/serve.sh      (SMALL=1: random:tiny, tiny counts, for a CPU check)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/out}/serve; mkdir -p "$out"
if [ -d ~/site/mlx ] || [ -d ~/gpu ]; then  # the GPU box, as scripts/gpu_bench.sh sets it up
  if [ ! -d ~/site/mlx ]; then
    (cd ~/gpu && cat chunk_* | tar xf - && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site whl/*.whl) || exit 1
  fi
  export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh
  mkdir -p ~/mbh/models && ln -sfn ~/gpu/extra/smollm2-135m ~/mbh/models/smollm2-135m
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
$PY -c "import starlette, uvicorn, python_multipart" || { echo "missing wheels: starlette uvicorn h11 anyio sniffio idna python-multipart" >&2; exit 1; }
$PY -c "import mlx.core as mx; print(mx.default_device(), mx.device_info().get('device_name', ''))"
if [ -n "${SMALL:-}" ]; then
  runs=("random:tiny --small")
else
  runs=("random:llama-1b --max-out 128 --batch-rows 20000" "smollm2-135m --max-out 128 --batch-rows 0")
fi
for r in "${runs[@]}"; do
  model=${r%% *}; args=${r#* }
  name=${model//:/_}
  echo "=== $model $args"
  timeout 900 $PY scripts/serve_bench.py --model "$model" $args --json "$out/$name.json" > "$out/$name.txt" 2> "$out/$name.err" \
    || { echo "failed: $model"; tail -5 "$out/$name.err"; }
done
for r in "${runs[@]}"; do name=${r%% *}; cat "$out/${name//:/_}.txt"; done
