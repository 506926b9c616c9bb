"""The base optimizer's diagonal preconditioner, read from its state.

Preconditioned ascents (:func:`sam_optax.preconditioned_sam`,
:func:`sam_optax.functional_sam` with ``preconditioned=True``) perturb along
:math:`P^{-1} g` with :math:`P = \\sqrt{\\hat\\nu} + \\epsilon`, the
denominator of Adam's step, where :math:`\\hat\\nu` is the second moment
``nu`` of the base optimizer's state (``optax.adam``, ``optax.adamw``,
``optax.nadam``, ``optax.lamb``, ``optax.adabelief``'s ``nu``), bias-corrected
with its ``count``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import skeleton as _skeleton
from sam_optax._core import tree as _tree
from sam_optax._core import validation as _validation


def _has_nu(x: Any) -> bool:
  return (isinstance(x, tuple) and hasattr(x, "_fields")
          and "nu" in x._fields)


def second_moment_states(base_state: Any) -> list[Any]:
  """Every state node in ``base_state`` with a ``nu`` field (NamedTuples)."""
  return [x for x in jax.tree.leaves(base_state, is_leaf=_has_nu)
          if _has_nu(x)]


def find_second_moment(name: str, base_state: Any) -> Any:
  """The one state node holding ``nu``; a clear error for none or several."""
  found = second_moment_states(base_state)
  if len(found) != 1:
    what = "no" if not found else f"{len(found)}"
    raise ValueError(
        f"{name} reads Adam's second moment `nu` from the base optimizer's "
        f"state, and found {what} state with a `nu` field (types: "
        f"{[type(x).__name__ for x in found]}). Use an Adam-family base "
        "(optax.adam, optax.adamw, ...) with exactly one second moment, or "
        "pass preconditioner=lambda base_state: P (a pytree like the "
        "params of positive diagonal entries).")
  return found[0]


def adam_denominator(moment_state: Any, params: Any, *, b2: Any,
                     eps: Any, bias_correction: bool) -> Any:
  r""":math:`P = \sqrt{\hat\nu} + \epsilon` in float32, a tree like ``params``.

  :math:`\hat\nu = \nu / (1 - \beta_2^t)` with :math:`t` the state's
  ``count`` (the number of steps that built :math:`\nu`), or
  :math:`\hat\nu = \nu` without bias correction or at :math:`t = 0` (then
  :math:`\nu = 0`: :math:`P = \epsilon`, a scalar multiple of the identity).
  """
  nu = moment_state.nu
  treedef = jax.tree.structure(params)
  nu = treedef.unflatten(treedef.flatten_up_to(nu))
  scale = jnp.ones([], jnp.float32)
  if bias_correction:
    # Not getattr: a NamedTuple without the field has tuple.count.
    count = (moment_state.count if "count" in moment_state._fields
             else None)
    if count is None:
      raise ValueError(
          "bias_correction=True needs the step count next to `nu` in the "
          "base optimizer's state; pass bias_correction=False.")
    t = jnp.asarray(count).astype(jnp.float32)
    correction = 1 - jnp.asarray(b2, jnp.float32) ** t
    scale = jnp.where(t > 0, 1 / jnp.where(t > 0, correction, 1), 1.0)

  def denominator(v, w):
    if not _tree.is_float(w):
      return jnp.ones(jnp.shape(w), jnp.float32)
    dtype = _tree.compute_dtype(jnp.result_type(w))
    v = jnp.asarray(v).astype(dtype)
    return jnp.sqrt(v * scale.astype(dtype)) + jnp.asarray(eps).astype(dtype)

  return jax.tree.map(denominator, nu, params)


def preconditioned_ascent(
    name: str, grads: Any, params: Any, base_state: Any, *,
    preconditioner: Callable[[Any], Any] | None, b2: Any, eps: Any,
    bias_correction: bool) -> Any:
  r"""The ascent gradient :math:`P^{-1} g` (float32 leaves).

  ``P`` comes from ``preconditioner(base_state)`` when given, else from
  :func:`adam_denominator` of the base state's ``nu``.
  """
  if preconditioner is not None:
    p = preconditioner(base_state)
    treedef = jax.tree.structure(params)
    try:
      p = treedef.unflatten(treedef.flatten_up_to(p))
    except ValueError as e:
      raise ValueError(
          f"{name}: preconditioner(base_state) must return a pytree like "
          f"the params: {e}") from e
  else:
    p = adam_denominator(find_second_moment(name, base_state), params,
                         b2=b2, eps=eps, bias_correction=bias_correction)

  def divide(g, d, w):
    if not (_tree.is_float(g) and _tree.is_float(w)):
      return g
    dtype = _tree.compute_dtype(jnp.result_type(w))
    d = jnp.asarray(d).astype(dtype)
    # P = 0 (nu = 0 with eps rounded to 0, e.g. injected in float16): no
    # ascent along that coordinate rather than inf/NaN.
    return jnp.where(d > 0, jnp.asarray(g).astype(dtype) / jnp.where(
        d > 0, d, 1), 0)

  return jax.tree.map(divide, grads, p, params)


def check_args(name: str, options: dict[str, Any], preconditioner: Any,
               b2: Any, precond_eps: Any, bias_correction: Any) -> None:
  """Validates the arguments shared by the preconditioned methods."""
  if options.get("adaptive"):
    raise ValueError(
        f"{name}: adaptive=True (ASAM) does not combine with the "
        "preconditioned ascent; the preconditioner already rescales g.")
  if preconditioner is not None and not callable(preconditioner):
    raise TypeError(
        f"{name}: preconditioner must be a callable base_state -> pytree "
        f"of positive diagonal entries, got {type(preconditioner).__name__}.")
  _validation.check_fraction("b2", b2)
  _validation.check_non_negative("precond_eps", precond_eps)
  _validation.check_bools(bias_correction=bias_correction)


def rule(name: str, preconditioner: Any, b2: Any, precond_eps: Any,
         bias_correction: bool) -> _skeleton.Rule:
  """SAM's rule with the ascent gradient :math:`P^{-1} g`."""

  def preconditioned(step, method_state):
    ascent = preconditioned_ascent(
        name, step.grads, step.params, step.base_state,
        preconditioner=preconditioner, b2=b2, eps=precond_eps,
        bias_correction=bias_correction)
    g_sam, info = step.sam_gradient(ascent)
    return g_sam, method_state, info

  return preconditioned


def check_second_moment(name: str, moment_state: Any, params: Any, *,
                        bias_correction: bool) -> None:
  """``nu`` must be shaped like the params (novograd's per-layer scalars,
  for one, are not Adam's diagonal), with a ``count`` next to it when
  ``bias_correction`` (rmsprop and sm3 keep none)."""
  treedef = jax.tree.structure(params)
  try:
    nu = treedef.flatten_up_to(moment_state.nu)
  except (ValueError, TypeError):
    nu = None
  if nu is None or [jnp.shape(v) for v in nu] != [
      jnp.shape(w) for w in treedef.flatten_up_to(params)]:
    raise ValueError(
        f"{name} reads Adam's second moment `nu` from the base optimizer's "
        f"state, but the `nu` of {type(moment_state).__name__} is not "
        "shaped like the params. Use an Adam-family base or pass "
        "preconditioner=lambda base_state: P.")
  if bias_correction and "count" not in moment_state._fields:
    raise ValueError(
        f"{name}: bias_correction=True needs the step count next to `nu` "
        f"in the base optimizer's state, and {type(moment_state).__name__} "
        "has none (e.g. optax.rmsprop); pass bias_correction=False.")


def checked_init(name: str, tx: optax.GradientTransformationExtraArgs,
                 preconditioner: Any, *, bias_correction: bool = True
                 ) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``init`` fails clearly when the base state has no usable
  ``nu`` (none, several, not param-shaped, or no ``count`` to correct
  it)."""

  def init_fn(params):
    state = tx.init(params)
    if preconditioner is None:
      moment = find_second_moment(name, state.base_state)
      check_second_moment(name, moment, params,
                          bias_correction=bias_correction)
    return state

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)
