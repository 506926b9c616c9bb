r"""Loss landscapes: 1-D and 2-D slices along filter-normalised directions.

The loss along random directions through a minimum, each direction rescaled
filter by filter to the weights' norms (Li et al. 2018), so that plots of
different networks, or of the same network trained by SGD and by SAM, are
comparable. Everything takes a ``loss_fn(params) -> scalar`` (close over the
batch or the whole training set) and works on any pytree of params.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sam_optax._compilation import static_loss as _compile
from sam_optax._core import tree as _tree

LossFn = Callable[[Any], jax.Array]


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
    if not _tree.is_float(w):
      return d
    w32, d32 = _tree.to_compute(w), _tree.to_compute(d)
    if w32.ndim >= 2:
      axis = filter_axis % w32.ndim
      axes = tuple(a for a in range(w32.ndim) if a != axis)
    elif ignore_1d:
      return jnp.zeros_like(d)
    else:
      axes = None
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w32), axis=axes, keepdims=True))
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d32), axis=axes, keepdims=True))
    return (d32 * _tree.safe_div(w_norm, d_norm)).astype(d.dtype)

  return jax.tree.map(normalize, _tree.normal_like(key, params),
                      params)


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


def _losses_along_impl(loss_fn: LossFn, params: Any,
                       directions: tuple[Any, ...],
                       coefficients: jax.Array) -> jax.Array:
  """``L(w + Σ_k c[n, k] d_k)`` for every row n, one point at a time."""

  def at(c):
    def shift(w, *d):
      if not _tree.is_float(w):
        return w
      out = _tree.to_compute(w)
      for ck, dk in zip(c, d):
        out = out + ck.astype(out.dtype) * dk.astype(out.dtype)
      return out.astype(w.dtype)

    return jnp.asarray(loss_fn(jax.tree.map(shift, params, *directions)),
                       jnp.float32)

  return lax.map(at, coefficients)


_losses_along = _compile.jit_with_static_loss(_losses_along_impl)


def loss_landscape_1d(
    loss_fn: LossFn, params: Any, key: jax.Array, num_points: int = 21,
    span: float = 1.0, *, direction: Any = None, filter_axis: int = -1,
    ignore_1d: bool = True) -> Landscape1D:
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
  losses = _losses_along(loss_fn, params, (direction,),
                        coordinates[:, None])
  return Landscape1D(coordinates, losses, direction)


def loss_landscape_2d(
    loss_fn: LossFn, params: Any, key: jax.Array, num_points: int = 21,
    span: float = 1.0, *, directions: tuple[Any, Any] | None = None,
    filter_axis: int = -1, ignore_1d: bool = True) -> Landscape2D:
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
  losses = _losses_along(loss_fn, params, tuple(directions),
                        grid)
  return Landscape2D(x, y, losses.reshape(num_points, num_points),
                     tuple(directions))
