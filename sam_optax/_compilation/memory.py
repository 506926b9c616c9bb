"""Compiling a training step at the lowest temporary memory XLA offers.

A SAM step runs two forward and backward passes one after the other, yet
XLA:CPU's default scheduler can keep buffers of both alive: it hoists the
values that do not depend on the parameters (max-pool's index arrays, the
zero buffers its backward scatters into, transposed inputs) to the start of
the program, so the second pass's copies live across the first pass. On
small CNNs the compiled temporary memory of a SAM step is then about 1.5x
the base step's. XLA:CPU's memory-optimised scheduler orders the same
program to use less memory; which scheduler wins depends on the model, so
:func:`compile_low_memory` compiles both and keeps the smaller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

#: Compiler options of each candidate schedule, by name. ``default`` is
#: XLA's own choice; the others are tried on the platforms listed in
#: :data:`SCHEDULE_PLATFORMS`.
SCHEDULES: Mapping[str, Mapping[str, str]] = {
    "default": {},
    "memory_optimized": {
        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
}
SCHEDULE_PLATFORMS: Mapping[str, tuple[str, ...]] = {
    "memory_optimized": ("cpu",),
}


class CompileReport(NamedTuple):
  """What :func:`compile_low_memory` compiled and which program it kept.

  Attributes:
    chosen: the name of the kept schedule (a key of :data:`SCHEDULES`).
    temp_bytes: ``{schedule: bytes}``, the compiled temporary memory
      (``memory_analysis().temp_size_in_bytes``) of every compiled
      candidate; ``-1`` where the backend reports none.
    skipped: ``{schedule: reason}`` for the candidates not compiled: a
      platform the option does not apply to, or an option this XLA does not
      know.
    compiled: ``{schedule: jax.stages.Compiled}``, every compiled candidate,
      for callers that want to compare them (e.g. time both).
  """

  chosen: str
  temp_bytes: dict[str, int]
  skipped: dict[str, str]
  compiled: dict[str, Any]

  @property
  def saved_bytes(self) -> int:
    """Temporary bytes saved against the default schedule (0 if none)."""
    default = self.temp_bytes.get("default", -1)
    chosen = self.temp_bytes.get(self.chosen, -1)
    return max(0, default - chosen) if min(default, chosen) >= 0 else 0


def _platform(lowered: Any) -> str:
  """The platform a lowered computation is for (``cpu``, ``gpu``, ...)."""
  try:
    return lowered._lowering.compile_args["backend"].platform
  except (AttributeError, KeyError, TypeError):
    return jax.default_backend()


def _temp_bytes(compiled: Any) -> int:
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # Backend without analysis.
    return -1
  temp = getattr(stats, "temp_size_in_bytes", None)
  return -1 if temp is None else int(temp)


def compile_low_memory(
    fn: Callable[..., Any] | jax.stages.Lowered, *args: Any, **kwargs: Any,
) -> tuple[jax.stages.Compiled, CompileReport]:
  r"""Compiles ``fn`` with each scheduler and keeps the least temp memory.

  Lowers ``fn`` once for ``args`` and ``kwargs`` (as ``jax.jit(fn).lower``
  does), compiles it with XLA's default scheduler and, on CPU, with XLA:CPU's
  memory-optimised scheduler
  (``xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``), and
  returns the compiled program with the smaller temporary memory
  (``memory_analysis().temp_size_in_bytes``; the default on a tie). A
  schedule only orders the same operations differently, so both programs
  compute bit-identical results. Where the option does not apply (GPU, TPU)
  or this XLA does not know it, only the default is compiled.

  Measured on CPU (``benchmarks/speed.py``, see ``docs/benchmarks.md``): for
  CNNs and transformer blocks the memory-optimised schedule brings a SAM
  step's temporary memory below the *base* step's default one at equal step
  time; for MLPs it can need more, and the default is kept.

  Args:
    fn: the step: a function (it is wrapped in ``jax.jit``), a jitted
      function (its ``static_argnums``, ``donate_argnums`` and shardings
      apply) or an already lowered ``jax.stages.Lowered`` (then pass no
      ``args``).
    *args: example arguments, as for ``jax.jit(fn).lower``: arrays or
      ``jax.ShapeDtypeStruct``\ s.
    **kwargs: keyword arguments, as for ``jax.jit(fn).lower``.

  Returns:
    ``(compiled, report)``: the kept ``jax.stages.Compiled``, called like
    the jitted ``fn`` with arguments of the same shapes, dtypes and
    shardings (static arguments are baked in: leave them out, as for any
    ``jax.stages.Compiled``), and a :class:`CompileReport`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w, x):
    ...   return jnp.mean(jnp.tanh(x @ w) ** 2)
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05)
    >>> def step(w, state, x):
    ...   g = jax.grad(loss)(w, x)
    ...   updates, state = tx.update(
    ...       g, state, w, grad_fn=lambda p: jax.grad(loss)(p, x))
    ...   return optax.apply_updates(w, updates), state
    >>> w, x = jnp.ones((4, 2)), jnp.ones((8, 4))
    >>> state = tx.init(w)
    >>> compiled, report = sam_optax.compile_low_memory(step, w, state, x)
    >>> report.chosen in report.temp_bytes
    True
    >>> w, state = compiled(w, state, x)

  .. note::
    Compiling twice doubles the compile time of the step (once per program
    run, usually seconds). The saving is in XLA's temporary buffers; the
    parameters, optimizer state and batch are arguments and not affected.
  """
  if isinstance(fn, jax.stages.Lowered):
    if args or kwargs:
      raise ValueError("compile_low_memory: pass no arguments with an "
                       "already lowered computation.")
    lowered = fn
  else:
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    lowered = jitted.lower(*args, **kwargs)
  platform = _platform(lowered)

  compiled, temp, skipped = {}, {}, {}
  for name, options in SCHEDULES.items():
    platforms = SCHEDULE_PLATFORMS.get(name)
    if platforms is not None and platform not in platforms:
      skipped[name] = f"not for platform {platform!r}"
      continue
    try:
      compiled[name] = (lowered.compile(compiler_options=dict(options))
                        if options else lowered.compile())
    except jax.errors.JaxRuntimeError as e:  # Option unknown to this XLA.
      if name == "default":
        raise
      skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
      continue
    temp[name] = _temp_bytes(compiled[name])

  chosen = "default"
  if temp["default"] >= 0:
    for name, t in temp.items():
      if 0 <= t < temp[chosen]:
        chosen = name
  report = CompileReport(chosen=chosen, temp_bytes=temp, skipped=skipped,
                         compiled=compiled)
  return compiled[chosen], report
