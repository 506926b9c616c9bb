"""The SAM gradient: ascend from the given gradient, re-evaluate there.

:func:`sam_gradient` is the pure function behind :func:`sam_optax.sam`. Use it
directly when you need the perturbed pass's auxiliary output (for example the
BatchNorm statistics of the perturbed forward pass, or per-step metrics).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sam_optax import _masks, _perturbation, _sharding


class SAMInfo(NamedTuple):
  """What :func:`sam_gradient` measured on the way.

  Attributes:
    grad_norm: ‖g‖₂ of the ascent gradient over the perturbed leaves.
    perturbation_norm: the *achieved* ‖ε‖₂, i.e. the norm of
      ``perturbed_params - params`` after rounding to the params' dtype (so a
      bf16 model shows how much of ρ survived).
    aux: what ``grad_fn`` returned besides the gradient (``None`` unless
      ``has_aux=True``). Not averaged over devices or micro-batches.
  """

  grad_norm: jax.Array  # shape=(), dtype=jnp.float32
  perturbation_norm: jax.Array  # shape=(), dtype=jnp.float32
  aux: Any


def _leaf_paths(tree: Any) -> list[str]:
  return [_masks._path_to_str(path)  # pylint: disable=protected-access
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def conform_to_params(tree: Any, params: Any, what: str,
                      leading: tuple[int, ...] = ()) -> Any:
  """Checks that ``tree`` matches ``params`` and returns it in their structure.

  A tree with another container type but the same leaf paths and shapes is
  accepted and restructured (``nnx.grad`` returns ``Param`` nodes where the
  optimizer holds plain arrays).

  Raises:
    ValueError: if the leaves, their paths or their shapes differ.
  """
  param_leaves, param_def = jax.tree.flatten(params)
  leaves, treedef = jax.tree.flatten(tree)
  if treedef != param_def and (
      len(leaves) != len(param_leaves) or _leaf_paths(tree) != _leaf_paths(
          params)):
    raise ValueError(
        f"{what} does not match the params: got leaves "
        f"{_leaf_paths(tree)} for params leaves {_leaf_paths(params)} "
        f"(structures {treedef} and {param_def}).")
  for path, leaf, param in zip(_leaf_paths(params), leaves, param_leaves):
    expected = tuple(leading) + tuple(jnp.shape(param))
    if tuple(jnp.shape(leaf)) != expected:
      raise ValueError(
          f"{what} has shape {jnp.shape(leaf)} at {path or 'the root'!r} "
          f"where {expected} was expected.")
  return jax.tree.unflatten(param_def, leaves)


def _achieved_norm(perturbed: Any, params: Any,
                   intended: jax.Array) -> jax.Array:
  """The norm of the perturbation actually applied, in float32.

  When every perturbed leaf keeps at least float32 precision this is the
  intended ‖ε‖ (no extra pass over the params); with bf16/fp16 leaves it is
  measured after rounding, ‖round(w + ε) − w‖, which shows how much of ε
  survived.
  """
  pairs = [(p, w) for p, w in zip(jax.tree.leaves(perturbed),
                                  jax.tree.leaves(params))
           if jnp.issubdtype(jnp.result_type(w), jnp.inexact)]
  if all(jnp.finfo(jnp.result_type(p)).bits >= 32 for p, _ in pairs):
    return intended
  diffs = [p.astype(jnp.float32) - jnp.asarray(w).astype(jnp.float32)
           for p, w in pairs]
  return optax.tree.norm(diffs).astype(jnp.float32)


def sam_gradient(
    grad_fn: Callable[[Any], Any],
    params: Any,
    grads: Any,
    rho: Any = 0.05,
    adaptive: bool = False,
    eta: Any = 0.01,
    *,
    eps: Any = 1e-12,
    mask: Any = None,
    adaptive_mask: Any = None,
    has_aux: bool = False,
    axis_name: Any = None,
    sync_ascent: bool = False,
    ascent_groups: Sequence[Sequence[int]] | None = None,
    microbatched: bool = False,
    perturb_in_float32: bool = False,
) -> tuple[Any, SAMInfo]:
  r"""Computes the SAM gradient :math:`\nabla L(w + \epsilon)`.

  The perturbation ε is computed from ``grads`` by
  :func:`sam_optax.ascent_direction`, then ``grad_fn`` is evaluated at
  ``params + ε``. This is the whole of SAM except the base optimizer's update.

  Args:
    grad_fn: ``grad_fn(perturbed_params)`` returns the loss gradient there,
      or ``(gradient, aux)`` if ``has_aux``.
    params: the parameters w.
    grads: the gradient at ``params`` (local to this device when
      ``axis_name`` is set; stacked per micro-batch when ``microbatched``).
    rho: the radius ρ.
    adaptive: ``True`` for ASAM (:math:`T = |w| + \eta`).
    eta: ASAM's η.
    eps: added to the norm in the denominator.
    mask: which leaves are perturbed (pytree of bools, callable or
      :class:`sam_optax.PathMask`); the others get ε = 0 and stay out of the
      norm.
    adaptive_mask: with ``adaptive``, which leaves use ``T = |w| + η``; the
      others use ``T = 1``. Default: all of them.
    has_aux: whether ``grad_fn`` returns ``(gradient, aux)``.
    axis_name: a ``pmap``/``shard_map`` axis. Each device perturbs with its own
      ``grads`` (m-sharpness with m = per-device batch) and the SAM gradients
      are averaged with ``lax.pmean``.
    sync_ascent: with ``axis_name``, average ``grads`` over the axis before the
      ascent (m = global batch).
    ascent_groups: with ``axis_name``, average ``grads`` within these groups of
      device indices before the ascent (``axis_index_groups``; ``pmap`` only).
    microbatched: ``grads`` has a leading micro-batch axis and ``grad_fn``
      takes params stacked along that axis (see
      :func:`sam_optax.split_microbatches`); each micro-batch gets its own ε and
      the SAM gradients are averaged over it.
    perturb_in_float32: hand ``grad_fn`` float32 perturbed params even when the
      params are bf16/fp16, so that ε is not lost to rounding.

  Returns:
    ``(sam_grads, info)``: the SAM gradient (structure of ``params``, dtypes of
    ``grads``) and a :class:`SAMInfo`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import sam_optax
    >>> loss = lambda w: 0.5 * jnp.sum(w ** 2)
    >>> w = jnp.array([3.0, 4.0])
    >>> grad = jax.grad(loss)
    >>> g_sam, info = sam_optax.sam_gradient(grad, w, grad(w), rho=0.5)
    >>> g_sam  # w + 0.5 * w / ‖w‖
    Array([3.3, 4.4], dtype=float32)
  """
  if axis_name is not None:
    _sharding.check_axis_bound(axis_name)
    if ascent_groups is not None and _sharding.tracks_varying(axis_name):
      raise ValueError(
          "ascent_groups (axis_index_groups) is not supported under "
          "jax.shard_map; use jax.pmap for grouped ascent.")
    if sync_ascent or ascent_groups is not None:
      try:
        grads = lax.pmean(grads, axis_name, axis_index_groups=ascent_groups)
      except NotImplementedError as e:
        raise ValueError(
            "ascent_groups (axis_index_groups) is not supported here (it "
            "works under jax.pmap, not jax.shard_map).") from e
    else:
      _sharding.check_local(grads, axis_name, "The gradient passed to SAM")

  ascent = functools.partial(
      _perturbation.ascent_direction, rho=rho, adaptive=adaptive, eta=eta,
      eps=eps, mask=mask, adaptive_mask=adaptive_mask)
  add = functools.partial(_perturbation.perturb,
                          keep_dtype=not perturb_in_float32)
  if microbatched:
    leading = jax.tree.leaves(grads)[0].shape[:1] if jax.tree.leaves(
        grads) else ()
    grads = conform_to_params(grads, params, "The micro-batched gradient",
                              leading)
    epsilon, grad_norm, norm = jax.vmap(ascent, in_axes=(0, None))(
        grads, params)
    perturbed = jax.vmap(add, in_axes=(None, 0))(params, epsilon)
    achieved = jax.vmap(_achieved_norm, in_axes=(0, None, 0))(
        perturbed, params, norm)
    grad_norm, achieved = jnp.mean(grad_norm), jnp.mean(achieved)
  else:
    leading = ()
    grads = conform_to_params(grads, params, "The gradient passed to SAM")
    epsilon, grad_norm, norm = ascent(grads, params)
    perturbed = add(params, epsilon)
    achieved = _achieved_norm(perturbed, params, norm)

  if axis_name is not None:
    # Under shard_map, a gradient w.r.t. invariant params comes back summed
    # over shards: make the perturbed params varying so it stays local.
    perturbed = _sharding.mark_varying(perturbed, axis_name)

  out = grad_fn(perturbed)
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
          "With has_aux=True, grad_fn must return a pair (gradient, aux); got "
          f"{type(out).__name__}.")
    sam_grads, aux = out
  else:
    sam_grads, aux = out, None
  sam_grads = conform_to_params(sam_grads, params, "The output of grad_fn",
                                leading)
  if microbatched:
    sam_grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), sam_grads)
    grads = jax.tree.map(lambda g: g[0], grads)  # For the dtypes below.
  if axis_name is not None:
    sam_grads, grad_norm, achieved = lax.pmean(
        (sam_grads, grad_norm, achieved), axis_name)
  sam_grads = optax.tree.cast_like(sam_grads, grads)
  return sam_grads, SAMInfo(grad_norm, achieved, aux)


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
  """Reshapes every leaf ``(B, ...)`` of ``batch`` to ``(k, B // k, ...)``.

  Used for in-device m-sharpness (m = B // k): compute one gradient per
  micro-batch with ``jax.vmap`` and pass ``microbatched=True`` to
  :func:`sam_optax.sam`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sam_optax
    >>> sam_optax.split_microbatches({'x': jnp.zeros((8, 3))}, 4)['x'].shape
    (4, 2, 3)
  """
  if not isinstance(num_microbatches, int) or num_microbatches < 1:
    raise ValueError(
        f"num_microbatches must be a positive int, got {num_microbatches!r}.")

  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(
          f"The batch size {x.shape[0]} is not divisible by "
          f"num_microbatches={num_microbatches}.")
    return x.reshape((num_microbatches, x.shape[0] // num_microbatches)
                     + x.shape[1:])

  return jax.tree.map(split, batch)
