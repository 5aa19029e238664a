#!/usr/bin/env bash
# issue 15: is a 1B engine slower when another runs on the other GPU of the host? pinned to the GPU's NUMA CPUs?
set -uo pipefail
if [ ! -d ~/site/ray ]; then (cd ~/gpu && cat ray_chunk_* | tar xf - && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site raywhl/*.whl) || exit 1; fi
bash scripts/gpu_bench.sh > /tmp/setup.log 2>&1; tail -1 /tmp/setup.log
export PYTHONPATH=~/site:$PWD MLXBATCH_HOME=~/mbh PYTHONUNBUFFERED=1
nvidia-smi topo -m; lscpu | grep -i -E "numa|socket|per core|model name|^cpu\(s\)"
declare -A CPUS
for g in 0 1; do
  bus=$(nvidia-smi -i $g --query-gpu=pci.bus_id --format=csv,noheader | tr 'A-Z' 'a-z' | sed 's/^0000//')
  f=$(ls -d /sys/bus/pci/devices/*${bus#0000} 2>/dev/null | head -1)
  CPUS[$g]=$(cat $f/local_cpulist 2>/dev/null || echo "0-$(($(nproc)-1))"); echo "GPU $g bus $bus cpus ${CPUS[$g]}"
done
P="python3 scripts/rows_probe.py random:llama-1b"
t=$(($(date +%s)+45)); echo "== solo GPU0 1300 rows"; CUDA_VISIBLE_DEVICES=0 $P 4 $t 2>&1 | grep -v -i warn
t=$(($(date +%s)+45)); echo "== solo GPU0 2600 rows"; CUDA_VISIBLE_DEVICES=0 $P 8 $t 2>&1 | grep -v -i warn
t=$(($(date +%s)+60)); echo "== side by side 1300 rows each"
CUDA_VISIBLE_DEVICES=0 $P 4 $t > /tmp/a.log 2>&1 & CUDA_VISIBLE_DEVICES=1 $P 4 $t > /tmp/b.log 2>&1; wait; grep rows= /tmp/a.log /tmp/b.log
t=$(($(date +%s)+60)); echo "== side by side, each pinned to its GPU's CPUs"
CUDA_VISIBLE_DEVICES=0 taskset -c ${CPUS[0]} $P 4 $t > /tmp/a.log 2>&1 & CUDA_VISIBLE_DEVICES=1 taskset -c ${CPUS[1]} $P 4 $t > /tmp/b.log 2>&1; wait; grep rows= /tmp/a.log /tmp/b.log
