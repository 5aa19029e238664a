#!/usr/bin/env bash
# Build an offline bundle of MLX's CUDA backend for a Linux GPU box with
# Python 3.12 and no package index: mlx, mlx-cuda-13 (~90 MB), mlx-lm, orjson,
# split into chunks of at most 45 MB so each fits a size-capped transfer.
# On the GPU box: cat chunk_* | tar xf - && pip install --no-index --no-deps --target SITE whl/*.whl
#
# usage (from the repository root):  bash scripts/gpu/bundle.sh [EXTRA_DIR...]
#   EXTRA_DIR: folders to ship too (e.g. a converted model dir), copied under extra/
set -euo pipefail
root=$(git rev-parse --show-toplevel)
out="$root/.gpu"
exclude=$(git rev-parse --path-format=absolute --git-path info/exclude)  # works in a worktree too
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
rm -rf "$out" && mkdir -p "$out/stage/whl"
MLX_VERSION=${MLX_VERSION:-$(python3 -c 'import importlib.metadata as m; print(m.version("mlx"))' 2>/dev/null || echo 0.32.4)}
plat=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$out/stage/whl" "$@"; }
dl "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION"
# pure-python packages the GPU image lacks (it already has numpy, transformers, tokenizers, rich, typer, pyarrow, jinja2)
MLX_LM_VERSION=${MLX_LM_VERSION:-$(python3 -c 'import importlib.metadata as m; print(m.version("mlx-lm"))' 2>/dev/null || echo 0.32.2)}
python3 -m pip download -q --no-deps -d "$out/stage/whl" "mlx-lm==$MLX_LM_VERSION"
dl orjson
for d in "$@"; do mkdir -p "$out/stage/extra" && cp -r "$d" "$out/stage/extra/"; done
ls "$out/stage/whl"
tar cf - -C "$out/stage" . | split -b 45m - "$out/chunk_"
rm -rf "$out/stage"
ls -la "$out"
echo "chunks in $out: move each to the GPU box, then: cat chunk_* | tar xf - && python3 -m pip install --no-index --no-deps --target SITE whl/*.whl"
