#!/usr/bin/env bash
# One command from nothing: a virtual environment with mlxbatch, OpenBLAS on
# Linux (the fast CPU path), the embedded model, and the demo job with its dashboard.
#   bash setup.sh            (set MLXBATCH_SKIP_DEMO=1 to only install)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "mlxbatch needs Python >= 3.11" >&2; exit 1; }
[ -d .venv ] || "$PY" -m venv .venv
extras=test
if [ "$(uname -s)" = Linux ]; then
  extras=cpu,test  # Apple silicon gets Metal from plain `mlx`; Linux CPU needs mlx[cpu]
  blas=/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0
  if [ ! -e "$blas" ] && command -v apt-get >/dev/null; then
    sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo -n"
    $sudo_ apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
      || echo "note: could not install libopenblas0-pthread; the CPU path will be ~30x slower" >&2
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
.venv/bin/mlxbatch models pull smollm2-135m
if [ -z "${MLXBATCH_SKIP_DEMO:-}" ]; then
  .venv/bin/mlxbatch run --job jobs/demo.toml
  echo "results: out/demo/results.jsonl   (activate with: source .venv/bin/activate)"
fi
