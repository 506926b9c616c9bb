r"""Sharpness diagnostics: the top Hessian eigenvalue and loss landscapes.

Two standard ways to see what SAM does to the minimum it finds: the largest
eigenvalue of the Hessian of the training loss (smaller = flatter; Foret et
al. 2021 report it), and 1-D/2-D slices of the loss along random,
filter-normalised directions (Li et al. 2018). Everything here takes a
``loss_fn(params) -> scalar`` (close over the batch or the whole training
set) and works on any pytree of params. The functions compile their work
(keyed on the ``loss_fn`` object, so reuse one function to reuse the
compilation) and can also be called inside ``jax.jit``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LossFn = Callable[[Any], jax.Array]


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _dot(a: Any, b: Any) -> jax.Array:
  """⟨a, b⟩ over the float leaves, accumulated in float32 (or float64)."""
  total = jnp.zeros([], jnp.float32)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if _is_float(x):
      dtype = jnp.promote_types(x.dtype, jnp.float32)
      total = total + jnp.sum(x.astype(dtype) * y.astype(dtype))
  return total


def _scale(tree: Any, scalar: jax.Array) -> Any:
  return jax.tree.map(
      lambda x: (x * scalar).astype(x.dtype) if _is_float(x) else x, tree)


def _safe_inverse(x: jax.Array) -> jax.Array:
  positive = x > 0
  return jnp.where(positive, 1.0 / jnp.where(positive, x, 1.0), 0.0)


def _random_like(key: jax.Array, params: Any) -> Any:
  """Standard normals shaped like the float leaves (zeros elsewhere).

  One draw for the whole tree, cut into leaves: a single random-bits
  computation to compile, however many leaves there are.
  """
  leaves, treedef = jax.tree.flatten(params)
  sizes = [int(np.prod(jnp.shape(w))) if _is_float(w) else 0
           for w in leaves]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
  out, start = [], 0
  for w, size in zip(leaves, sizes):
    if _is_float(w):
      piece = flat[start:start + size].reshape(jnp.shape(w))
      out.append(piece.astype(jnp.result_type(w)))
    else:
      out.append(jnp.zeros_like(w))
    start += size
  return jax.tree.unflatten(treedef, out)


def hessian_vector_product(loss_fn: LossFn, params: Any, vector: Any) -> Any:
  r"""Computes :math:`H v`, the Hessian of ``loss_fn`` at ``params`` times v.

  Forward-over-reverse (``jax.jvp`` of ``jax.grad``): the cost of about two
  gradients, and no Hessian is ever formed.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: where the Hessian is taken.
    vector: a pytree like ``params``.

  Returns:
    :math:`H v`, a pytree like ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import diagnostics
    >>> loss = lambda w: 0.5 * w @ jnp.diag(jnp.array([1.0, 3.0])) @ w
    >>> diagnostics.hessian_vector_product(loss, jnp.ones(2), jnp.ones(2))
    Array([1., 3.], dtype=float32)
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


class HessianEigenpair(NamedTuple):
  """The result of :func:`top_hessian_eigenvalue`.

  Attributes:
    eigenvalue: the Rayleigh quotient :math:`v^\\top H v` of the final
      iterate, a float32 (or float64) scalar.
    eigenvector: the final iterate v, a unit-norm pytree like the params.
  """

  eigenvalue: jax.Array  # shape=(), dtype=jnp.float32
  eigenvector: Any


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: Any,
    *,
    num_iters: int = 20,
    key: jax.Array,
) -> HessianEigenpair:
  r"""The dominant eigenvalue of the Hessian, by power iteration.

  Starting from a random unit vector :math:`v_0`, iterates
  :math:`v_{i+1} = H v_i / \|H v_i\|_2` with Hessian-vector products
  (:func:`hessian_vector_product`, inside a ``lax.fori_loop``) and returns the
  Rayleigh quotient :math:`\lambda = v^\top H v` of the last iterate. The
  error shrinks like :math:`(\lambda_2/\lambda_1)^{2i}`: raise ``num_iters``
  when the top of the spectrum is crowded.

  The iteration is compiled with ``loss_fn`` as a static argument: calling
  again with the same function object (and params of the same shapes)
  reuses the compiled program.

  Power iteration finds the eigenvalue of largest *magnitude*. Near a minimum
  that is the largest one (the Hessian is close to positive semi-definite);
  far from it a large negative eigenvalue may win, and the result is then
  negative.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``. Use a fixed batch (or the whole
      training set): a loss that changes between calls has no Hessian.
    params: where the Hessian is taken.
    num_iters: number of Hessian-vector products in the iteration (one more
      is spent on the final Rayleigh quotient).
    key: a PRNG key for :math:`v_0`.

  Returns:
    A :class:`HessianEigenpair` ``(eigenvalue, eigenvector)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import diagnostics
    >>> loss = lambda w: 0.5 * w @ jnp.diag(jnp.array([4.0, 1.0, 0.5])) @ w
    >>> lam, v = diagnostics.top_hessian_eigenvalue(
    ...     loss, jnp.zeros(3), num_iters=30, key=jax.random.key(0))
    >>> round(float(lam), 4)
    4.0

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (Hessian
    spectra of SAM and SGD minima).
  """
  return _call_jitted(_power_iteration, loss_fn, params, key, num_iters)


def _call_jitted(impl: Callable[..., Any], loss_fn: LossFn, *args: Any
                 ) -> Any:
  """Runs ``impl(loss_fn, *args)`` compiled, ``loss_fn`` static if it can be.

  A hashable ``loss_fn`` (any function) is a static argument of a module-
  level ``jax.jit``: calling again with the same function object reuses the
  compiled program. Params and directions are arguments, never constants
  baked into the program.
  """
  try:
    hash(loss_fn)
  except TypeError:
    return jax.jit(functools.partial(impl, loss_fn))(*args)
  return _JITTED[impl](loss_fn, *args)


def _power_iteration(loss_fn, params, key, num_iters):
  """The body of :func:`top_hessian_eigenvalue`."""

  def hvp(v):
    return hessian_vector_product(loss_fn, params, v)

  def body(_, v):
    hv = hvp(v)
    norm = jnp.sqrt(_dot(hv, hv))
    # If Hv = 0 (v in the null space), keep v: its Rayleigh quotient is 0.
    return jax.tree.map(
        lambda new, old: jnp.where(norm > 0, new, old),
        _scale(hv, _safe_inverse(norm)), v)

  v = _random_like(key, params)
  v = _scale(v, _safe_inverse(jnp.sqrt(_dot(v, v))))
  v = lax.fori_loop(0, num_iters, body, v)
  return HessianEigenpair(_dot(v, hvp(v)), v)


def filter_normalized_direction(
    key: jax.Array,
    params: Any,
    *,
    filter_axis: int = -1,
    ignore_1d: bool = True,
) -> Any:
  r"""A random direction scaled filter by filter to the weights' norms.

  Li et al. (2018): draw :math:`d \sim \mathcal N(0, I)` shaped like the
  params and rescale each *filter* :math:`d_f` to the norm of the
  corresponding filter of the weights,
  :math:`d_f \leftarrow d_f\, \|w_f\| / \|d_f\|`, so that a step along d
  means the same relative change in every layer, whatever its scale (which
  ReLU networks are invariant to).

  A filter is a slice along ``filter_axis`` of a leaf with at least two
  dimensions: the default ``-1`` is the output axis in Flax and Haiku
  layouts (Dense ``(in, out)``, Conv ``(h, w, in, out)``), so a filter is
  the weight vector of one output unit or channel, as in the paper's
  PyTorch layout ``(out, in, h, w)`` with axis 0. Leaves with fewer than two
  dimensions (biases, normalisation scales and offsets) get a zero
  direction by default (``ignore_1d=True``, the paper's choice, its code's
  ``ignore='biasbn'``); with ``ignore_1d=False`` they are normalised as one
  filter per leaf.

  Args:
    key: a PRNG key.
    params: the weights.
    filter_axis: the axis that indexes filters in leaves of rank ≥ 2.
    ignore_1d: zero direction on leaves of rank 0 or 1.

  Returns:
    The direction, a pytree like ``params`` (same dtypes).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import diagnostics
    >>> params = {'kernel': jnp.ones((4, 2)), 'bias': jnp.ones(2)}
    >>> d = diagnostics.filter_normalized_direction(jax.random.key(0), params)
    >>> jnp.linalg.norm(d['kernel'], axis=0).round(5)  # ‖w_f‖ = 2 for both
    Array([2., 2.], dtype=float32)
    >>> d['bias']
    Array([0., 0.], dtype=float32)

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.
  """
  return _filter_normalized_direction(key, params, filter_axis, ignore_1d)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _filter_normalized_direction(key, params, filter_axis, ignore_1d):
  """The jitted body of :func:`filter_normalized_direction`."""

  def normalize(d, w):
    if not _is_float(w):
      return d
    w32 = jnp.asarray(w).astype(jnp.promote_types(w.dtype, jnp.float32))
    d32 = d.astype(w32.dtype)
    if w32.ndim >= 2:
      axis = filter_axis % w32.ndim
      axes = tuple(a for a in range(w32.ndim) if a != axis)
    elif ignore_1d:
      return jnp.zeros_like(d)
    else:
      axes = None
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w32), axis=axes, keepdims=True))
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d32), axis=axes, keepdims=True))
    return (d32 * w_norm * _safe_inverse(d_norm)).astype(d.dtype)

  return jax.tree.map(normalize, _random_like(key, params), params)


class Landscape1D(NamedTuple):
  """A 1-D slice of the loss, from :func:`loss_landscape_1d`.

  Attributes:
    coordinates: the step sizes t, shape ``(num_points,)``.
    losses: ``L(w + t·d)`` at each coordinate, shape ``(num_points,)``.
    direction: the direction d (a pytree like the params).
  """

  coordinates: jax.Array
  losses: jax.Array
  direction: Any


class Landscape2D(NamedTuple):
  """A 2-D slice of the loss, from :func:`loss_landscape_2d`.

  Attributes:
    x: coordinates along the first direction, shape ``(num_points,)``.
    y: coordinates along the second direction, shape ``(num_points,)``.
    losses: ``losses[j, i] = L(w + x[i]·d1 + y[j]·d2)``, shape
      ``(num_points, num_points)``: the layout of
      ``matplotlib.pyplot.contour(x, y, losses)``.
    directions: the pair ``(d1, d2)``.
  """

  x: jax.Array
  y: jax.Array
  losses: jax.Array
  directions: tuple[Any, Any]


def _losses_along(loss_fn: LossFn, params: Any, directions: tuple[Any, ...],
                  coefficients: jax.Array) -> jax.Array:
  """``L(w + Σ_k c[n, k] d_k)`` for every row n, one point at a time."""

  def at(c):
    def shift(w, *d):
      if not _is_float(w):
        return w
      out = w.astype(jnp.promote_types(w.dtype, jnp.float32))
      for ck, dk in zip(c, d):
        out = out + ck.astype(out.dtype) * dk.astype(out.dtype)
      return out.astype(w.dtype)

    return jnp.asarray(loss_fn(jax.tree.map(shift, params, *directions)),
                       jnp.float32)

  return lax.map(at, coefficients)


_JITTED = {impl: jax.jit(impl, static_argnums=0)
           for impl in (_power_iteration, _losses_along)}


def loss_landscape_1d(
    loss_fn: LossFn,
    params: Any,
    key: jax.Array,
    num_points: int = 21,
    span: float = 1.0,
    *,
    direction: Any = None,
    filter_axis: int = -1,
    ignore_1d: bool = True,
) -> Landscape1D:
  r"""The loss along a filter-normalised random line through ``params``.

  Evaluates :math:`L(w + t\,d)` for ``num_points`` values of t evenly spaced
  in ``[-span, span]``, with d from :func:`filter_normalized_direction`
  (``t = 1`` moves every filter by its own norm). The points are evaluated
  one after the other (``lax.map``), so memory stays that of one forward
  pass.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``, e.g. the training loss on a fixed
      set of examples.
    params: the centre w (typically a trained minimum).
    key: a PRNG key for the direction.
    num_points: number of points on the line.
    span: the coordinates run over ``[-span, span]``.
    direction: use this direction instead of a random one (e.g. the top
      Hessian eigenvector); ``key`` is then unused.
    filter_axis: see :func:`filter_normalized_direction`.
    ignore_1d: see :func:`filter_normalized_direction`.

  Returns:
    A :class:`Landscape1D` ``(coordinates, losses, direction)``:
    ``plt.plot(coordinates, losses)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import diagnostics
    >>> loss = lambda p: jnp.sum(p['w'] ** 2)
    >>> params = {'w': jnp.ones((3, 2))}
    >>> line = diagnostics.loss_landscape_1d(loss, params, jax.random.key(0),
    ...                                      num_points=5, span=1.0)
    >>> line.coordinates
    Array([-1. , -0.5,  0. ,  0.5,  1. ], dtype=float32)
    >>> float(line.losses[2])  # The centre: L(w).
    6.0

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.
  """
  if direction is None:
    direction = filter_normalized_direction(
        key, params, filter_axis=filter_axis, ignore_1d=ignore_1d)
  coordinates = jnp.linspace(-span, span, num_points, dtype=jnp.float32)
  losses = _call_jitted(_losses_along, loss_fn, params, (direction,),
                        coordinates[:, None])
  return Landscape1D(coordinates, losses, direction)


def loss_landscape_2d(
    loss_fn: LossFn,
    params: Any,
    key: jax.Array,
    num_points: int = 21,
    span: float = 1.0,
    *,
    directions: tuple[Any, Any] | None = None,
    filter_axis: int = -1,
    ignore_1d: bool = True,
) -> Landscape2D:
  r"""The loss on a filter-normalised random plane through ``params``.

  Evaluates :math:`L(w + x\,d_1 + y\,d_2)` on a ``num_points`` ×
  ``num_points`` grid over ``[-span, span]²``, with two independent
  directions from :func:`filter_normalized_direction` (in high dimension
  nearly orthogonal). Points are evaluated one after the other
  (``lax.map``).

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: the centre w.
    key: a PRNG key for the two directions.
    num_points: grid points per axis.
    span: both coordinates run over ``[-span, span]``.
    directions: use this pair ``(d1, d2)`` instead of random directions.
    filter_axis: see :func:`filter_normalized_direction`.
    ignore_1d: see :func:`filter_normalized_direction`.

  Returns:
    A :class:`Landscape2D` ``(x, y, losses, directions)`` with
    ``losses[j, i]`` at ``(x[i], y[j])``: ``plt.contour(x, y, losses)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import diagnostics
    >>> loss = lambda p: jnp.sum(p['w'] ** 2)
    >>> plane = diagnostics.loss_landscape_2d(
    ...     loss, {'w': jnp.ones((3, 2))}, jax.random.key(0), num_points=5)
    >>> plane.losses.shape, float(plane.losses[2, 2])
    ((5, 5), 6.0)

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.
  """
  if directions is None:
    k1, k2 = jax.random.split(key)
    directions = tuple(
        filter_normalized_direction(k, params, filter_axis=filter_axis,
                                    ignore_1d=ignore_1d) for k in (k1, k2))
  x = jnp.linspace(-span, span, num_points, dtype=jnp.float32)
  y = jnp.linspace(-span, span, num_points, dtype=jnp.float32)
  xx, yy = jnp.meshgrid(x, y)  # xx[j, i] = x[i], yy[j, i] = y[j].
  grid = jnp.stack([xx.ravel(), yy.ravel()], axis=1)
  losses = _call_jitted(_losses_along, loss_fn, params, tuple(directions),
                        grid)
  return Landscape2D(x, y, losses.reshape(num_points, num_points),
                     tuple(directions))
