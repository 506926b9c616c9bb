"""Ascent directions: the perturbation ε of SAM and ASAM.

All norm arithmetic is done in float32 (float64 when a perturbed leaf is
float64), whatever the dtype of the params and gradients, and a zero gradient
gives ε = 0 rather than NaN whatever the value of ``eps``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax._core import masks as _masks
from sam_optax._core import tree as _tree


class Perturbation(NamedTuple):
  r"""The result of :func:`ascent_direction`.

  Attributes:
    epsilon: the perturbation ε, a pytree like the params in the compute
      dtype (float32, or float64 for float64 leaves); zero on masked-out
      leaves.
    ascent_norm: :math:`\|T g\|_2` over the perturbed leaves, the norm the
      ascent divides by (:math:`\|g\|_2` for SAM).
    radius: :math:`\rho\,\|Tg\|_2 / (\|Tg\|_2 + \mathrm{eps})`, the radius of
      ε in the ascent's own metric: :math:`\|\epsilon\|_2` for SAM,
      :math:`\|T^{-1}\epsilon\|_2` for ASAM; ρ unless g = 0.
    grad_norm: :math:`\|g\|_2` over the perturbed leaves with
      ``exact_norms=True``, else ``None`` (free for SAM, one more reduction
      for ASAM).
    norm: :math:`\|\epsilon\|_2` with ``exact_norms=True``, else ``None``.

  The norms are scalars in float32, or float64 when a perturbed leaf is
  float64.
  """

  epsilon: Any
  ascent_norm: jax.Array  # shape=(), dtype=float32 (float64 for f64 leaves)
  radius: jax.Array  # shape=(), dtype like ascent_norm
  grad_norm: jax.Array | None  # shape=(), dtype like ascent_norm
  norm: jax.Array | None  # shape=(), dtype like ascent_norm


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
    exact_norms: bool = False,
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
  perturbed. A zero gradient gives ε = 0 exactly; a gradient that holds inf
  or NaN gives ε = NaN (and a NaN norm), so that the fault shows and a
  guard such as ``sam(optax.apply_if_finite(base, ...))`` skips the step.
  A finite gradient whose squares overflow the float32 sum (a bfloat16
  gradient of 1e20) still gets its finite norm (rescaled, as BLAS ``nrm2``)
  and ε of radius ρ. Complex leaves are rejected (``ValueError``).

  Args:
    grads: the gradient at ``params`` (a pytree like ``params``).
    params: the current parameters (only read for ASAM).
    rho: the radius ρ ≥ 0 (a scalar, possibly traced).
    adaptive: ``True`` for ASAM.
    eta: ASAM's η ≥ 0 (ignored for SAM).
    eps: added to the norm in the denominator.
    mask: which leaves are perturbed (see :mod:`sam_optax._core.masks`).
    adaptive_mask: with ``adaptive=True``, which leaves use ``T = |w| + η``.
    exact_norms: also return :math:`\|g\|_2` and :math:`\|\epsilon\|_2`
      (free for SAM; for ASAM two more reductions over the params).

  Returns:
    A :class:`Perturbation`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sam_optax
    >>> g = {'w': jnp.array([3.0, 4.0])}
    >>> p = sam_optax.ascent_direction(g, g, rho=0.5)
    >>> p.epsilon['w'], float(p.ascent_norm), float(p.radius)
    (Array([0.3, 0.4], dtype=float32), 5.0, 0.5)
  """
  _reject_complex(grads, params)
  treedef = jax.tree.structure(grads)
  params = treedef.unflatten(treedef.flatten_up_to(params))

  def masked_grad(g, w, perturbed):  # In the compute dtype, 0 if masked.
    dtype = _tree.compute_dtype(jnp.result_type(w))
    if perturbed is False or not (_tree.is_float(g) and _tree.is_float(w)):
      return jnp.zeros(jnp.shape(w), dtype)
    g = jnp.asarray(g).astype(dtype)
    return g if perturbed is True else jnp.where(perturbed, g, 0)

  g = jax.tree.map(masked_grad, grads, params,
                   _masks.mask_tree(mask, params, "mask"))
  if adaptive:
    def scale(w, g, rescaled):  # T = |w| + η, or 1 where not rescaled.
      t = jnp.abs(w).astype(g.dtype) + jnp.asarray(eta).astype(g.dtype)
      return t if rescaled is True else jnp.where(rescaled, t, 1)

    t = jax.tree.map(scale, params, g,
                     _masks.mask_tree(adaptive_mask, params, "adaptive_mask"))
    tg = jax.tree.map(jnp.multiply, t, g)
    direction = jax.tree.map(jnp.multiply, t, tg)  # T²g
  else:
    tg = direction = g

  ascent_norm = _tree.norm(tg)
  dtype = ascent_norm.dtype
  # ρ / (‖Tg‖ + eps), and exactly 0 for a zero gradient (eps may have been
  # rounded to 0 by inject_hyperparams in low precision: never divide by 0).
  factor = _tree.safe_div(
      jnp.asarray(rho).astype(dtype),
      ascent_norm + jnp.asarray(eps).astype(dtype))
  factor = jnp.where(ascent_norm > 0, factor, 0)
  # An infinite or NaN norm (an inf or NaN in the gradient; finite ones
  # whose squares overflow are rescaled by _tree.norm) would give ε = 0: SAM
  # silently off. Make it a NaN instead, which
  # sam(optax.apply_if_finite(base)) skips and counts.
  factor = jnp.where(jnp.isfinite(ascent_norm), factor, jnp.nan)
  epsilon = jax.tree.map(lambda d: factor.astype(d.dtype) * d, direction)
  radius = factor * ascent_norm
  grad_norm = norm = None
  if exact_norms:
    grad_norm = _tree.norm(g) if adaptive else ascent_norm
    norm = factor * _tree.norm(direction) if adaptive else radius
  return Perturbation(epsilon, ascent_norm, radius, grad_norm, norm)


def _reject_complex(grads: Any, params: Any) -> None:
  """A clear error for complex leaves (whose ε SAM does not define)."""
  for what, tree in (("params", params), ("gradient", grads)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if jnp.iscomplexobj(leaf):
        raise ValueError(
            f"Complex {what} are not supported (leaf "
            f"{_masks.path_str(path) or 'the root'!r}): split complex params "
            "into real and imaginary parts (two real leaves), whose ε is "
            "then SAM's.")


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
    if not _tree.is_float(w):
      return w
    w = jnp.asarray(w)
    out = w.astype(e.dtype) + e
    return out.astype(w.dtype) if keep_dtype else out

  return jax.tree.map(add, params, epsilon)
