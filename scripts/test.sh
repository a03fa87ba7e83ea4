#!/usr/bin/env bash
# Install ooc_svd with its test and cuda extras into .venv, lint the code and run the test
# suite. The cuda extra brings the compiler that turns the CUDA kernels into PTX, which needs
# no GPU. Arguments go to pytest; a lint error fails the run after the tests have run.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv || exit 1
.venv/bin/python -m pip install -q -e '.[test,cuda]' || exit 1
.venv/bin/ruff check ooc_svd tests benchmarks scripts
lint_status=$?
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
if [ "$status" -eq 0 ] && [ "$lint_status" -ne 0 ]; then
    echo "ruff found lint errors (above): failing the run" >&2
    exit 1
fi
exit "$status"
