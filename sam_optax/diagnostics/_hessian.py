r"""Hessian-vector products and the top Hessian eigenvalue (power iteration).

The largest eigenvalue of the Hessian of the training loss is the standard
measure of how sharp a minimum is (smaller = flatter; Foret et al. 2021
report it for SAM and SGD). Everything here takes a ``loss_fn(params) ->
scalar`` (close over the batch or the whole training set), works on any
pytree of params, never forms the Hessian, and compiles its work with
``loss_fn`` as a static argument (reuse one function object to reuse the
compilation); it can also be called inside ``jax.jit``.

:class:`FlatHessian` is the Hessian as an operator on one flat vector of all
the float parameters, in the tree's accumulation dtype: the iterative
eigensolvers (here and in :mod:`sam_optax.diagnostics._spectrum`) work on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from sam_optax._compilation import static_loss as _compile
from sam_optax._core import sharding as _sharding
from sam_optax._core import tree as _tree

LossFn = Callable[[Any], jax.Array]


def hessian_vector_product(loss_fn: LossFn, params: Any, vector: Any, *,
                           axis_name: Any = None) -> Any:
  r"""Computes :math:`H v`, the Hessian of ``loss_fn`` at ``params`` times v.

  Forward-over-reverse (``jax.jvp`` of ``jax.grad``): the cost of about two
  gradients, and no Hessian is ever formed.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: where the Hessian is taken.
    vector: a pytree like ``params``.
    axis_name: a ``pmap``/``shard_map`` axis over which the data is split:
      each device's :math:`H v` (of its local loss) is averaged with
      ``lax.pmean``, giving the Hessian of the mean loss.

  Returns:
    :math:`H v`, a pytree like ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import diagnostics
    >>> loss = lambda w: 0.5 * w @ jnp.diag(jnp.array([1.0, 3.0])) @ w
    >>> diagnostics.hessian_vector_product(loss, jnp.ones(2), jnp.ones(2))
    Array([1., 3.], dtype=float32)

  .. note::
    Under ``jax.shard_map`` the params and the vector are marked varying
    over ``axis_name`` first (:func:`sam_optax.mark_varying`), so that each
    shard differentiates its own loss rather than the sum over shards.
  """
  if axis_name is None:
    return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]
  try:
    lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
        f"axis_name={axis_name!r}: the Hessian diagnostics were called "
        "outside a jax.pmap or jax.shard_map that binds this axis. Call them "
        "inside the mapped function, or pass axis_name=None.") from e
  params, vector = _sharding.mark_varying((params, vector), axis_name)
  hv = jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]
  return lax.pmean(hv, axis_name)


class FlatHessian(NamedTuple):
  """The Hessian of a loss as a linear operator on flat vectors.

  Attributes:
    matvec: ``matvec(v) -> H v`` for a flat vector ``v`` of shape
      ``(size,)`` and dtype ``dtype``.
    to_tree: maps a flat vector back to a pytree like the params (in their
      dtypes; zeros on non-float leaves).
    size: the number of float parameters (a Python int).
    dtype: the dtype of the flat vectors: float32, or float64 if any float
      leaf is float64.
  """

  matvec: Callable[[jax.Array], jax.Array]
  to_tree: Callable[[jax.Array], Any]
  size: int
  dtype: Any


def flat_hessian(loss_fn: LossFn, params: Any,
                 axis_name: Any = None) -> FlatHessian:
  """The Hessian of ``loss_fn`` with respect to the float leaves of params.

  Non-float leaves (step counters, integer buffers) are held fixed: they
  are neither differentiated nor part of the flat vectors.
  """
  leaves, treedef = jax.tree.flatten(params)
  floats = [_tree.is_float(x) for x in leaves]
  primal = [x for x, f in zip(leaves, floats) if f]
  flat, unravel = ravel_pytree(primal)
  dtype = _tree.accumulation_dtype(params)

  def rebuild(float_leaves, fill=None):
    it = iter(float_leaves)
    return jax.tree.unflatten(treedef, [
        next(it) if f else (x if fill is None else fill(x))
        for x, f in zip(leaves, floats)])

  def matvec(v):
    hv = hessian_vector_product(
        lambda q: loss_fn(rebuild(q)), primal, unravel(v.astype(flat.dtype)),
        axis_name=axis_name)
    return ravel_pytree(hv)[0].astype(dtype)

  def to_tree(v):
    return rebuild(unravel(v.astype(flat.dtype)), fill=jnp.zeros_like)

  return FlatHessian(matvec, to_tree, int(flat.size), dtype)


def unit_normal(key: jax.Array, size: int, dtype: Any) -> jax.Array:
  """A random unit vector, uniform on the sphere (a normalised Gaussian)."""
  v = jax.random.normal(key, (size,), jnp.float32).astype(dtype)
  return _tree.safe_div(v, jnp.linalg.norm(v))


class HessianEigenpair(NamedTuple):
  """The result of :func:`top_hessian_eigenvalue`.

  Attributes:
    eigenvalue: the Rayleigh quotient :math:`v^\\top H v` of the final
      iterate, a float32 (or float64) scalar.
    eigenvector: the final iterate v, a unit-norm pytree like the params.
  """

  eigenvalue: jax.Array  # shape=(), dtype=jnp.float32
  eigenvector: Any


def _power_iteration_impl(loss_fn, params, key, num_iters, *, axis_name):
  """The body of :func:`top_hessian_eigenvalue`."""
  hessian = flat_hessian(loss_fn, params, axis_name)

  def body(_, v):
    hv = hessian.matvec(v)
    hv_norm = jnp.linalg.norm(hv)
    # If Hv = 0 (v in the null space), keep v: its Rayleigh quotient is 0.
    return jnp.where(hv_norm > 0, _tree.safe_div(hv, hv_norm), v)

  v = unit_normal(key, hessian.size, hessian.dtype)
  v = lax.fori_loop(0, num_iters, body, v)
  return HessianEigenpair(jnp.vdot(v, hessian.matvec(v)), hessian.to_tree(v))


_power_iteration = _compile.jit_with_static_loss(
    _power_iteration_impl, static_argnames=("axis_name",))


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: Any,
    *,
    num_iters: int = 20,
    key: jax.Array,
    axis_name: Any = None,
) -> HessianEigenpair:
  r"""The dominant eigenvalue of the Hessian, by power iteration.

  Starting from a random unit vector :math:`v_0`, iterates
  :math:`v_{i+1} = H v_i / \|H v_i\|_2` with Hessian-vector products
  (:func:`hessian_vector_product`, inside a ``lax.fori_loop``) and returns the
  Rayleigh quotient :math:`\lambda = v^\top H v` of the last iterate. The
  error shrinks like :math:`(\lambda_2/\lambda_1)^{2i}`: raise ``num_iters``
  when the top of the spectrum is crowded, or use
  :func:`top_hessian_eigenvalues` (Lanczos), which converges much faster.

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
    axis_name: average the Hessian over this ``pmap``/``shard_map`` axis
      (see :func:`hessian_vector_product`).

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
    >>> loss = lambda w: 0.5 * w @ jnp.diag(jnp.array([-5.0, 1.0, 0.5])) @ w
    >>> lam, v = diagnostics.top_hessian_eigenvalue(
    ...     loss, jnp.zeros(3), num_iters=30, key=jax.random.key(0))
    >>> round(float(lam), 4)  # Largest magnitude, sign kept.
    -5.0

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (Hessian
    spectra of SAM and SGD minima).
  """
  return _power_iteration(loss_fn, params, key, num_iters,
                          axis_name=axis_name)
