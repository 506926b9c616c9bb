"""Choosing which parameters SAM perturbs.

A *mask* says, leaf by leaf, whether a parameter takes part in the ascent
step. It may be

* ``None``: every floating-point leaf is perturbed;
* a pytree of booleans with the structure of the params, or a prefix of it
  (``{'encoder': True, 'head': False}``); leaves may be Python bools or boolean
  scalar arrays;
* a callable ``params -> pytree of booleans`` (the ``optax.masked``
  convention);
* a :class:`PathMask`, built by :func:`path_mask` or :func:`ndim_mask`, which
  decides from each leaf's path and value.

Under ``optax.inject_hyperparams`` a plain callable would be mistaken for a
schedule: pass it in ``static_args`` or use a :class:`PathMask`, which is not
callable and is therefore left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

MaskPredicate = Callable[[str, jax.Array], bool]


def path_str(path: tuple[Any, ...]) -> str:
  """Joins a key path into ``'Dense_0/kernel'``, dropping Flax ``.value``."""
  kept = tuple(key for key in path
               if not (isinstance(key, jax.tree_util.GetAttrKey)
                       and key.name in ("value", "raw_value")))
  return jax.tree_util.keystr(kept, simple=True, separator="/")


class PathMask:
  """A mask that decides per leaf from its path and value.

  Build one with :func:`path_mask` or :func:`ndim_mask`. It is deliberately not
  callable, so ``optax.inject_hyperparams`` does not take it for a schedule.
  """

  def __init__(self, predicate: MaskPredicate, description: str):
    self._predicate = predicate
    self._description = description

  def resolve(self, params: Any) -> Any:
    """Returns the pytree of Python bools for ``params``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: bool(self._predicate(path_str(path), leaf)),
        params,
    )

  def __repr__(self) -> str:
    return f"PathMask({self._description})"


def path_mask(predicate: MaskPredicate) -> PathMask:
  """A mask from a predicate on each parameter's path and value.

  The path is the leaf's key path joined with ``/``, e.g. ``'Dense_0/kernel'``
  for Flax linen params or ``'layers/0/linear/bias'`` for an ``nnx.State``
  (the ``.value`` of ``nnx.Variable`` nodes is dropped).

  Args:
    predicate: ``predicate(path, leaf) -> bool``; ``True`` means "perturb".

  Returns:
    A :class:`PathMask` to pass as ``mask=`` (or ``adaptive_mask=``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import sam_optax
    >>> params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)}}
    >>> mask = sam_optax.path_mask(lambda path, leaf: path.endswith('kernel'))
    >>> mask.resolve(params)
    {'dense': {'bias': False, 'kernel': True}}
  """
  name = getattr(predicate, "__name__", repr(predicate))
  return PathMask(predicate, name)


def ndim_mask(min_ndim: int = 2) -> PathMask:
  """A mask that selects leaves with at least ``min_ndim`` dimensions.

  With the default ``min_ndim=2`` it keeps kernels, convolution filters and
  embeddings and leaves out biases and normalization scales/offsets, whatever
  the framework calls them.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sam_optax
    >>> params = {'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)}
    >>> sam_optax.ndim_mask().resolve(params)
    {'b': False, 'w': True}
  """
  return PathMask(lambda path, leaf: jnp.ndim(leaf) >= min_ndim,
                  f"ndim >= {min_ndim}")


def exclude_biases() -> PathMask:
  """A mask that selects every leaf except those whose name is ``bias``.

  This reproduces the official ASAM code (SamsungLabs/ASAM), whose
  ``'weight' in name`` test selects PyTorch weights, which include the
  normalization scales, and leaves out biases. Use it as
  ``adaptive_mask=sam_optax.exclude_biases()`` so biases get ``T = 1``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sam_optax
    >>> params = {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3),
    ...           'scale': jnp.ones(3)}
    >>> sam_optax.exclude_biases().resolve(params)
    {'bias': False, 'kernel': True, 'scale': True}
  """
  return PathMask(
      lambda path, leaf: path.rsplit("/", 1)[-1] != "bias", "not bias")


def mask_tree(mask: Any, params: Any, name: str = "mask") -> Any:
  """Returns the mask as a tree like ``params`` of bools or boolean arrays.

  Raises:
    ValueError: if the mask's structure is not a prefix of the params', or a
      mask leaf is not a boolean.
  """
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  if isinstance(mask, PathMask):
    mask = mask.resolve(params)
  elif callable(mask):
    mask = mask(params)
  try:
    full = jax.tree.broadcast(mask, params)
  except ValueError as e:
    raise ValueError(
        f"`{name}` must have the structure of the params, or a prefix of it. "
        f"Got {name} structure {jax.tree.structure(mask)} and params "
        f"structure {jax.tree.structure(params)}."
    ) from e
  entries, treedef = jax.tree.leaves(full), jax.tree.structure(params)
  if len(entries) != treedef.num_leaves:
    raise ValueError(
        f"`{name}` resolved to {len(entries)} entries for "
        f"{treedef.num_leaves} param leaves; use booleans (not None) as mask "
        "leaves.")
  for (path, leaf), entry in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], entries):
    if isinstance(entry, bool):
      continue
    if jnp.asarray(entry).dtype != jnp.bool_:
      raise ValueError(
          f"`{name}` leaves must be booleans, got {entry!r} "
          f"({type(entry).__name__}) at {path_str(path)!r}.")
    shape, target = jnp.shape(entry), jnp.shape(leaf)
    try:
      fits = jnp.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(
          f"`{name}` has a boolean array of shape {shape} at "
          f"{path_str(path)!r}, which does not broadcast to the param's "
          f"shape {target}.")
  return jax.tree.unflatten(treedef, entries)
