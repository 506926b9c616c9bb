"""Sets up 8 fake CPU devices for the tests in this folder.

These tests run in their own pytest process (``pytest tests/multidevice``),
because the number of CPU devices can only be set before JAX initialises its
backends; ``scripts/test.sh`` does that, and the main run ignores this folder.
"""

import jax

NUM_DEVICES = 8

_error = None
try:
  jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
except RuntimeError as e:  # Backends already initialised.
  _error = e
if jax.device_count() != NUM_DEVICES:
  raise RuntimeError(
      f"tests/multidevice needs {NUM_DEVICES} CPU devices, got "
      f"{jax.device_count()} ({_error or 'jax_num_cpu_devices ignored'}). "
      "Run this folder in its own process: "
      "`python -m pytest tests/multidevice`.")
