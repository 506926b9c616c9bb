#!/usr/bin/env bash
# Builds the documentation site (Sphinx) into docs/_build/html (git-ignored).
#   python -m pip install -e '.[docs]' && bash scripts/docs.sh
# Warnings are errors (-W): a broken docstring, reference or page fails the
# build, and CI (scripts/test.sh) runs this. The notebooks are rendered with
# the outputs stored in them, not executed (scripts/run_notebooks.py
# --store regenerates them). About 30-60 s on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
python -m sphinx -W --keep-going -q -b html docs docs/_build/html "$@"
echo "Docs: docs/_build/html/index.html"
