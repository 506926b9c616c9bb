"""Argument checks shared by ``sam`` and its variants."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np
import optax


def check_non_negative(name: str, value: Any, *, schedule: bool = False
                       ) -> None:
  """Validates a hyperparameter if it is concrete (never a tracer).

  It must be a real, finite scalar >= 0. With ``schedule=True`` (ρ) it may
  also be an Optax schedule ``value(step_count)``: it is called at step 0
  and its value checked the same way.
  """
  if isinstance(value, jax.core.Tracer):
    return
  if callable(value):
    if not schedule:
      raise TypeError(
          f"`{name}` must be a number, not a callable (only rho takes a "
          f"schedule); got {value!r}.")
    try:
      value = value(0)
    except TypeError as e:
      raise TypeError(
          f"`{name}` is callable but not a schedule `{name}(step_count)`: "
          f"{name}(0) failed with: {e}") from e
    if isinstance(value, jax.core.Tracer):
      return
    name = f"{name}(0)"
  if isinstance(value, (numbers.Number, np.ndarray, np.generic, jax.Array)):
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number) or arr.shape != ():
      raise ValueError(f"`{name}` must be a real scalar, got {value!r}.")
    if np.iscomplexobj(arr):
      raise ValueError(f"`{name}` must be real, got {value!r}.")
    if not (np.isfinite(arr) and arr >= 0):  # Also rejects NaN.
      raise ValueError(f"`{name}` must be finite and >= 0, got {value!r}.")
    return
  raise TypeError(
      f"`{name}` must be a number, a scalar array or (for rho) a schedule; "
      f"got {type(value).__name__}.")


def check_fraction(name: str, value: Any) -> None:
  """Validates a concrete number in [0, 1] (tracers pass; no schedules)."""
  if callable(value):
    raise TypeError(f"`{name}` must be a number, not a schedule.")
  check_non_negative(name, value)
  if not isinstance(value, jax.core.Tracer) and not np.asarray(value) <= 1:
    raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")


def check_positive_int(name: str, value: Any) -> None:
  """Validates a concrete positive integer (tracers pass)."""
  if isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Integral, np.integer, np.ndarray, jax.Array)):
    raise TypeError(f"`{name}` must be a positive int, got {value!r}.")
  arr = np.asarray(value)
  if arr.shape != () or not np.issubdtype(arr.dtype, np.integer) or arr < 1:
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def check_bools(**flags: Any) -> None:
  """Static flags must be Python bools (never injected hyperparameters)."""
  for name, value in flags.items():
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(f"`{name}` must be a Python bool, got {value!r}.")


def check_base(base_tx: Any) -> optax.GradientTransformationExtraArgs:
  """Returns ``base_tx`` (or a MultiSteps' transformation) with extra args."""
  if isinstance(base_tx, optax.MultiSteps):
    base_tx = base_tx.gradient_transformation()
  if not (hasattr(base_tx, "init") and hasattr(base_tx, "update")):
    raise TypeError(
        "base_tx must be an Optax GradientTransformation (or "
        f"optax.MultiSteps), got {type(base_tx).__name__}.")
  return optax.with_extra_args_support(base_tx)


def resolve_grad_fn(name: str, grad_fn: Any, obj_fn: Any, *,
                    has_aux: bool = False,
                    value_and_grad: bool = False) -> Any:
  """``grad_fn``, or the one ``obj_fn`` implies; an error if both are given.

  ``obj_fn(params) -> loss`` (``(loss, aux)`` with ``has_aux``) is the
  objective as Levanter and ``optax.contrib.sophia`` pass it. It becomes
  ``jax.grad(obj_fn, has_aux=has_aux)``, or ``jax.value_and_grad(obj_fn,
  has_aux=has_aux)`` with ``value_and_grad`` (the perturbed loss then comes
  free with the gradient), exactly what a caller would pass as ``grad_fn``.
  """
  if obj_fn is None:
    return grad_fn
  if grad_fn is not None:
    raise ValueError(
        f"{name} got both grad_fn= and obj_fn=; pass one: obj_fn(params) -> "
        "loss is differentiated with jax.grad, grad_fn(params) -> gradient "
        "is called as given.")
  if not callable(obj_fn):
    raise TypeError(
        f"{name}: obj_fn must be a callable params -> scalar loss, got "
        f"{type(obj_fn).__name__}.")
  if value_and_grad:
    return jax.value_and_grad(obj_fn, has_aux=has_aux)
  return jax.grad(obj_fn, has_aux=has_aux)


def check_call(name: str, grad_fn: Any, params: Any) -> None:
  """A clear error for a missing ``grad_fn`` or ``params`` in ``update``."""
  if grad_fn is None:
    raise ValueError(
        f"{name} needs the gradient function: call "
        "tx.update(grads, state, params, grad_fn=lambda p: "
        "jax.grad(loss_fn)(p, batch)), or pass the objective as "
        "obj_fn=lambda p: loss_fn(p, batch).")
  if params is None:
    raise ValueError(f"{name} needs the params: tx.update(grads, state, "
                     "params, grad_fn=...).")
