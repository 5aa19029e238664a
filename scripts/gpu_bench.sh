#!/usr/bin/env bash
# Throughput on a lent NVIDIA GPU (MLX CUDA backend). Chunks from scripts/gpu/bundle.sh
# (with the converted smollm2-135m folder as EXTRA_DIR) must already be in ~/gpu;
# see docs/performance.md, "Reproduce on a lent GPU".
# usage: bash scripts/gpu_bench.sh WORKLOAD[@MODEL[@EXTRA ARGS]] ...   (results under $OUT)
set -uo pipefail
if [ ! -d ~/site/mlx ]; then
  (cd ~/gpu && cat chunk_* | tar xf - && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site whl/*.whl) || exit 1
fi
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
mkdir -p ~/mbh/models && ln -sfn ~/gpu/extra/smollm2-135m ~/mbh/models/smollm2-135m
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.device_info().get('device_name'))"
out=${OUT:-/tmp/out}; mkdir -p "$out"
for spec in "$@"; do
  IFS=@ read -r w model extra <<< "$spec"
  model=${model:-smollm2-135m}
  echo "=== $w $model $extra"
  python3 -m mlxbatch bench "$w" --model "$model" $extra --json > "$out/$w-${model//:/_}.json" 2> "$out/$w-${model//:/_}.err" || { tail -5 "$out/$w-${model//:/_}.err"; continue; }
  python3 - "$out/$w-${model//:/_}.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{d['workload']} {d['model']} {d['dtype']} {d['device']} prompts={d['num_prompts']} max_tokens={d['max_tokens']} batch={d['batch_size']}")
print(f"  prompt tokens total/unique/computed: {d['prompt_tokens_total']}/{d['prompt_tokens_unique']}/{d['prompt_tokens_computed']}")
for k, r in d['results'].items():
    print(f"  {k:28s} {r['tokens']:>8} tok {r['seconds']:>8.2f} s {r['tok_s']:>10.1f} tok/s")
print(f"  ratio vs mlx-lm: {d['ratio']}")
PY
done
