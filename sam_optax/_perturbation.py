"""Ascent directions: the perturbation ε of SAM and ASAM.

All norm arithmetic is done in float32 (or float64 for float64 leaves),
whatever the dtype of the params and gradients, and a zero gradient gives
ε = 0 rather than NaN whatever the value of ``eps``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax import _masks


class Perturbation(NamedTuple):
  """The result of :func:`ascent_direction`.

  Attributes:
    epsilon: the perturbation ε, a pytree like the params in the compute
      dtype (float32, or float64 for float64 leaves); zero on masked-out
      leaves.
    grad_norm: ‖g‖₂ over the perturbed leaves, a float32 scalar.
    norm: ‖ε‖₂, a float32 scalar (ρ for SAM unless g = 0).
  """

  epsilon: Any
  grad_norm: jax.Array  # shape=(), dtype=jnp.float32
  norm: jax.Array  # shape=(), dtype=jnp.float32


def compute_dtype(dtype: Any) -> jnp.dtype:
  """float32 for low-precision floats, the dtype itself for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def ascent_direction(
    grads: Any,
    params: Any,
    rho: Any,
    *,
    adaptive: bool = False,
    eta: Any = 0.01,
    eps: Any = 1e-12,
    mask: Any = None,
    adaptive_mask: Any = None,
) -> Perturbation:
  r"""Computes the SAM (or ASAM) perturbation ε from a gradient.

  SAM uses the normalised gradient, ASAM rescales it elementwise by
  :math:`T = |w| + \eta`:

  .. math::

    \epsilon_{\rm SAM} = \rho\,\frac{g}{\|g\|_2 + \mathrm{eps}}, \qquad
    \epsilon_{\rm ASAM} = \rho\,\frac{T^2 g}{\|T g\|_2 + \mathrm{eps}}.

  The norm is global, over every leaf that ``mask`` selects; masked-out leaves
  get ε = 0 and do not enter the norm. With ``adaptive=True``, leaves that
  ``adaptive_mask`` leaves out use ``T = 1``. Non-float leaves are never
  perturbed. A zero gradient gives ε = 0 exactly.

  Args:
    grads: the gradient at ``params`` (a pytree like ``params``).
    params: the current parameters (only read for ASAM).
    rho: the radius ρ ≥ 0 (a scalar, possibly traced).
    adaptive: ``True`` for ASAM.
    eta: ASAM's η ≥ 0 (ignored for SAM).
    eps: added to the norm in the denominator.
    mask: which leaves are perturbed (see :mod:`sam_optax._masks`).
    adaptive_mask: with ``adaptive=True``, which leaves use ``T = |w| + η``.

  Returns:
    A :class:`Perturbation` with ε in float32, ‖g‖ over the masked leaves
    and ‖ε‖.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sam_optax
    >>> g = {'w': jnp.array([3.0, 4.0])}
    >>> sam_optax.ascent_direction(g, g, rho=0.5).epsilon['w']
    Array([0.3, 0.4], dtype=float32)
  """
  grad_leaves, treedef = jax.tree.flatten(grads)
  param_leaves = treedef.flatten_up_to(params)
  masks = _masks.resolve_mask(mask, params, "mask")
  if adaptive:
    adaptive_masks = _masks.resolve_mask(adaptive_mask, params, "adaptive_mask")
  else:
    adaptive_masks = [False] * len(grad_leaves)

  # Per leaf: g in the compute dtype (zero where masked out) and the scale T.
  masked_grads, scales = [], []
  for g, w, m, a in zip(grad_leaves, param_leaves, masks, adaptive_masks):
    if not (_is_float(g) and _is_float(w)) or m is False:
      masked_grads.append(None)
      scales.append(None)
      continue
    g = g.astype(compute_dtype(g.dtype))
    if m is not True:
      g = jnp.where(m, g, jnp.zeros_like(g))
    masked_grads.append(g)
    if a is False:
      scales.append(None)
    else:
      t = jnp.abs(w).astype(g.dtype) + jnp.asarray(eta, jnp.float32).astype(
          g.dtype)
      scales.append(t if a is True else jnp.where(a, t, jnp.ones_like(t)))

  def sq_norm(leaves):
    return sum((jnp.sum(jnp.square(x)).astype(jnp.float32)
                for x in leaves if x is not None), jnp.zeros([], jnp.float32))

  grad_norm = jnp.sqrt(sq_norm(masked_grads))
  if adaptive:
    scaled = [None if g is None else (g if t is None else t * g)
              for g, t in zip(masked_grads, scales)]
    ascent_norm = jnp.sqrt(sq_norm(scaled))
  else:
    scaled, ascent_norm = masked_grads, grad_norm

  # ρ / (‖Tg‖ + eps), and exactly 0 for a zero gradient (eps may have been
  # rounded to 0 by inject_hyperparams in low precision: never divide by 0).
  rho32 = jnp.asarray(rho).astype(jnp.float32)
  eps32 = jnp.asarray(eps).astype(jnp.float32)
  positive = ascent_norm > 0
  factor = jnp.where(
      positive, rho32 / jnp.where(positive, ascent_norm + eps32, 1.0), 0.0)

  epsilon, directions = [], []
  for g, w, tg, t in zip(grad_leaves, param_leaves, scaled, scales):
    if tg is None:
      epsilon.append(jnp.zeros(jnp.shape(w), compute_dtype(jnp.result_type(w))))
      directions.append(None)
    else:
      direction = tg if t is None else t * tg
      epsilon.append(factor.astype(direction.dtype) * direction)
      directions.append(direction)
  # ‖ε‖ = factor·‖direction‖; for SAM the direction is g, whose norm we have
  # (no second pass over the gradient).
  direction_norm = jnp.sqrt(sq_norm(directions)) if adaptive else grad_norm
  return Perturbation(jax.tree.unflatten(treedef, epsilon), grad_norm,
                      factor * direction_norm)


def perturb(params: Any, epsilon: Any, *, keep_dtype: bool = True) -> Any:
  """Returns ``params + epsilon``, added in the compute dtype.

  Args:
    params: the parameters.
    epsilon: the perturbation from :func:`ascent_direction`.
    keep_dtype: if ``True`` (default) each result leaf is rounded back to the
      param's dtype; if ``False`` low-precision leaves stay in float32, so the
      perturbation survives in full (see ``perturb_in_float32`` of
      :func:`sam_optax.sam`).
  """

  def add(w, e):
    if not _is_float(w):
      return w
    w = jnp.asarray(w)
    out = w.astype(e.dtype) + e
    return out.astype(w.dtype) if keep_dtype else out

  return jax.tree.map(add, params, epsilon)
