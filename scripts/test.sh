#!/usr/bin/env bash
# The project's whole test run: the README's test command, and what CI runs.
#  1. lint (ruff), 2. unit tests + doctests, 3. the 8-fake-device tests in
#  their own process (the device count must be set before JAX starts),
#  4. the notebooks, executed top to bottom in small settings.
# Any failure, including pytest's exit code 5 (no tests collected), fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0

echo "== ruff"
python -m ruff check .

echo "== unit tests and doctests"
python -m pytest -q --doctest-modules sam_optax tests \
  --ignore=tests/multidevice

echo "== multi-device tests (8 fake CPU devices, own process)"
python -m pytest -q tests/multidevice

echo "== notebooks (small settings)"
python scripts/run_notebooks.py
