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


# The scale of norm()'s overflow-free second sum: (x·2⁻⁸⁰)² stays below
# float32's 3.4e38 for any finite float32 or bfloat16 x, summed over up to
# 1e9 elements.
_SMALL = 2.0 ** -80


def norm(tree: Any) -> jax.Array:
  """‖tree‖₂ over the float leaves, in :func:`accumulation_dtype`.

  Differentiable everywhere (derivative 0 at a zero tree). The sum of squares
  is accumulated in that dtype, so a float32 sum overflows when ‖tree‖
  exceeds about 1.8e19 (e.g. a bfloat16 gradient of 1e20) although every
  leaf is finite. The same pass over the leaves (XLA fuses the two sums)
  also sums the squares of the leaves scaled by 2⁻⁸⁰, which cannot
  overflow; where the plain sum is inf, the norm is read from that one,
  ``2⁸⁰ √Σ(x 2⁻⁸⁰)²`` (the elements it loses to underflow, below about 1e5,
  weigh nothing next to a sum past 3.4e38). So the norm is finite whenever
  it is representable, with no second pass, no ``lax.cond`` and no extra
  buffer on the normal path. A NaN leaf gives NaN, an infinite one inf.
  """
  dtype = accumulation_dtype(tree)
  leaves = jax.tree.leaves(to_compute(float_leaves(tree)))
  if not leaves:
    return jnp.zeros([], dtype)
  squared = sum((jnp.sum(jnp.square(x), dtype=dtype) for x in leaves),
                jnp.zeros([], dtype))
  small = jnp.asarray(_SMALL, dtype)
  scaled = sum((jnp.sum(jnp.square(x * small.astype(x.dtype)), dtype=dtype)
                for x in leaves), jnp.zeros([], dtype))
  return jnp.where(jnp.isinf(squared), _safe_sqrt(scaled) / small,
                   _safe_sqrt(squared))


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
