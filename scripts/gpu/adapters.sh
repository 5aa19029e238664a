#!/usr/bin/env bash
# Issue 23 benchmark: 4 LoRA adapters (rank 16, every linear layer) x 256 parallm prompts mixed in one
# mlxbatch job, vs mlxbatch once per adapter, the base model for the same rows, and mlx-lm once per adapter.
# Wheels needed beyond the bundle: none. Full run ~4 minutes on an H200; SMALL=1 shrinks it (CPU check).
# usage: OUT=/tmp/out bash scripts/gpu/adapters.sh          (raw JSON under $OUT/adapters/)
set -uo pipefail
if [ -z "${SMALL:-}" ]; then
  if [ ! -d ~/site/mlx ]; then
    (cd ~/gpu && cat chunk_* | tar xf - && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site whl/*.whl) || exit 1
  fi
  export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh
  PY=python3
  runs=("random:llama-1b@mlx-lm@" "random:llama-1b@none@adapter_mode=gather" "random:llama-8b@mlx-lm@")
  args=()
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  PY=${PY:-/work/main/.venv/bin/python}
  runs=("random:tiny@mlx-lm@" "random:tiny@none@adapter_mode=gather")
  args=(--num-prompts 8 --max-tokens 8)
fi
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}/adapters; mkdir -p "$out"
$PY -c "import mlx.core as mx; print(mx.default_device(), mx.device_info().get('device_name', ''))"
for spec in "${runs[@]}"; do
  IFS=@ read -r model peers forward <<< "$spec"
  name="${model//:/_}${forward:+-${forward//=/_}}"
  echo "=== adapters $model peers=$peers ${forward:-default forward}"
  MLXBATCH_FORWARD="$forward" $PY -m mlxbatch bench adapters --model "$model" --peers "$peers" --repeat 1 \
    "${args[@]}" --json > "$out/$name.json" 2> "$out/$name.err" || { tail -5 "$out/$name.err"; continue; }
done
echo
echo "=== summary (time in seconds; mixed/base is the mixed job's time over the base model's for the same rows)"
$PY - "$out" <<'PY'
import json, pathlib, sys
print(f"{'run':44s} {'mixed':>7s} {'base':>7s} {'per-ad':>7s} {'mlx-lm':>7s} {'mixed/base':>10s} {'vs mlx-lm':>9s}")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text()); r = d["results"]
    sec = lambda k: f"{r[k]['seconds']:7.2f}" if k in r else f"{'-':>7s}"
    print(f"{f.stem:44s} {sec('mlxbatch mixed (one job)')} {sec('mlxbatch base model, same rows')} "
          f"{sec('mlxbatch once per adapter')} {sec('mlx-lm once per adapter')} {d['mixed_vs_base_time']:>10} "
          f"{str(d['mixed_vs_mlx_lm_speedup'] or '-'):>9s}")
PY
