#!/usr/bin/env bash
# session 7, call A: issue 10 dense-mask A/B (135M kernels, 1B, 8B); issue 15 first-run cost of a fresh 1B process
set -uo pipefail
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
python3 scripts/step_probe.py smollm2-135m --variants=default,dense-mask,default,dense-mask --phases --kernels --sequence=40 2>&1 | grep -v "^\[" | tee $OUT/probe135.log | grep -v "^    "
python3 scripts/step_probe.py random:llama-1b --variants=default,dense-mask,default,dense-mask 2>&1 | grep -v "^\[" | tee $OUT/probe1b.log
python3 scripts/step_probe.py random:llama-8b --variants=default,dense-mask 2>&1 | grep -v "^\[" | tee $OUT/probe8b.log
for e in X=1 X=2 MLX_CUDA_GRAPH_CACHE_SIZE=1000 CUDA_MODULE_LOADING=EAGER; do
  echo "== rows_probe $e"; env $e python3 scripts/rows_probe.py random:llama-1b 4 2>&1 | grep -v "^\[" | tee -a $OUT/rows1b.log
done
