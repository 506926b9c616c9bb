"""Compiling diagnostics that take a user's ``loss_fn``.

A diagnostic such as a Hessian eigenvalue is a loop of Hessian-vector
products of ``loss_fn``. It is compiled with ``loss_fn`` as a static
argument of a module-level ``jax.jit``, so calling it again with the same
function object (and arguments of the same shapes) reuses the compiled
program; params and directions stay arguments, never constants baked into
the program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax


def jit_with_static_loss(
    impl: Callable[..., Any], static_argnames: Sequence[str] = ()
) -> Callable[..., Any]:
  """Compiles ``impl(loss_fn, *args, **kwargs)`` with ``loss_fn`` static.

  The compiled function is created once, here, when the module defining
  ``impl`` is imported. An unhashable ``loss_fn`` (e.g. a
  ``functools.partial`` of an array) is compiled afresh at each call.
  """
  static_argnames = tuple(static_argnames)
  jitted = jax.jit(impl, static_argnums=0, static_argnames=static_argnames)

  @functools.wraps(impl)
  def call(loss_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
      hash(loss_fn)
    except TypeError:
      return jax.jit(functools.partial(impl, loss_fn),
                     static_argnames=static_argnames)(*args, **kwargs)
    return jitted(loss_fn, *args, **kwargs)

  return call
