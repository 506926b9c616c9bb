"""The benchmark problems: one module per problem, one registry.

>>> from benchmarks import problems
>>> problems.names()[:1]
['digits-mlp']

Each module defines ``PROBLEM``, a :class:`Problem`: its data (fixed train /
validation / test splits), its Flax NNX model, its per-example loss and
metric, its base optimizer with schedule, batch and epochs, and a quick
variant. :mod:`benchmarks.problems.train` is the one training loop.

Importable from a fresh clone: run from the repository root
(``python -m ...``), or put the root on ``sys.path`` as
``examples/quickstart.py`` and the tests do.
"""

from __future__ import annotations

import importlib

from ._base import Data, Functional, Problem, noisy_labels

_MODULES = {
    "digits-mlp": "digits_mlp",
    "images-cnn": "images_cnn",
    "text-lm": "text_lm",
}

__all__ = ["Data", "Functional", "Problem", "get", "names", "noisy_labels"]


def names() -> list[str]:
  """The registered problems, quick case first."""
  return list(_MODULES)


def get(name: str) -> Problem:
  """The problem called ``name`` (its module is imported on first use)."""
  if name not in _MODULES:
    raise ValueError(f"unknown problem {name!r}; known: {names()}")
  return importlib.import_module(f".{_MODULES[name]}", __name__).PROBLEM
