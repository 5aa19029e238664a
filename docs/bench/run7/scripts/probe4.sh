#!/usr/bin/env bash
# issue 10: one_call A/B at 135M, interleaved, engine-only and bench
set -uo pipefail
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
python3 scripts/step_probe.py smollm2-135m --variants=per-layer,default,per-layer,default,per-layer,default 2>&1 | grep -v -i warn
for i in 1 2; do for oc in 1 0; do echo "bench one_call=$oc"; MLXBATCH_FORWARD=one_call=$oc OUT=$OUT/oc$oc-$i bash scripts/gpu_bench.sh parallm-325@smollm2-135m@--peers=mlx-lm 2>&1 | tail -3; done; done
