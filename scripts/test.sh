#!/usr/bin/env bash
# The project's whole test run: the README's test command, and what CI runs.
#  1. lint (ruff), 2. plain `pytest` (pyproject.toml's config): unit tests,
#  doctests, and the 8-fake-device tests, which tests/test_multidevice.py
#  runs in their own process (the device count must be set before JAX
#  starts), 3. the notebooks, executed top to bottom in small settings,
#  4. the docs site, built warning-free (scripts/docs.sh: Sphinx -W), so a
#  broken docstring, cross-reference or page fails CI.
# Any failure, including pytest's exit code 5 (no tests collected), fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0

echo "== ruff"
python -m ruff check .

echo "== unit tests, doctests and (in their own process) 8-device tests"
python -m pytest -q

echo "== notebooks (small settings)"
python scripts/run_notebooks.py

echo "== docs site (Sphinx, warnings are errors)"
bash scripts/docs.sh
