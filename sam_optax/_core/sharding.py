"""Collectives for data-parallel SAM under ``jax.pmap`` and ``jax.shard_map``.

Under ``jax.shard_map`` with ``check_vma=True`` (the default), JAX tracks which
values vary across a mesh axis. ``jax.grad`` with respect to a *replicated*
(invariant) parameter then returns the gradient already summed over the
shards, so a per-shard ascent direction silently becomes the global one. The
helpers here detect that case and keep per-shard evaluations per-shard.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax


def varying_axes(x: Any) -> frozenset[str]:
  """The mesh axes over which ``x`` varies (empty outside vma tracking)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    manual = getattr(aval, "manual_axis_type", None)
    vma = getattr(manual, "varying", frozenset())
  return frozenset(vma)


def check_axis_bound(axis_name: Any) -> None:
  """Raises a clear error if ``axis_name`` is not bound by pmap/shard_map."""
  try:
    lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
        f"sam(axis_name={axis_name!r}) was called outside a jax.pmap or "
        f"jax.shard_map that binds the axis {axis_name!r}. Call the update "
        "inside the mapped function with the same axis name, or set "
        "axis_name=None for single-device training."
    ) from e


def tracks_varying(axis_name: Any) -> bool:
  """Whether we are inside a shard_map that tracks variance over the axis."""
  try:
    return axis_name in varying_axes(lax.axis_index(axis_name))
  except NameError:  # Unbound axis: not inside any map.
    return False


def mark_varying(tree: Any, axis_name: Any) -> Any:
  """Marks every leaf of ``tree`` as varying over ``axis_name``.

  Inside ``jax.shard_map(..., check_vma=True)``, call this on replicated params
  before taking the *local* gradient, so that ``jax.grad`` returns this
  shard's gradient instead of the sum over shards. Outside vma tracking
  (``jax.pmap``, ``check_vma=False``, or outside any map) it returns ``tree``
  unchanged, so the same loss code also runs on a single device.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import sam_optax
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ('batch',))
    >>> def local_grad(w, x):
    ...   loss = lambda w: jnp.mean((x @ w) ** 2)
    ...   return jax.grad(loss)(sam_optax.mark_varying(w, 'batch'))
    >>> f = jax.shard_map(local_grad, mesh=mesh, in_specs=(P(), P('batch')),
    ...                   out_specs=P('batch'))
    >>> f(jnp.ones(2), jnp.ones((4, 2))).shape
    (2,)
  """

  def cast(x):
    if axis_name in varying_axes(x) or not tracks_varying(axis_name):
      return x
    return lax.pcast(x, axis_name, to="varying")

  return jax.tree.map(cast, tree)


def check_local(tree: Any, axis_name: Any, tree_name: str) -> None:
  """Rejects gradients that are already reduced over ``axis_name``."""
  if not tracks_varying(axis_name):
    return
  for leaf in jax.tree.leaves(tree):
    if axis_name not in varying_axes(leaf):
      raise ValueError(
          f"{tree_name} is invariant over the mesh axis {axis_name!r}: it was "
          "already reduced across shards, so each shard would perturb with "
          "the global gradient instead of its own. Inside jax.shard_map with "
          "check_vma=True, jax.grad with respect to replicated params returns "
          "the psum over shards: take the gradient with respect to "
          f"sam_optax.mark_varying(params, {axis_name!r}) instead. (With "
          "sync_ascent=True a reduced gradient is accepted: only its "
          "direction is used, but the logged grad_norm is then that of the "
          "sum.)"
      )
