#!/usr/bin/env bash
# issue 15: a 4x longer job (parallm-325 x 32 = 10,400 rows): does --workers 2 approach the engine's 2x?
# and a fresh process's first run vs its later runs (the fixed cost each worker pays per job)
set -uo pipefail
if [ ! -d ~/site/ray ]; then (cd ~/gpu && cat ray_chunk_* | tar xf - && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site raywhl/*.whl) || exit 1; fi
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
python3 scripts/workers_bench.py --model random:llama-1b --copies 32 --warm-up --workers 1,2,1,2 2>&1 | tee $OUT/workers_bench.log | grep -v "^\[mlxbatch\]\|^(" | tail -14
echo "== fresh process, 1300 rows"; CUDA_VISIBLE_DEVICES=0 python3 scripts/rows_probe.py random:llama-1b 4 2>&1 | grep rows=
echo "== fresh process, 2600 rows"; CUDA_VISIBLE_DEVICES=1 python3 scripts/rows_probe.py random:llama-1b 8 2>&1 | grep rows=
