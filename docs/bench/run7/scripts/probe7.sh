#!/usr/bin/env bash
set -uo pipefail
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
for w in shared-prefix mixed-lengths; do for f in pair_sdpa=1 pair_sdpa=0; do echo "bench $w $f"; MLXBATCH_FORWARD=$f OUT=$OUT/$w-${f/=/} bash scripts/gpu_bench.sh $w@smollm2-135m@--peers=mlx-lm 2>&1 | tail -3; done; done
