"""Tree maths shared by every method: compute dtypes, norms, projections.

One contract for the whole package: float leaves are computed in at least
float32 (float64 stays float64), non-float leaves are left alone, sums over
a tree accumulate in float64 when any float leaf is float64 and in float32
otherwise, and every division is guarded (a zero denominator gives exactly
0, never NaN or inf).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def is_float(leaf: Any) -> bool:
  """Whether ``leaf`` is a floating-point (or complex) array or scalar."""
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def compute_dtype(dtype: Any) -> jnp.dtype:
  """float32 for low-precision floats, the dtype itself for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def to_compute(tree: Any) -> Any:
  """Float leaves cast to their compute dtype; other leaves unchanged."""
  return jax.tree.map(
      lambda x: jnp.asarray(x).astype(compute_dtype(jnp.result_type(x)))
      if is_float(x) else x, tree)


def accumulation_dtype(tree: Any) -> jnp.dtype:
  """float64 if any float leaf of ``tree`` is float64, else float32."""
  dtypes = [compute_dtype(jnp.result_type(x)) for x in jax.tree.leaves(tree)
            if is_float(x)]
  return jnp.result_type(jnp.float32, *dtypes)


def float_leaves(tree: Any) -> Any:
  """``tree`` with non-float leaves replaced by ``None`` (skipped by sums)."""
  return jax.tree.map(lambda x: x if is_float(x) else None, tree)


def vdot(a: Any, b: Any) -> jax.Array:
  """⟨a, b⟩ over the float leaves, in :func:`accumulation_dtype`."""
  dtype = accumulation_dtype(a)
  a, b = to_compute(float_leaves(a)), to_compute(float_leaves(b))
  # Leaf by leaf, without flattening (optax.tree.vdot ravels each leaf,
  # which explicitly sharded arrays do not allow without a resharding).
  products = jax.tree.map(lambda x, y: jnp.sum(x * y, dtype=dtype), a, b)
  return sum(jax.tree.leaves(products), jnp.zeros([], dtype))


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """√x with derivative 0 (not NaN) at x = 0; NaN stays NaN."""
  zero = x == 0
  return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, x)))


def norm(tree: Any) -> jax.Array:
  """‖tree‖₂ over the float leaves, in :func:`accumulation_dtype`.

  Differentiable everywhere (derivative 0 at a zero tree). The sum of squares
  is accumulated in that dtype; where it overflows (a float32 sum passes
  3.4e38 when ‖tree‖ exceeds about 1.8e19, e.g. a bfloat16 gradient of
  1e20) while every leaf is finite, the norm is computed again with the
  leaves divided by their largest magnitude, as BLAS ``nrm2`` does: the
  result is finite whenever the norm itself is representable. That second
  pass is a ``lax.cond`` branch, run only after an overflow (under
  ``jax.vmap`` with a batched tree both branches run). A NaN leaf gives
  NaN, an infinite one inf.
  """
  dtype = accumulation_dtype(tree)
  leaves = [x for x in jax.tree.leaves(to_compute(float_leaves(tree)))]
  if not leaves:
    return jnp.zeros([], dtype)
  squared = jnp.asarray(optax.tree.norm(leaves, squared=True), dtype)

  def rescaled():
    largest = jnp.max(jnp.stack(
        [jnp.max(jnp.abs(x)).astype(dtype) for x in leaves]))
    # The norm does not depend on the scale: no derivative through it.
    scale = jax.lax.stop_gradient(
        jnp.where(jnp.isfinite(largest) & (largest > 0), largest, 1))
    sum_scaled = jnp.asarray(optax.tree.norm(
        [x.astype(dtype) / scale for x in leaves], squared=True), dtype)
    return jnp.where(jnp.isfinite(largest), scale * jnp.sqrt(sum_scaled),
                     largest)

  return jax.lax.cond(jnp.isinf(squared), rescaled,
                      lambda: _safe_sqrt(squared))


def safe_div(num: Any, den: Any) -> jax.Array:
  """``num / den``, and exactly 0 where ``den`` is 0 (no NaN, no inf)."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1), 0)


def add_scale(tree: Any, scalar: Any, other: Any) -> Any:
  """``tree + scalar · other`` on the float leaves, in each leaf's dtype."""
  return jax.tree.map(
      lambda x, y: x + jnp.asarray(scalar).astype(x.dtype) * y.astype(x.dtype)
      if is_float(x) else x, tree, other)


def orthogonal_part(tree: Any, direction: Any) -> Any:
  r"""The part of ``tree`` orthogonal to ``direction``.

  :math:`t - \frac{\langle t, d\rangle}{\|d\|^2}\, d`, computed as
  :math:`t - \langle t, \hat d\rangle \hat d` with :math:`\hat d = d/\|d\|`
  (no overflow of :math:`\|d\|^2`); ``tree`` itself when ``direction`` is 0.
  """
  d_norm = norm(direction)
  coefficient = safe_div(vdot(tree, direction), d_norm)  # ⟨t, d̂⟩
  return add_scale(tree, -safe_div(coefficient, d_norm), direction)


def normal_like(key: Any, tree: Any) -> Any:
  """Standard normals shaped like the float leaves of ``tree`` (0 elsewhere).

  One draw for the whole tree, cut into leaves (one random-bits computation
  to compile however many leaves there are), cast to each leaf's dtype.
  """
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [int(jnp.size(x)) if is_float(x) else 0 for x in leaves]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
  out, start = [], 0
  for x, size in zip(leaves, sizes):
    if is_float(x):
      piece = flat[start:start + size].reshape(jnp.shape(x))
      out.append(piece.astype(jnp.result_type(x)))
    else:
      out.append(jnp.zeros_like(x))
    start += size
  return jax.tree.unflatten(treedef, out)
