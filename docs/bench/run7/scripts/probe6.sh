#!/usr/bin/env bash
# issue 10: pair_sdpa (default for small models on CUDA) vs pair_sdpa=0; step and bench, 135M
set -uo pipefail
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
python3 scripts/step_probe.py smollm2-135m --variants=default,no-pair,default,no-pair 2>&1 | grep -v -i warn
for i in 1 2; do for f in pair_sdpa=1 pair_sdpa=0; do echo "bench $f"; MLXBATCH_FORWARD=$f OUT=$OUT/p$i-$f bash scripts/gpu_bench.sh parallm-325@smollm2-135m@--peers=mlx-lm 2>&1 | tail -3; done; done
