#!/usr/bin/env bash
# issue 10: one query as cuDNN fused attention over the query twice (pair_sdpa), 135M / 1B / 8B
set -uo pipefail
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
python3 scripts/step_probe.py smollm2-135m --variants=default,pair-sdpa,pair-sdpa-strided,default,pair-sdpa,pair-sdpa-strided 2>&1 | grep -v -i warn
python3 scripts/step_probe.py smollm2-135m --variants=default,pair-sdpa,pair-sdpa-strided --kernels 2>&1 | grep -v -i warn | grep -A22 "== kernels"
python3 scripts/step_probe.py random:llama-1b --variants=default,pair-sdpa,pair-sdpa-strided,default,pair-sdpa 2>&1 | grep -v -i warn
python3 scripts/step_probe.py random:llama-8b --variants=default,pair-sdpa 2>&1 | grep -v -i warn
