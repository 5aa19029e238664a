#!/usr/bin/env bash
# session 7, call C: where a fresh process's first run goes (CUDA API calls); prompt chunks as matmuls by score-size threshold on mixed lengths (first run and later runs)
set -uo pipefail
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
python3 scripts/rows_probe.py random:llama-1b 1 > /dev/null 2>&1  # the PTX disk cache, as on a machine that ran MLX before
echo "== rows_probe 1B --api"; python3 scripts/rows_probe.py random:llama-1b 4 --api 2>&1 | grep -v "^\[" | tee $OUT/api1b.log
for t in 0 16777216 67108864 0 16777216 67108864; do
  echo "== mixed-lengths 135M max_prefill_scores=$t"; MLXBATCH_FORWARD=max_prefill_scores=$t python3 scripts/rows_probe.py smollm2-135m 1 --workload=mixed-lengths 2>&1 | grep -v "^\[" | tee -a $OUT/mixed135.log
done
for t in 0 67108864; do
  echo "== parallm 1B max_prefill_scores=$t"; MLXBATCH_FORWARD=max_prefill_scores=$t python3 scripts/rows_probe.py random:llama-1b 4 2>&1 | grep -v "^\[" | tee -a $OUT/rows1b.log
done
