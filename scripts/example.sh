#!/usr/bin/env bash
# Install ooc_svd into .venv and run it on a generated example store.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -e .
.venv/bin/python scripts/example.py "$@"
