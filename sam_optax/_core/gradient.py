"""The SAM gradient: ascend from the given gradient, re-evaluate there.

:func:`sam_gradient` is the pure function behind :func:`sam_optax.sam`. Use it
directly when you need the perturbed pass's auxiliary output (for example the
BatchNorm statistics of the perturbed forward pass, or per-step metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sam_optax._core import masks as _masks
from sam_optax._core import perturbation as _perturbation
from sam_optax._core import sharding as _sharding
from sam_optax._core import tree as _tree


class AscentOptions(NamedTuple):
  """How every method builds and applies ε (the arguments of ``sam``)."""

  adaptive: bool = False
  eta: Any = 0.01
  eps: Any = 1e-12
  mask: Any = None
  adaptive_mask: Any = None
  perturb_in_float32: bool = False
  exact_norms: bool = False
  rho_multipliers: Any = None


def rho_multiplier_tree(multipliers: Any, params: Any) -> Any:
  """The per-leaf ρ multipliers as a tree like ``params`` (or ``None``).

  ``multipliers`` is ``None`` (every leaf 1), a pytree of scalars with the
  params' structure or a prefix of it (a scalar applies to the whole
  subtree), or a callable ``(path, shape) -> scalar`` called once per leaf
  with the leaf's path (``'layer/kernel'``, as :func:`sam_optax.path_mask`
  sees it) and shape. Concrete multipliers must be finite and >= 0.
  """
  if multipliers is None:
    return None
  if callable(multipliers):
    tree = jax.tree_util.tree_map_with_path(
        lambda path, w: multipliers(_masks.path_str(path), jnp.shape(w)),
        params)
  else:
    try:
      tree = jax.tree.map(
          lambda m, sub: jax.tree.map(lambda _: m, sub), multipliers, params)
    except ValueError as e:
      raise ValueError(
          "rho_multipliers must be a pytree of scalars with the params' "
          f"structure (or a prefix of it), or a callable (path, shape) -> "
          f"scalar: {e}") from e
  for path, m in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(m, jax.core.Tracer):
      continue
    if jnp.shape(m) != () or not jnp.issubdtype(jnp.result_type(m),
                                                 jnp.number):
      raise ValueError(
          f"rho_multipliers must give a real scalar per leaf; got {m!r} at "
          f"{_masks.path_str(path) or 'the root'!r}.")
    if not (np.isfinite(np.asarray(m)) and np.asarray(m) >= 0):
      raise ValueError(
          f"rho_multipliers must be finite and >= 0; got {m!r} at "
          f"{_masks.path_str(path) or 'the root'!r}.")
  return tree


def scale_epsilon(epsilon: Any, params: Any, multipliers: Any) -> Any:
  """ε with each leaf multiplied by its ρ multiplier (identity for None)."""
  tree = rho_multiplier_tree(multipliers, params)
  if tree is None:
    return epsilon
  return jax.tree.map(lambda e, m: e * jnp.asarray(m).astype(e.dtype),
                      epsilon, tree)


class SAMInfo(NamedTuple):
  r"""What :func:`sam_gradient` measured on the way (float32 scalars).

  Attributes:
    ascent_norm: :math:`\|T g\|_2` of the ascent gradient over the perturbed
      leaves (:math:`\|g\|_2` for SAM).
    radius: ρ, or 0 where the ascent gradient is 0 (exactly: the radius of ε
      in the ascent's metric, see :class:`sam_optax.Perturbation`).
    grad_norm: :math:`\|g\|_2` with ``exact_norms=True``, else ``None``.
    perturbation_norm: with ``exact_norms=True``, the *achieved*
      :math:`\|\epsilon\|_2`, i.e. the norm of ``perturbed_params - params``
      after rounding to the params' dtype (so a bf16 model shows how much of
      ρ survived); else ``None``.
    aux: what ``grad_fn`` returned besides the gradient (``None`` unless
      ``has_aux=True``). Not averaged over devices or micro-batches.
  """

  ascent_norm: jax.Array  # shape=(), dtype=jnp.float32
  radius: jax.Array  # shape=(), dtype=jnp.float32
  grad_norm: jax.Array | None  # shape=(), dtype=jnp.float32
  perturbation_norm: jax.Array | None  # shape=(), dtype=jnp.float32
  aux: Any


def conform_to_params(tree: Any, params: Any, tree_name: str,
                      leading: tuple[int, ...] = ()) -> Any:
  """Checks that ``tree`` matches ``params`` and returns it in their structure.

  A tree with another container type but the same leaf paths and shapes is
  accepted and restructured (``nnx.grad`` returns ``Param`` nodes where the
  optimizer holds plain arrays).

  Raises:
    ValueError: if the leaves, their paths, shapes or kinds differ (a float
      param needs a float gradient), or the params are of a kind SAM cannot
      perturb (complex leaves, ``optax.masked`` placeholders).
  """
  _check_params(params)
  param_def = jax.tree.structure(params)
  leaves, treedef = jax.tree.flatten(tree)
  if treedef != param_def:
    paths = [_masks.path_str(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(tree)[0]]
    param_paths = [_masks.path_str(p) for p, _ in
                   jax.tree_util.tree_flatten_with_path(params)[0]]
    if paths != param_paths:
      raise ValueError(
          f"{tree_name} does not match the params: got leaves {paths} for "
          f"params leaves {param_paths} (structures {treedef} and "
          f"{param_def}).")
  for (path, param), leaf in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], leaves):
    where = _masks.path_str(path) or "the root"
    expected = tuple(leading) + tuple(jnp.shape(param))
    if leading and tuple(jnp.shape(leaf)) != expected:
      raise ValueError(
          f"{tree_name} has shape {jnp.shape(leaf)} at {where!r} where "
          f"{expected} was expected: with microbatched=True every leaf needs "
          f"a leading micro-batch axis (of size {leading[0]}, read from the "
          "first leaf) before the param's shape. Compute one gradient per "
          "micro-batch, e.g. jax.vmap(jax.grad(loss), in_axes=(None, 0))"
          "(params, sam_optax.split_microbatches(batch, k)).")
    if tuple(jnp.shape(leaf)) != expected:
      raise ValueError(
          f"{tree_name} has shape {jnp.shape(leaf)} at {where!r} where "
          f"{expected} was expected.")
    dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
    if dtype == jax.dtypes.float0:
      raise ValueError(
          f"{tree_name} has a float0 leaf at {where!r} (jax.grad(...,"
          " allow_int=True) of an integer param): optimizers update float "
          "params only; keep integer leaves out of the optimized params.")
    if _tree.is_float(param) and not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{tree_name} has dtype {dtype} at {where!r}, where the param is "
          f"{jnp.result_type(param)}: a gradient must be floating point.")
  return jax.tree.unflatten(param_def, leaves)


def _check_params(params: Any) -> None:
  """Rejects params SAM cannot perturb correctly, naming what to do."""
  if any(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))):
    raise ValueError(
        "The params hold optax.MaskedNode placeholders: SAM is inside "
        "optax.masked or one branch of optax.multi_transform, so grad_fn "
        "would be called without the other params. Put SAM outside instead "
        "(sam(optax.multi_transform(...))) and choose the perturbed leaves "
        "with sam(..., mask=...).")
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.iscomplexobj(leaf):
      raise ValueError(
          f"Complex params are not supported (leaf "
          f"{_masks.path_str(path) or 'the root'!r}): split them into real "
          "and imaginary parts.")


def _achieved_norm(perturbed: Any, params: Any,
                   intended: jax.Array) -> jax.Array:
  """The norm of the perturbation actually applied.

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
  return optax.tree.norm(diffs)


def perturbed_gradient(
    grad_fn: Callable[[Any], tuple[Any, Any]],
    params: Any,
    grads: Any,
    rho: Any,
    options: AscentOptions,
    *,
    axis_name: Any = None,
    microbatched: bool = False,
) -> tuple[Any, SAMInfo]:
  """This device's SAM gradient and info, with no checks and no averaging.

  The core of :func:`sam_gradient` for callers that have already checked
  their inputs (``grads`` conformed to ``params``, with a leading micro-batch
  axis if ``microbatched``). ``grad_fn`` returns ``(gradient, aux)``. Under
  ``axis_name`` the perturbed params are marked varying, so a ``shard_map``
  gradient stays this shard's; nothing is averaged over the axis.
  """

  def ascend(g):
    p = _perturbation.ascent_direction(
        g, params, rho, adaptive=options.adaptive, eta=options.eta,
        eps=options.eps, mask=options.mask,
        adaptive_mask=options.adaptive_mask, exact_norms=options.exact_norms)
    epsilon, intended = p.epsilon, p.norm
    if options.rho_multipliers is not None:
      epsilon = scale_epsilon(epsilon, params, options.rho_multipliers)
      intended = _tree.norm(epsilon) if options.exact_norms else None
    perturbed = _perturbation.perturb(
        params, epsilon, keep_dtype=not options.perturb_in_float32)
    achieved = None
    if options.exact_norms:
      achieved = _achieved_norm(perturbed, params, intended)
    norms = (p.ascent_norm, p.radius, p.grad_norm, achieved)
    return perturbed, jax.tree.map(lambda x: x.astype(jnp.float32), norms)

  if microbatched:
    perturbed, norms = jax.vmap(ascend)(grads)
    norms = jax.tree.map(jnp.mean, norms)
    leading = jax.tree.leaves(grads)[0].shape[:1]
  else:
    perturbed, norms = ascend(grads)
    leading = ()
  if axis_name is not None:
    # Under shard_map, a gradient w.r.t. invariant params comes back summed
    # over shards: make the perturbed params varying so it stays local.
    perturbed = _sharding.mark_varying(perturbed, axis_name)
  sam_grads, aux = grad_fn(perturbed)
  sam_grads = conform_to_params(sam_grads, params, "The output of grad_fn",
                                leading)
  if microbatched:
    sam_grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), sam_grads)
  sam_grads = jax.tree.map(lambda s, g: s.astype(g.dtype), sam_grads, grads)
  return sam_grads, SAMInfo(*norms, aux)


def sync_ascent_grads(grads: Any, axis_name: Any,
                      groups: Sequence[Sequence[int]] | None = None) -> Any:
  """Averages ``grads`` over the axis (within ``groups``: ``pmap`` only)."""
  if groups is not None and _sharding.tracks_varying(axis_name):
    raise ValueError(
        "ascent_groups (axis_index_groups) is not supported under "
        "jax.shard_map; use jax.pmap for grouped ascent.")
  try:
    return lax.pmean(grads, axis_name, axis_index_groups=groups)
  except NotImplementedError as e:
    raise ValueError(
        "ascent_groups (axis_index_groups) is not supported here (it works "
        "under jax.pmap, not jax.shard_map).") from e


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
    exact_norms: bool = False,
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
      the SAM gradients (and the logged norms) are averaged over it.
    perturb_in_float32: hand ``grad_fn`` float32 perturbed params even when the
      params are bf16/fp16, so that ε is not lost to rounding.
    exact_norms: also measure :math:`\|g\|_2` and the achieved
      :math:`\|\epsilon\|_2` (free for SAM in float32, extra reductions for
      ASAM and low-precision params).

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
  leading = ()
  if microbatched and jax.tree.leaves(grads):
    leading = jax.tree.leaves(grads)[0].shape[:1]
  grads = conform_to_params(grads, params, "The gradient passed to SAM",
                            leading)
  if axis_name is None:
    if sync_ascent or ascent_groups is not None:
      raise ValueError("sync_ascent and ascent_groups need an axis_name.")
  else:
    _sharding.check_axis_bound(axis_name)
    if sync_ascent or ascent_groups is not None:
      grads = sync_ascent_grads(grads, axis_name, ascent_groups)
    else:
      _sharding.check_local(grads, axis_name, "The gradient passed to SAM")
  options = AscentOptions(adaptive, eta, eps, mask, adaptive_mask,
                          perturb_in_float32, exact_norms)
  with_aux = grad_fn if has_aux else (lambda p: (grad_fn(p), None))
  sam_grads, info = perturbed_gradient(
      with_aux, params, grads, rho, options, axis_name=axis_name,
      microbatched=microbatched)
  if axis_name is not None:
    sam_grads, norms = lax.pmean((sam_grads, info[:4]), axis_name)
    info = SAMInfo(*norms, info.aux)
  return sam_grads, info


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
