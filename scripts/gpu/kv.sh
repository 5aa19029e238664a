#!/usr/bin/env bash
# Compressed KV on a lent NVIDIA GPU (issue 24): rows in flight, tok/s and peak memory at one KV
# budget for --kv-bits 16/8/4 (plus mlx-lm batch_generate at the rows that budget holds in bf16),
# the attention read form per phase (scripts/kv_attention_probe.py), and kv-quality.
# Extra wheels beyond the bundle (mlx, mlx-cuda-13, mlx-lm, orjson): none.
# Setup as scripts/gpu_bench.sh (chunks in ~/gpu, smollm2-135m in ~/gpu/extra); gemma3-270m runs
# when a converted folder is there too (~/gpu/extra/gemma3-270m*).
# usage: OUT=/tmp/out bash scripts/gpu/kv.sh            (full GPU set, ~4 min)
#        OUT=/tmp/kv-out SMALL=1 bash scripts/gpu/kv.sh  (random:tiny, tiny counts: a CPU check)
#        FULL=1 adds shared-prefix at random:llama-8b.
set -uo pipefail
out=${OUT:-/tmp/out}/kv; mkdir -p "$out"
py=${PYTHON:-python3}
if [ -d ~/gpu ] && [ "${SMALL:-0}" != 1 ]; then
  if [ ! -d ~/site/mlx ]; then
    (cd ~/gpu && cat chunk_* | tar xf - && $py -m pip install -q --no-index --no-deps --no-compile --target ~/site whl/*.whl) || exit 1
  fi
  export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh
  mkdir -p ~/mbh/models && ln -sfn ~/gpu/extra/smollm2-135m ~/mbh/models/smollm2-135m
  for g in ~/gpu/extra/gemma3-270m*; do [ -d "$g" ] && ln -sfn "$g" ~/mbh/models/"$(basename "$g")"; done
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
$py -c "import mlx.core as mx; print(mx.default_device(), mx.device_info().get('device_name'))" | tee "$out/device.txt"

if [ "${SMALL:-0}" = 1 ]; then
  runs=("long-outputs random:tiny --num-prompts 16 --max-tokens 16 --kv-rows 4"
        "shared-prefix random:tiny --num-prompts 8 --max-tokens 8 --kv-rows 4")
  quality=("random:tiny --num-prompts 2 --max-tokens 16")
  probes=("--rows 4 --cols 64 --chunk 8 --repeat 2")
else
  runs=("long-outputs random:llama-1b --num-prompts 192 --max-tokens 256 --kv-rows 64"
        "shared-prefix random:llama-1b --num-prompts 256 --kv-rows 64"
        "long-outputs random:llama-8b --num-prompts 128 --max-tokens 256 --kv-rows 64")
  [ "${FULL:-0}" = 1 ] && runs+=("shared-prefix random:llama-8b --num-prompts 128 --kv-rows 64")
  quality=("smollm2-135m")
  for g in "${MLXBATCH_HOME:-~/mbh}"/models/gemma3-270m*; do [ -d "$g" ] && quality+=("$(basename "$g")") && break; done
  probes=("--rows 64 --cols 512 --heads 9,3 --dim 64" "--rows 64 --cols 2048 --heads 32,8 --dim 128")
fi

i=0
for p in "${probes[@]}"; do
  i=$((i + 1))
  echo "=== probe $p"
  $py scripts/kv_attention_probe.py $p --json > "$out/probe-$i.json" 2> "$out/probe-$i.err" || tail -5 "$out/probe-$i.err"
done
for r in "${runs[@]}"; do
  read -r w model extra <<< "$r"
  name="$w-${model//:/_}"
  echo "=== $w $model $extra --kv-bits 16,8,4"
  $py -m mlxbatch bench "$w" --model "$model" $extra --kv-bits 16,8,4 --peers mlx-lm --repeat 1 --json \
    > "$out/$name.json" 2> "$out/$name.err" || tail -5 "$out/$name.err"
done
for q in "${quality[@]}"; do
  read -r model extra <<< "$q"
  echo "=== kv-quality $model $extra"
  $py -m mlxbatch bench kv-quality --model "$model" $extra --json > "$out/kv-quality-${model//:/_}.json" \
    2> "$out/kv-quality-${model//:/_}.err" || tail -5 "$out/kv-quality-${model//:/_}.err"
done

$py - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def load(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
print("\n--- attention read form, ms per layer call (decode | prefill chunk)")
for p in sorted(glob.glob(os.path.join(out, "probe-*.json"))):
    d = load(p)
    if d:
        print(f"{d['backend']} {d['rows']}x{d['cols']} heads {d['heads']} dim {d['dim']}")
        for form in d["decode"]:
            print(f"  {form:28s} {d['decode'][form]:>9.3f} | {d['prefill'][form]:>9.3f}")
print("\n--- one KV budget, --kv-bits 16/8/4 (rows = most in flight)")
for p in sorted(glob.glob(os.path.join(out, "*.json"))):
    d = load(p)
    if not d or "max_kv_gb" not in d:
        continue
    print(f"{d['workload']} {d['model']} ({d['dtype']}), {d['num_prompts']} prompts x {d['max_tokens']}, KV budget {d['max_kv_gb']} GB")
    first = next(iter(d["results"].values()))["tok_s"]
    for k, r in d["results"].items():
        print(f"  {k:24s} rows {r['rows_in_flight_peak']:>5} {r['tok_s']:>10.1f} tok/s  peak {r['peak_memory_gb']:>7.2f} GB"
              f"  KV peak {r.get('kv_peak_gb', float('nan')):>7.3f} GB  {r['tok_s'] / first:>5.2f}x")
print("\n--- kv-quality (256 tokens a window unless SMALL)")
for p in sorted(glob.glob(os.path.join(out, "kv-quality-*.json"))):
    d = load(p)
    if not d:
        continue
    print(f"{d['model']} ({d['dtype']}), {d['rows']} windows x {d['steps']}")
    for r in d["results"]:
        print(f"  {r['kv_format']:38s} {r['kv_ratio']:>5.2f}x less  loss {r['loss']:.4f} ({r['loss_delta']:+.4f})"
              f"  top-1 {100 * r['top1_agreement']:5.1f}%  greedy {100 * r['greedy_agreement']:5.1f}%")
PY
