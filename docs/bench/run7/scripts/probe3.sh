#!/usr/bin/env bash
# issue 10: one compiled call a decode step vs two a layer (per-layer), ms/step at 135M, 1B, 8B
set -uo pipefail
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
git log --oneline -1 2>/dev/null; git diff --stat 2>/dev/null | tail -1
for m in smollm2-135m random:llama-1b; do
  python3 scripts/step_probe.py $m --variants=default,per-layer,default,per-layer 2>&1 | grep -v -i warn
done
python3 scripts/step_probe.py smollm2-135m --variants=default,per-layer --phases --kernels 2>&1 | grep -v -i warn | head -60
python3 scripts/step_probe.py random:llama-8b --variants=default,per-layer 2>&1 | grep -v -i warn
