#!/usr/bin/env bash
# Install ooc_svd with its test and cuda extras into .venv and run the test suite. The cuda
# extra brings the compiler that turns the CUDA kernels into PTX, which needs no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv || exit 1
.venv/bin/python -m pip install -q -e '.[test,cuda]' || exit 1
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$status"
