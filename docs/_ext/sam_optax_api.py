"""Writes the API reference from the public modules' ``__all__``.

At ``builder-inited`` (before Sphinx looks for sources) this writes, under
``docs/api/`` (git-ignored):

- one page per public name, ``api/<module>/<name>.rst``, with its
  ``autofunction`` / ``autoclass``;
- one page per module, ``api/<module>.rst``: the module docstring, then
  summary tables (``autosummary``) that link to those pages;
- ``api/index.rst``, the toctree of the module pages.

So a name added to ``__all__`` appears in the docs without editing them.
Order: optimizer factories first (functions that return an Optax gradient
transformation; ``sam`` leads), each followed by its state class
(``looksam`` -> ``LookSAMState``), then the other functions, then the other
classes. Submodules listed in ``__all__`` get their own page.

It also copies ``notebooks/*.ipynb`` to ``docs/notebooks/`` (git-ignored), so
myst-nb renders them with their stored outputs.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import shutil
import types

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

# The public modules, in page order; a submodule found in a module's __all__
# is added after them.
MODULES = ("sam_optax", "sam_optax.diagnostics", "sam_optax.flax")
LEAD = ("sam",)  # Factories shown before the others, in this order.


def _is_factory(obj: object) -> bool:
  if not inspect.isfunction(obj):
    return False
  ret = inspect.signature(obj).return_annotation
  return "GradientTransformation" in str(ret)


def _state_key(name: str) -> str:
  return name.lower().replace("_", "")


def ordered_names(module: types.ModuleType) -> list[tuple[str, list[str]]]:
  """Sections ``(title, names)`` of ``module.__all__`` in reading order."""
  names = [n for n in module.__all__
           if not inspect.ismodule(getattr(module, n))]
  classes = [n for n in names if inspect.isclass(getattr(module, n))]
  functions = [n for n in names if n not in classes]
  factories = [n for n in functions if _is_factory(getattr(module, n))]
  factories.sort(key=lambda n: (LEAD.index(n) if n in LEAD else len(LEAD), n))
  # A factory's state: the class named like it plus "State" (case and
  # underscores ignored): looksam -> LookSAMState, friendly_sam ->
  # FriendlySAMState; SAMState is sam's (the skeleton's state).
  by_key = {_state_key(c): c for c in classes}
  optimizers, used = [], set()
  for f in factories:
    optimizers.append(f)
    state = by_key.get(_state_key(f) + "state")
    if state is not None and state not in used:
      optimizers.append(state)
      used.add(state)
  sections = [
      ("Optimizers and their states", optimizers),
      ("Functions", [n for n in functions if n not in factories]),
      ("Classes", [n for n in classes if n not in used]),
  ]
  return [(title, ns) for title, ns in sections if ns]


def _title(text: str, char: str) -> str:
  return f"{text}\n{char * len(text)}\n"


def _write(path: pathlib.Path, text: str) -> None:
  # Rewrite only on change, so Sphinx's incremental builds stay incremental.
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def write_api(srcdir: pathlib.Path) -> None:
  out = srcdir / "api"
  if out.exists():
    shutil.rmtree(out)
  out.mkdir()
  modules = list(MODULES)
  for modname in modules:
    module = importlib.import_module(modname)
    for n in module.__all__:
      obj = getattr(module, n)
      if inspect.ismodule(obj) and obj.__name__ not in modules:
        modules.append(obj.__name__)
  index = [_title("API reference", "="), "",
           "Every name in the public modules' ``__all__``.", "",
           ".. toctree::", "   :maxdepth: 2", ""]
  index += [f"   {m}" for m in modules]
  _write(out / "index.rst", "\n".join(index) + "\n")

  for modname in modules:
    module = importlib.import_module(modname)
    page = [_title(f"``{modname}``", "="), "",
            f".. automodule:: {modname}", "   :no-members:", "",
            f".. currentmodule:: {modname}", ""]
    toctree = []
    for title, names in ordered_names(module):
      page += [_title(title, "-"), ".. autosummary::", "   :nosignatures:",
               ""]
      page += [f"   {n}" for n in names]
      page.append("")
      toctree += names
    page += [".. toctree::", "   :hidden:", ""]
    # Per-name pages live in a folder per module: ``sam_optax.rst`` (the
    # function) must not collide with ``sam_optax.rst`` (the module page).
    page += [f"   {modname}/{n}" for n in toctree]
    _write(out / f"{modname}.rst", "\n".join(page) + "\n")
    for n in toctree:
      obj = getattr(module, n)
      if inspect.isclass(obj):
        directive = [f".. autoclass:: {modname}.{n}", "   :members:",
                     "   :show-inheritance:"]
        if issubclass(obj, tuple) and hasattr(obj, "_fields"):
          # NamedTuple: the Attributes section documents the fields; the
          # tuple's own count/index would only add noise.
          directive = [f".. autoclass:: {modname}.{n}",
                       "   :exclude-members: count, index"]
      else:
        directive = [f".. autofunction:: {modname}.{n}"]
      text = [_title(f"``{modname}.{n}``", "="), "",
              f".. currentmodule:: {modname}", "", *directive, ""]
      (out / modname).mkdir(exist_ok=True)
      _write(out / modname / f"{n}.rst", "\n".join(text))


def copy_notebooks(srcdir: pathlib.Path) -> None:
  src = srcdir.parent / "notebooks"
  out = srcdir / "notebooks"
  if out.exists():
    shutil.rmtree(out)
  out.mkdir()
  for nb in sorted(src.glob("*.ipynb")):
    shutil.copy2(nb, out / nb.name)


# A Markdown link (not an image) to a relative path that leaves docs/:
# ``[text](../benchmarks/results/speed_cpu.md)``.
_LINK_OUT = re.compile(r"(?<!!)(\[[^\]]*\]\()\.\./([^)\s#]+)(#[^)\s]*)?\)")


def _rewrite_links(app: Sphinx, docname: str, source: list[str]) -> None:
  """Links from a guide to files outside docs/, on the site.

  The guides are written for GitHub, where ``../notebooks/x.ipynb`` and
  ``../benchmarks/...`` resolve. On the site the notebooks are pages
  (``notebooks/x``) and other files live in the repository, so those links go
  to its GitHub URL (``[project.urls] Source`` in pyproject.toml).
  """
  if "/" in docname:  # Only the guides, docs/*.md.
    return

  def repl(m: re.Match[str]) -> str:
    path, anchor = m.group(2), m.group(3) or ""
    if path.startswith("notebooks/") and path.endswith(".ipynb"):
      return f"{m.group(1)}{path}{anchor})"
    kind = "tree" if path.endswith("/") else "blob"
    return f"{m.group(1)}{app.config.sam_optax_repo_url}/{kind}/main/" \
           f"{path}{anchor})"

  source[0] = _LINK_OUT.sub(repl, source[0])


# What Python calls some types, and what a reader writes.
_TYPE_NAMES = ((re.compile(r"jax\.jaxlib\._jax\.|jaxlib\._jax\."), "jax."),
               (re.compile(r"ForwardRef\('([^']*)'\)"), r"\1"))


def _clean_types(app: Sphinx, what: str, name: str, obj: object,
                 options: object, lines: list[str]) -> None:
  """``jax.jaxlib._jax.Array`` -> ``jax.Array``, ``ForwardRef('x')`` -> x.

  Napoleon writes the attributes' types from the NamedTuples' annotations,
  which name the class where it is defined (runs after napoleon).
  """
  for i, line in enumerate(lines):
    for pattern, repl in _TYPE_NAMES:
      line = pattern.sub(repl, line)
    lines[i] = line


def _on_builder_inited(app: Sphinx) -> None:
  srcdir = pathlib.Path(app.srcdir)
  write_api(srcdir)
  copy_notebooks(srcdir)


def setup(app: Sphinx) -> dict[str, object]:
  app.add_config_value("sam_optax_repo_url", "", "env")
  app.connect("builder-inited", _on_builder_inited)
  app.connect("source-read", _rewrite_links)
  app.connect("autodoc-process-docstring", _clean_types, priority=900)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
