#!/usr/bin/env bash
# Issue 29 on a lent NVIDIA GPU: parallm-325 and shared-prefix against mlx-lm's batch_generate on
# the random presets at real shapes (bf16), one process per run, raw JSON under $OUT/arch.
# Setup as scripts/gpu_bench.sh (chunks from scripts/gpu/bundle.sh in ~/gpu).
# usage: OUT=/tmp/out bash scripts/gpu/arch.sh PART     PART: a | b | c | d (each under ~10 minutes)
#        SMALL=1 OUT=/tmp/a bash scripts/gpu/arch.sh a   (a CPU check: cut presets, tiny counts)
set -uo pipefail
out=${OUT:-/tmp/out}/arch; mkdir -p "$out"
if [ -d ~/gpu ] && [ "${SMALL:-0}" != 1 ]; then
  if [ ! -d ~/site/mlx ]; then
    (cd ~/gpu && cat chunk_* | tar xf - && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site whl/*.whl) || exit 1
  fi
  export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
py=${PYTHON:-python3}
$py -c "import mlx.core as mx; print(mx.default_device(), mx.device_info().get('device_name'))"
rep=${REPEAT:-2}
case "${1:-a}" in
  a) runs=("parallm-325 random:qwen3-4b" "parallm-325 random:gemma3-1b" "parallm-325 random:mistral-7b"
           "shared-prefix random:qwen3-4b" "shared-prefix random:gemma3-1b") ;;
  b) runs=("parallm-325 random:qwen3-30b-a3b" "parallm-325 random:gpt-oss-20b" "shared-prefix random:mistral-7b") ;;
  c) runs=("parallm-325 random:llama-8b" "parallm-325 random:llama-1b" "shared-prefix random:llama-1b"
           "shared-prefix random:qwen3-30b-a3b" "shared-prefix random:gpt-oss-20b") ;;
  d) runs=("shared-prefix random:gemma3-1b" "parallm-325 random:gemma3-1b")
     $py scripts/moe_probe.py --rows 64,325 --json > "$out/moe_probe.txt" 2>&1; cat "$out/moe_probe.txt" | head -4 ;;
esac
extra=()
if [ "${SMALL:-0}" = 1 ]; then
  extra=(--num-prompts 6 --max-tokens 4 --repeat 1)
  runs=("${runs[@]/random:qwen3-4b/random:qwen3-4b:1}"); runs=("${runs[@]/random:gemma3-1b/random:gemma3-1b:6}")
  runs=("${runs[@]/random:mistral-7b/random:mistral-7b:1}"); runs=("${runs[@]/random:qwen3-30b-a3b/random:qwen3-30b-a3b:1}")
  runs=("${runs[@]/random:gpt-oss-20b/random:gpt-oss-20b:2}"); runs=("${runs[@]/random:llama-8b/random:llama-8b:1}")
fi
for r in "${runs[@]}"; do
  read -r w m <<< "$r"
  name="$w-${m//:/_}"
  echo "=== $w $m"
  timeout ${RUN_TIMEOUT:-420} $py -m mlxbatch bench "$w" --model "$m" --peers mlx-lm --repeat "$rep" "${extra[@]}" --json \
    > "$out/$name.json" 2> "$out/$name.err" || { tail -3 "$out/$name.err"; continue; }
  $py - "$out/$name.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{d['workload']} {d['model']} prompts={d['num_prompts']} max_tokens={d['max_tokens']}")
for k, r in d['results'].items():
    print(f"  {k:24s} {r['tok_s']:>10.1f} tok/s  peak {r.get('peak_gb', r.get('peak_memory_gb', '?'))} GB")
print(f"  ratio vs mlx-lm: {d['ratio']}")
PY
done
