#!/usr/bin/env bash
# Models larger than a memory cap on a lent NVIDIA GPU (issue 32): `mlxbatch bench offload` runs
# random:llama-8b (bf16, 16 GB) under --max-memory-gb 6 and random:qwen2.5-14b (bf16, ~25 GB) under 8,
# each against the same model resident: tok/s, peak MLX memory, GB streamed per step, the read
# bandwidth (plain reads of the shards; mx.load of layers), the bound they imply and the ratio,
# and whether greedy outputs equal the resident run. The presets are written once as safetensors
# folders into $MLXBATCH_HOME/models (16 + 25 GB of the 64 GB disk; the first run of each target
# spends ~1-2 min writing). Extra wheels beyond the bundle: none.
# usage: OUT=/tmp/out bash scripts/gpu/offload.sh          (both targets; ONLY=8b or ONLY=14b for one)
#        OUT=/tmp/off SMALL=1 bash scripts/gpu/offload.sh  (a CPU check: random:smollm2-135m:8 under 0.18 GB)
set -uo pipefail
out=${OUT:-/tmp/out}/offload; mkdir -p "$out"
py=${PYTHON:-python3}
if [ -d ~/gpu ] && [ "${SMALL:-0}" != 1 ]; then
  if [ ! -d ~/site/mlx ]; then
    (cd ~/gpu && cat chunk_* | tar xf - && $py -m pip install -q --no-index --no-deps --no-compile --target ~/site whl/*.whl) || exit 1
  fi
  export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
$py -c "import mlx.core as mx; print(mx.default_device(), mx.device_info())" | tee "$out/device.txt"

if [ "${SMALL:-0}" = 1 ]; then
  runs=("small random:smollm2-135m:8 0.18 --num-prompts 8 --max-tokens 8 --dtype fp32")
else
  runs=()
  [ "${ONLY:-8b}" != 14b ] && runs+=("8b random:llama-8b 6 --num-prompts 256 --max-tokens 64 --dtype bf16")
  [ "${ONLY:-14b}" != 8b ] && runs+=("14b random:qwen2.5-14b 8 --num-prompts 256 --max-tokens 64 --dtype bf16")
fi
for r in "${runs[@]}"; do
  read -r name model cap extra <<< "$r"
  echo "=== bench offload $model --max-memory-gb $cap $extra"
  $py -m mlxbatch bench offload --model "$model" --max-memory-gb "$cap" $extra --json \
    > "$out/$name.json" 2> "$out/$name.err" || tail -8 "$out/$name.err"
done

$py - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'target':34s} {'run':9s} {'tok/s':>9s} {'peak GB':>8s} {'GB/step':>8s} {'file GB/s':>9s} {'load GB/s':>9s} "
      f"{'bound (file/load)':>20s} {'ratio (file/load)':>18s} {'equal':>6s}")
for f in sorted(out.glob("*.json")):
    try:
        s = json.loads(f.read_text())
    except ValueError:
        print(f"{f.name}: no result (see {f.with_suffix('.err').name})"); continue
    for run, r in s["results"].items():
        st = run == "streamed"
        bound = f"{r.get('bound_tok_s_file_read') or 0:,.0f} / {r.get('bound_tok_s_layer_load') or 0:,.0f}" if st else "-"
        ratio = f"{r.get('ratio_file_read') or 0:.2f} / {r.get('ratio_layer_load') or 0:.2f}" if st else "-"
        print(f"{s['model'] + ' @ ' + str(s['cap_gb']) + ' GB':34s} {run:9s} {r['tok_s']:>9,.1f} {r['peak_memory_gb']:>8.2f} "
              f"{r.get('streamed_gb_per_step', 0):>8.2f} {s['file_read_gb_s']:>9.2f} {s['layer_load_gb_s']:>9.2f} "
              f"{bound:>20s} {ratio:>18s} {str(s['outputs_equal']) if st else '':>6s}")
    print("   plan:", s["plan"])
PY
