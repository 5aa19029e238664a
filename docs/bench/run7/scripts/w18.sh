#!/usr/bin/env bash
# issue 15: --workers 2 vs 1 as the job grows: parallm-325 x 16 (5,200 rows), then x 32 (10,400 rows) again
set -uo pipefail
if [ ! -d ~/site/ray ]; then (cd ~/gpu && cat ray_chunk_* | tar xf - && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site raywhl/*.whl) || exit 1; fi
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
mkdir -p $OUT/x16 $OUT/x32
OUT=$OUT/x16 python3 scripts/workers_bench.py --model random:llama-1b --copies 16 --warm-up --workers 1,2,1,2 2>&1 | tee $OUT/x16/workers_bench.log | grep -v "^\[mlxbatch\]\|^(" | tail -7
OUT=$OUT/x32 python3 scripts/workers_bench.py --model random:llama-1b --copies 32 --workers 1,2 2>&1 | tee $OUT/x32/workers_bench.log | grep -v "^\[mlxbatch\]\|^(" | tail -5
