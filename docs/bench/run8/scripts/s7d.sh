#!/usr/bin/env bash
# session 7, call D: SmolLM2-shaped one-token attention, the engine's matmul form vs MLX's fused one-query kernel with the mask as a key dimension
set -uo pipefail
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
for s in 192 256 448; do python3 docs/bench/run8/scripts/attn_probe.py 325 $s 2>&1 | tee -a $OUT/attn.log; done
