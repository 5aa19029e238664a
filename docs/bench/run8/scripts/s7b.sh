#!/usr/bin/env bash
# session 7, call B: prompt chunks as matmuls (no cuDNN plan per shape): a fresh 1B process's first run; steady state 1B/8B; mixed lengths at 135M
set -uo pipefail
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
PM=max_prefill_scores=134217728
for e in "" $PM "" $PM; do
  echo "== rows_probe MLXBATCH_FORWARD=$e"; MLXBATCH_FORWARD=$e python3 scripts/rows_probe.py random:llama-1b 4 2>&1 | grep -v "^\[" | tee -a $OUT/rows1b.log
done
python3 scripts/step_probe.py smollm2-135m --workload=mixed-lengths --variants=prefill-sdpa,prefill-matmul,prefill-sdpa,prefill-matmul 2>&1 | grep -v "^\[" | tee $OUT/mixed135.log
python3 scripts/step_probe.py random:llama-1b --variants=prefill-sdpa,prefill-matmul 2>&1 | grep -v "^\[" | tee $OUT/probe1b.log
python3 scripts/step_probe.py random:llama-8b --variants=prefill-sdpa,prefill-matmul 2>&1 | grep -v "^\[" | tee $OUT/probe8b.log
