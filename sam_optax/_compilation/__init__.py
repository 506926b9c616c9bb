"""Compile and memory helpers.

* ``memory``: :func:`sam_optax.compile_low_memory`, the XLA schedule with
  the lower temp memory;
* ``static_loss``: jit with the user's loss function as a static argument
  (the diagnostics' compiled loops).
"""
