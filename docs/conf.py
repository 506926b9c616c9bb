"""Sphinx configuration: ``bash scripts/docs.sh`` builds the site.

The API pages are written from the public modules' ``__all__`` and the
notebooks copied in at build time (``docs/_ext/sam_optax_api.py``); the
guides are every ``docs/*.md`` (a glob toctree in ``index.md``). Notebooks are
rendered with the outputs stored in them, never executed here
(``python scripts/run_notebooks.py --store`` regenerates them).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document this checkout, not whatever sam_optax is installed.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sam_optax  # noqa: E402

# [project.urls] Source in pyproject.toml: the repository URL, defined once
# (a regex, not tomllib, which Python 3.10 lacks).
REPO_URL = re.search(r'^Source\s*=\s*"([^"]+)"',
                     (ROOT / "pyproject.toml").read_text(), re.M).group(1)
sam_optax_repo_url = REPO_URL  # Links from the guides out of docs/.

project = "sam_optax"
author = "sam_optax developers"
copyright = "sam_optax developers"  # noqa: A001
release = version = sam_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "sam_optax_api",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb",
                 ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints",
                    "_ext"]

# --- autodoc: Google-style docstrings, type hints in the descriptions, short
# names (no ``ForwardRef('optax.OptState')`` or ``jax.jaxlib._jax.Array``
# in the signatures), members in source order.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
python_use_unqualified_type_names = True
autodoc_member_order = "bysource"
autodoc_default_options = {"undoc-members": False}
# Annotations written as aliases stay aliases (not their expansion,
# ``float | Array | Callable[[Array | ndarray | ...``).
autodoc_type_aliases = {
    "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
    "optax.OptState": "optax.OptState",
    "optax.Params": "optax.Params",
    "optax.Updates": "optax.Updates",
    "chex.Numeric": "chex.Numeric",
}
autosummary_generate = False  # The pages come from sam_optax_api.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # Attributes as fields: no duplicate entries.
napoleon_custom_sections = [("References", "notes_style"),
                            ("Example", "examples_style")]
add_module_names = False

# --- MyST / myst-nb: the guides and the notebooks.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence",
                          "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # Render stored outputs; never execute here.
nb_merge_streams = True

# --- HTML: the theme optax/flax/chex use.
html_theme = "sphinx_book_theme"
html_title = "sam_optax"
html_theme_options = {
    "repository_url": REPO_URL,
    "use_repository_button": True,
    "use_issues_button": True,
    "path_to_docs": "docs",
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
