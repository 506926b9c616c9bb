"""The package layout: imports point downward, the public API is whole.

Layers, lowest first (docs/contributing.md):

* ``sam_optax._core``: the machinery every method stands on;
* ``sam_optax._compilation``: compile and memory helpers;
* ``sam_optax._methods``: one file per method;
* ``sam_optax.diagnostics``: Hessian spectra and loss landscapes;
* ``sam_optax.flax``: the Flax integration;
* ``sam_optax/__init__.py``: the public names.

A module may import its own layer's modules and lower layers only.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import sam_optax

PACKAGE = pathlib.Path(sam_optax.__file__).parent
# What each layer may import, besides itself.
ALLOWED = {
    "_core": set(),
    "_compilation": {"_core"},
    "_methods": {"_core"},
    "diagnostics": {"_core", "_compilation"},
    "flax": {"_core"},
}


def _layer(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == "sam_optax" else None


def _imports(path: pathlib.Path) -> list[str]:
  """The sam_optax modules ``path`` imports (``from sam_optax import x``
  counts as ``sam_optax.x``)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [a.name for a in node.names if a.name.startswith("sam_optax")]
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith("sam_optax")):
      if node.module == "sam_optax":
        found += [f"sam_optax.{a.name}" for a in node.names]
      else:
        found.append(node.module)
  return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py")
                 if p.parent != PACKAGE)


def test_every_module_is_in_a_layer():
  top_level = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert top_level == ["__init__.py"], top_level
  folders = {p.relative_to(PACKAGE).parts[0] for p in MODULES}
  assert folders == set(ALLOWED), folders


@pytest.mark.parametrize("path", MODULES,
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downward(path):
  layer = path.relative_to(PACKAGE).parts[0]
  for module in _imports(path):
    target = _layer(module)
    assert target is not None, f"{path.name} imports the top level {module}"
    assert target == layer or target in ALLOWED[layer], (
        f"{path.relative_to(PACKAGE)} ({layer}) imports {module} "
        f"({target}): imports must point downward")


def test_the_checker_sees_an_upward_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from sam_optax._methods import sam as _sam\n"
                 "from sam_optax import flax\n")
  assert [_layer(m) for m in _imports(bad)] == ["_methods", "flax"]


def test_public_api_is_importable_from_the_top():
  for name in sam_optax.__all__:
    assert getattr(sam_optax, name) is not None, name
  assert not [n for n in sam_optax.__all__ if n.startswith("_")]


def test_every_method_module_is_exported():
  """A new method file must be reachable as ``sam_optax.<name>``."""
  for path in sorted((PACKAGE / "_methods").glob("[!_]*.py")):
    assert path.stem in sam_optax.__all__, (
        f"_methods/{path.name} has no public sam_optax.{path.stem}")
