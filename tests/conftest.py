"""Keeps tests/multidevice out of the main pytest process.

Those tests need 8 fake CPU devices, which can only be set before JAX starts,
so they run in a process of their own: ``tests/test_multidevice.py`` starts
it, and ``python -m pytest tests/multidevice`` runs them directly.
"""

import pathlib

MULTIDEVICE = pathlib.Path(__file__).parent / "multidevice"


def _asked_for_multidevice(config):
  for arg in config.args:
    path = pathlib.Path(arg.split("::")[0]).resolve()
    if path == MULTIDEVICE or MULTIDEVICE in path.parents:
      return True
  return False


def pytest_ignore_collect(collection_path, config):
  if pathlib.Path(collection_path) == MULTIDEVICE:
    return not _asked_for_multidevice(config)
  return None
