#!/usr/bin/env bash
# Install ooc_svd into .venv and run the CLI walkthrough on a generated example store:
# generate -> info -> run -> check, for a dense and a sparse store.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -e .
mkdir -p example_data
store=example_data/dense_400000x128.zarr
[ -d "$store" ] || .venv/bin/ooc-svd generate "$store" --shape 400000 128 --decay 0.1 --chunk 20000
.venv/bin/ooc-svd info "$store" --k 10 --memory-limit 200MB
.venv/bin/ooc-svd run "$store" --k 10 --center --memory-limit 200MB \
    --out example_data/result.zarr --overwrite --progress
.venv/bin/ooc-svd check example_data/result.zarr "$store"

# The same on a sparse CSR store (power-law columns), centered implicitly (PCA) with block
# Krylov iteration.
sparse=example_data/sparse_200000x20000.zarr
[ -d "$sparse" ] || .venv/bin/ooc-svd generate "$sparse" --shape 200000 20000 --density 0.001
.venv/bin/ooc-svd info "$sparse" --k 10 --method krylov --niter 4 --memory-limit 500MB
.venv/bin/ooc-svd run "$sparse" --k 10 --center --method krylov --niter 4 \
    --memory-limit 500MB --out example_data/sparse_result.zarr --overwrite --progress
# Its residual (about 0.92: a flat spectrum) hides another input from sampled rows; this
# small store is checked whole instead, against its exact residual.
.venv/bin/ooc-svd check example_data/sparse_result.zarr "$sparse" --samples 1000
