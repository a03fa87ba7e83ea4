#!/usr/bin/env bash
# Install ooc_svd into .venv and run the CLI walkthrough on a generated example store:
# generate -> info -> run -> check.
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
