#!/usr/bin/env bash
# Builds the HTML API reference from the docstrings into docs/_build/.
#   python -m pip install -e '.[docs]' && bash scripts/docs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pdoc --docformat google --math -o docs/_build sam_optax
echo "API reference: docs/_build/index.html"
