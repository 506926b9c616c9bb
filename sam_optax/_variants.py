r"""SAM variants: GSAM, LookSAM and Friendly-SAM as Optax transformations.

Every variant has the calling convention of :func:`sam_optax.sam`,
``update(updates, state, params, *, grad_fn, **extra_args)``, and builds its
perturbation with the core's :func:`sam_optax.sam_gradient` (hence
:func:`sam_optax.ascent_direction`): the same ε, masks, ASAM option and
zero-gradient safety.

Data parallelism (``axis_name``) follows one rule for all of them: each device
ascends with its *local* gradient (m-sharpness, as in ``sam``), computes the
variant's gradient from its local quantities and the replicated state, and the
final gradient is averaged with ``lax.pmean``. Cached directions kept in the
state (LookSAM's :math:`g_v`, Friendly-SAM's gradient EMA) are built from
quantities averaged over the devices, so the state stays replicated.

The vector arithmetic of the decompositions (dot products, norms,
projections) is done in float32 (float64 for float64 leaves), and every
division is guarded: a zero vector gives a zero projection, never NaN.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sam_optax import _gradient, _perturbation, _sam, _sharding, _validation

# --------------------------------------------------------------------------
# Vector arithmetic on pytrees, in the compute dtype, with guarded divisions.


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _to_compute(tree: Any) -> Any:
  """Float leaves in float32 (float64 stays float64); others unchanged."""
  return jax.tree.map(
      lambda x: jnp.asarray(x).astype(_perturbation.compute_dtype(
          jnp.result_type(x))) if _is_float(x) else x, tree)


def _dot(a: Any, b: Any) -> jax.Array:
  """⟨a, b⟩ over the float leaves, accumulated in float32 (or float64)."""
  total = jnp.zeros([], jnp.float32)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if _is_float(x) and _is_float(y):
      total = total + jnp.sum(x * y)
  return total


def _norm(tree: Any) -> jax.Array:
  return jnp.sqrt(_dot(tree, tree))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den``, and exactly 0 where ``den`` is 0 (no NaN, no inf)."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def _add_scaled(tree: Any, scalar: jax.Array, other: Any) -> Any:
  """``tree + scalar · other`` on float leaves."""
  return jax.tree.map(
      lambda x, y: x + scalar.astype(x.dtype) * y if _is_float(x) else x,
      tree, other)


def _reject(tree: Any, direction: Any) -> Any:
  r"""The part of ``tree`` orthogonal to ``direction``.

  :math:`t - \langle t, \hat d\rangle \hat d` with
  :math:`\hat d = d / \|d\|`; ``tree`` itself when ``direction`` is zero.
  """
  norm = _norm(direction)
  coef = _safe_div(_dot(tree, direction), norm)  # ⟨t, d̂⟩
  return _add_scaled(tree, -_safe_div(coef, norm), direction)


# --------------------------------------------------------------------------
# Shared plumbing.


def _check_fraction(name: str, value: Any) -> None:
  """Validates a concrete value in [0, 1] (tracers pass)."""
  if callable(value):
    raise TypeError(f"`{name}` must be a number, not a schedule.")
  _validation.check_non_negative(name, value)
  if isinstance(value, jax.core.Tracer):
    return
  if not np.asarray(value) <= 1:
    raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")


def _checked_grads(name: str, updates: Any, params: Any, grad_fn: Any,
                   axis_name: Any) -> Any:
  """Validates an ``update`` call and returns the local gradient."""
  _validation.check_call(name, grad_fn, params)
  grads = _gradient.conform_to_params(updates, params,
                                      f"The gradient passed to {name}")
  if axis_name is not None:
    _sharding.check_axis_bound(axis_name)
    _sharding.check_local(grads, axis_name, f"The gradient passed to {name}")
  return grads


def _drop_aux(grad_fn: Callable[[Any], Any], has_aux: bool
              ) -> Callable[[Any], Any]:
  if not has_aux:
    return grad_fn

  def wrapped(p):
    out = grad_fn(p)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
          "With has_aux=True, grad_fn must return (gradient, aux); got "
          f"{type(out).__name__}.")
    return out[0]

  return wrapped


def _pmean(tree: Any, axis_name: Any) -> Any:
  return tree if axis_name is None else lax.pmean(tree, axis_name)


def _local_sam_gradient(grad_fn, params, grads, rho, *, adaptive, eta, eps,
                        mask, adaptive_mask, axis_name, what):
  """This device's ``∇L_i(w + ε_i)``, *not* averaged over ``axis_name``.

  :func:`sam_optax.sam_gradient` averages the SAM gradient over the axis;
  GSAM needs each device's own one first. The logged norms are averaged.
  """
  if axis_name is not None:
    _sharding.check_axis_bound(axis_name)
    _sharding.check_local(grads, axis_name, f"The gradient passed to {what}")

    def local_grad_fn(p):  # Keeps the gradient local under shard_map.
      return grad_fn(_sharding.mark_varying(p, axis_name))
  else:
    local_grad_fn = grad_fn
  g_sam, info = _gradient.sam_gradient(
      local_grad_fn, params, grads, rho, adaptive, eta, eps=eps, mask=mask,
      adaptive_mask=adaptive_mask)
  norms = _pmean((info.grad_norm, info.perturbation_norm), axis_name)
  return g_sam, norms


# --------------------------------------------------------------------------
# GSAM.


def gsam_rho_schedule(
    lr_schedule: optax.ScalarOrSchedule,
    *,
    lr_max: float,
    lr_min: float,
    rho_max: float,
    rho_min: float,
) -> optax.Schedule:
  r"""GSAM's radius schedule: ρ_t follows the learning rate linearly.

  .. math::

    \rho_t = \rho_{\min} + (\rho_{\max} - \rho_{\min})\,
      \frac{\mathrm{lr}_t - \mathrm{lr}_{\min}}
           {\mathrm{lr}_{\max} - \mathrm{lr}_{\min}},

  clipped to :math:`[\rho_{\min}, \rho_{\max}]` (so a learning rate outside
  :math:`[\mathrm{lr}_{\min}, \mathrm{lr}_{\max}]`, e.g. a warm-up from 0
  above ``lr_min``, never gives a negative ρ). As in big_vision, ``lr_max ==
  lr_min`` gives the constant ``rho_max``.

  Pass the *same* schedule to the base optimizer and here: both are evaluated
  at the number of updates so far, so ρ_t is tied to the step's learning rate.

  Args:
    lr_schedule: the learning-rate schedule (or a constant).
    lr_max: the largest learning rate of the schedule (after warm-up).
    lr_min: the smallest (typically the final) learning rate.
    rho_max: ρ at ``lr_max``.
    rho_min: ρ at ``lr_min``.

  Returns:
    An Optax schedule ``count -> ρ`` for the ``rho`` argument of
    :func:`sam_optax.gsam` (or of any SAM variant).

  Examples:
    >>> import optax, sam_optax
    >>> lr = optax.linear_schedule(0.1, 0.0, transition_steps=100)
    >>> rho = sam_optax.gsam_rho_schedule(lr, lr_max=0.1, lr_min=0.0,
    ...                                   rho_max=0.6, rho_min=0.1)
    >>> [round(float(rho(t)), 3) for t in (0, 50, 100)]
    [0.6, 0.35, 0.1]
    >>> tx = sam_optax.gsam(optax.sgd(lr), rho=rho, alpha=0.6)

  References:
    Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
    <https://openreview.net/forum?id=edONMAnhLu->`_, ICLR 2022 (Algorithm 1;
    google-research/big_vision ``trainers/proj/gsam/gsam.py``).
  """
  for name, value in (("lr_max", lr_max), ("lr_min", lr_min),
                      ("rho_max", rho_max), ("rho_min", rho_min)):
    _validation.check_non_negative(name, value)
  if lr_max < lr_min:
    raise ValueError(f"lr_max ({lr_max}) must be >= lr_min ({lr_min}).")
  low, high = min(rho_min, rho_max), max(rho_min, rho_max)

  def schedule(count):
    if lr_max == lr_min:
      return jnp.asarray(rho_max, jnp.float32)
    lr = lr_schedule(count) if callable(lr_schedule) else lr_schedule
    lr = jnp.asarray(lr, jnp.float32)
    rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    return jnp.clip(rho, low, high)

  return schedule


def gsam(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    alpha: float | jax.Array = 0.3,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    *,
    eps: float | jax.Array = 1e-12,
    mask: Any = None,
    adaptive_mask: Any = None,
    axis_name: Any = None,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate-Gap Guided SAM (GSAM).

  SAM minimises the perturbed loss :math:`f_p(w) = L(w + \epsilon)`. GSAM
  also minimises the surrogate gap :math:`h = f_p - L`, a measure of
  sharpness, without changing the descent on :math:`f_p`: it decomposes the
  clean gradient :math:`g = \nabla L(w)` into its components parallel and
  orthogonal to :math:`g_{\rm SAM} = \nabla L(w + \epsilon)` and *ascends* L
  along the orthogonal one:

  .. math::

    g_\parallel = \langle g, \hat g_{\rm SAM}\rangle\, \hat g_{\rm SAM},
    \quad \hat g_{\rm SAM} = \frac{g_{\rm SAM}}{\|g_{\rm SAM}\|_2},
    \qquad g_\perp = g - g_\parallel,

  .. math::

    g_{\rm GSAM} = g_{\rm SAM} - \alpha\, g_\perp,

  which the base optimizer applies at ``w``. ε is SAM's (or ASAM's,
  ``adaptive=True``), from :func:`sam_optax.sam_gradient`. ``alpha = 0`` is
  SAM. The paper ties ρ to the learning rate: see
  :func:`sam_optax.gsam_rho_schedule`.

  This is big_vision's ``gsam_gradient`` with ``minimize_fp=True`` (the
  original GSAM), with two differences: a zero :math:`g_{\rm SAM}` gives
  :math:`g_\parallel = 0` instead of NaN, and ``adaptive=True`` is ASAM's
  :math:`T = |w| + \eta` scaling (big_vision's ``adaptive_perturbation``
  uses :math:`\epsilon = \rho |w| g / \|g\|`).

  Args:
    base_tx: the optimizer that applies :math:`g_{\rm GSAM}` (as in
      :func:`sam_optax.sam`, it wraps the whole base pipeline).
    rho: the radius ρ ≥ 0 or a schedule of the step, e.g.
      :func:`sam_optax.gsam_rho_schedule`. The official ViT config ramps it
      from 0.6 down to 0.1 with the learning rate.
    alpha: α ≥ 0, the weight of the surrogate-gap term (paper: 0.01 to 0.3
      on ResNets, 0.6 in the official ViT-B/32 config).
    adaptive: ``True`` for ASAM's perturbation.
    eta: ASAM's η.
    eps: added to the norm in the ascent denominator; zero gradients are
      safe whatever its value.
    mask: which leaves are perturbed (as in :func:`sam_optax.sam`). The
      decomposition uses the whole gradient.
    adaptive_mask: with ``adaptive=True``, which leaves use
      :math:`T = |w| + \eta`.
    axis_name: data parallelism under ``pmap``/``shard_map``: each device
      uses its local :math:`g_i` and :math:`g_{{\rm SAM},i}` (per-device
      ascent *and* decomposition, as big_vision, which leaves the ``pmean``
      to the caller) and the GSAM gradients are averaged with ``lax.pmean``.
      Pass local gradients (under ``shard_map``, w.r.t.
      :func:`sam_optax.mark_varying` params).
    has_aux: ``grad_fn`` returns ``(gradient, aux)``; ``aux`` is dropped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.SAMState` (``perturbed_loss`` and ``sharpness`` are
    ``None``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> loss = lambda w: jnp.sum(w ** 2 * jnp.array([1.0, 10.0]))
    >>> tx = sam_optax.gsam(optax.sgd(0.01), rho=0.05, alpha=0.3)
    >>> params = jnp.array([1.0, 1.0])
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                              grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 1e-2)
    True

  References:
    Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
    <https://openreview.net/forum?id=edONMAnhLu->`_, ICLR 2022; reference
    code google-research/big_vision, ``big_vision/trainers/proj/gsam/
    gsam.py`` (``g_gsam = g_robust - alpha * (g_clean - proj)``).
  """
  base_tx = _validation.check_base(base_tx)
  for name, value in (("rho", rho), ("alpha", alpha), ("eta", eta),
                      ("eps", eps)):
    _validation.check_non_negative(name, value)
  _validation.check_bools(adaptive=adaptive, has_aux=has_aux)

  def init_fn(params):
    scalar = jnp.zeros([], jnp.float32)
    return _sam.SAMState(
        sam_count=jnp.zeros([], jnp.int32), base_state=base_tx.init(params),
        grad_norm=scalar, perturbation_norm=scalar, perturbed_loss=None,
        sharpness=None)

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    _validation.check_call("gsam", grad_fn, params)
    grads = _gradient.conform_to_params(updates, params,
                                        "The gradient passed to gsam")
    rho_t = _validation.rho_at(rho, state.sam_count, state.base_state)
    g_sam, (grad_norm, perturbation_norm) = _local_sam_gradient(
        _drop_aux(grad_fn, has_aux), params, grads, rho_t, adaptive=adaptive,
        eta=eta, eps=eps, mask=mask, adaptive_mask=adaptive_mask,
        axis_name=axis_name, what="gsam")
    g_sam32 = _to_compute(g_sam)
    g_perp = _reject(_to_compute(grads), g_sam32)
    alpha32 = jnp.asarray(alpha).astype(jnp.float32)
    g_gsam = _pmean(_add_scaled(g_sam32, -alpha32, g_perp), axis_name)
    g_gsam = optax.tree.cast_like(g_gsam, grads)
    new_updates, base_state = base_tx.update(
        g_gsam, state.base_state, params, **extra_args)
    return new_updates, _sam.SAMState(
        sam_count=optax.safe_increment(state.sam_count),
        base_state=base_state, grad_norm=grad_norm,
        perturbation_norm=perturbation_norm, perturbed_loss=None,
        sharpness=None)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# LookSAM.


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    sam_count: number of ``update`` calls; a SAM gradient is computed when
      ``sam_count % k == 0``.
    base_state: the wrapped optimizer's state.
    orthogonal_grad: the cached :math:`g_v`, the part of the last SAM
      gradient orthogonal to the clean gradient (params' structure, float32
      or float64; averaged over devices under ``axis_name``).
    grad_norm: ‖g‖₂ of the last clean gradient over the perturbed leaves
      (averaged over devices).
    perturbation_norm: the achieved ‖ε‖₂ of the last step; 0 on the steps
      that reuse :math:`g_v`, so it also shows which steps computed SAM.
  """

  sam_count: jax.Array  # shape=(), dtype=jnp.int32
  base_state: optax.OptState
  orthogonal_grad: Any  # like params, float32 (float64 for float64 leaves)
  grad_norm: jax.Array  # shape=(), dtype=jnp.float32
  perturbation_norm: jax.Array  # shape=(), dtype=jnp.float32


def _check_period(k: Any) -> None:
  if isinstance(k, jax.core.Tracer):
    return
  if isinstance(k, (bool, np.bool_)) or not isinstance(
      k, (numbers.Integral, np.integer, np.ndarray, jax.Array)):
    raise TypeError(f"`k` must be a positive int, got {k!r}.")
  arr = np.asarray(k)
  if arr.shape != () or not np.issubdtype(arr.dtype, np.integer) or arr < 1:
    raise ValueError(f"`k` must be a positive int, got {k!r}.")


def looksam(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: float | jax.Array = 0.7,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    *,
    eps: float | jax.Array = 1e-12,
    mask: Any = None,
    adaptive_mask: Any = None,
    axis_name: Any = None,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: a SAM gradient every ``k`` steps, reused in between.

  Every ``k``-th step (``count % k == 0``, the first step included) computes
  the SAM gradient :math:`g_s = \nabla L(w + \epsilon)` and caches its
  component orthogonal to the clean gradient :math:`g`,

  .. math::

    g_v = g_s - \frac{\langle g_s, g\rangle}{\|g\|_2^2}\, g,

  and hands :math:`g_s` to the base optimizer. The other steps do **not**
  call ``grad_fn`` and use

  .. math::

    g + \alpha\, \frac{\|g\|_2}{\|g_v\|_2}\, g_v.

  The choice is a ``lax.cond``, so under ``jax.jit`` the skipped steps really
  skip the second forward and backward pass: a step costs about
  :math:`(k + 1)/k` plain steps instead of 2. ``k = 1`` is SAM;
  ``alpha = 0`` is "SAM every k steps" (the base optimizer on the clean
  gradient in between). The cached :math:`g_v` is one param-sized float32
  buffer in the state.

  Args:
    base_tx: the optimizer that applies the gradient.
    rho: the radius ρ ≥ 0 or a schedule of the step.
    k: the period: a SAM gradient every ``k`` updates (paper: 5 to 10).
    alpha: α ≥ 0, the weight of the reused direction (paper: 0.7).
    adaptive: ``True`` for ASAM's perturbation.
    eta: ASAM's η.
    eps: added to the norm in the ascent denominator; zero gradients (and a
      zero :math:`g_v`) give finite updates whatever its value.
    mask: which leaves are perturbed (as in :func:`sam_optax.sam`); the
      decomposition uses the whole gradient.
    adaptive_mask: with ``adaptive=True``, which leaves use
      :math:`T = |w| + \eta`.
    axis_name: data parallelism under ``pmap``/``shard_map``: per-device
      ascent as in :func:`sam_optax.sam`, the SAM gradients averaged;
      :math:`g_v` is built from the *averaged* :math:`g` and :math:`g_s` (so
      the state stays replicated); on the reuse steps each device forms
      :math:`g_i + \alpha \|g_i\|/\|g_v\|\, g_v` and the results are
      averaged.
    has_aux: ``grad_fn`` returns ``(gradient, aux)``; ``aux`` is dropped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.LookSAMState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.looksam(optax.sgd(0.1), rho=0.05, k=5)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                              grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(50):
    ...   params, state = step(params, state)
    >>> params.round(2)
    Array([1., 1., 1.], dtype=float32)

  .. note::
    Under ``jax.vmap`` a ``lax.cond`` with a batched predicate becomes a
    ``select`` and both branches run. The predicate here depends only on the
    step count, so vmapping over data or micro-batches keeps the saving.

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022 (Algorithm 1).
  """
  base_tx = _validation.check_base(base_tx)
  for name, value in (("rho", rho), ("alpha", alpha), ("eta", eta),
                      ("eps", eps)):
    _validation.check_non_negative(name, value)
  _check_period(k)
  _validation.check_bools(adaptive=adaptive, has_aux=has_aux)

  def init_fn(params):
    scalar = jnp.zeros([], jnp.float32)
    return LookSAMState(
        sam_count=jnp.zeros([], jnp.int32), base_state=base_tx.init(params),
        orthogonal_grad=_to_compute(optax.tree.zeros_like(params)),
        grad_norm=scalar, perturbation_norm=scalar)

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    grads = _checked_grads("looksam", updates, params, grad_fn, axis_name)
    rho_t = _validation.rho_at(rho, state.sam_count, state.base_state)
    g32 = _to_compute(grads)

    def sam_step():
      g_s, info = _gradient.sam_gradient(
          _drop_aux(grad_fn, has_aux), params, grads, rho_t, adaptive, eta,
          eps=eps, mask=mask, adaptive_mask=adaptive_mask,
          axis_name=axis_name)  # g_s, and the norms, averaged over devices.
      g_s32 = _to_compute(g_s)
      g_v = _reject(g_s32, _pmean(g32, axis_name))
      g_v = optax.tree.cast_like(g_v, state.orthogonal_grad)
      return g_s32, g_v, info.grad_norm, info.perturbation_norm

    def reuse_step():
      g_v = state.orthogonal_grad
      scale = _safe_div(_norm(g32), _norm(g_v))
      alpha32 = jnp.asarray(alpha).astype(jnp.float32)
      direction = _pmean(_add_scaled(g32, alpha32 * scale, g_v), axis_name)
      # ‖g‖ over the perturbed leaves, as SAMState logs it (ρ = 0: no ε).
      grad_norm = _perturbation.ascent_direction(
          grads, params, 0.0, mask=mask).grad_norm
      return (direction, g_v, _pmean(grad_norm, axis_name),
              jnp.zeros([], jnp.float32))

    period = jnp.asarray(k).astype(jnp.int32)
    is_sam_step = jnp.remainder(state.sam_count, period) == 0
    direction, g_v, grad_norm, perturbation_norm = lax.cond(
        is_sam_step, sam_step, reuse_step)
    direction = optax.tree.cast_like(direction, grads)
    new_updates, base_state = base_tx.update(
        direction, state.base_state, params, **extra_args)
    return new_updates, LookSAMState(
        sam_count=optax.safe_increment(state.sam_count),
        base_state=base_state, orthogonal_grad=g_v, grad_norm=grad_norm,
        perturbation_norm=perturbation_norm)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# Friendly-SAM.


class FriendlySAMState(NamedTuple):
  """State of :func:`friendly_sam`.

  Attributes:
    sam_count: number of ``update`` calls.
    base_state: the wrapped optimizer's state.
    grad_ema: the exponential moving average :math:`m` of the clean
      gradients (params' structure, float32 or float64; of the
      device-averaged gradients under ``axis_name``).
    grad_norm: ‖g − σm‖₂ of the last ascent direction over the perturbed
      leaves (averaged over devices).
    perturbation_norm: the last achieved ‖ε‖₂ (averaged over devices).
  """

  sam_count: jax.Array  # shape=(), dtype=jnp.int32
  base_state: optax.OptState
  grad_ema: Any  # like params, float32 (float64 for float64 leaves)
  grad_norm: jax.Array  # shape=(), dtype=jnp.float32
  perturbation_norm: jax.Array  # shape=(), dtype=jnp.float32


def friendly_sam(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    sigma: float | jax.Array = 1.0,
    lmbda: float | jax.Array = 0.9,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    *,
    eps: float | jax.Array = 1e-12,
    mask: Any = None,
    adaptive_mask: Any = None,
    axis_name: Any = None,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly-SAM (F-SAM): ascend along the batch-specific gradient noise.

  F-SAM observes that the full-gradient component of SAM's ascent direction
  does not help generalisation, and removes an estimate of it, an
  exponential moving average :math:`m` of past gradients, before the ascent:

  .. math::

    d_t = g_t - \sigma\, m_{t-1}, \qquad
    \epsilon = \rho\, \frac{d_t}{\|d_t\|_2 + \mathrm{eps}},

  .. math::

    m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t \quad (m_0 = g_0,
    \text{ and } d_0 = g_0),

  then hands :math:`\nabla L(w + \epsilon)` to the base optimizer, as SAM
  does. ``sigma = 0`` is SAM. The EMA is one param-sized float32 buffer in
  the state.

  Args:
    base_tx: the optimizer that applies the SAM gradient.
    rho: the radius ρ ≥ 0 or a schedule of the step.
    sigma: σ ≥ 0, how much of the EMA is removed (official code: 1).
    lmbda: λ in [0, 1], the EMA's decay (official code: 0.9 by default,
      0.6 to 0.95 in its CIFAR runs).
    adaptive: ``True`` for ASAM's perturbation (the official code's
      ``adaptive`` is ASAM with η = 0).
    eta: ASAM's η.
    eps: added to the norm in the ascent denominator.
    mask: which leaves are perturbed (as in :func:`sam_optax.sam`).
    adaptive_mask: with ``adaptive=True``, which leaves use
      :math:`T = |w| + \eta`.
    axis_name: data parallelism: each device ascends along its own
      :math:`g_i - \sigma m` and the SAM gradients are averaged, as in
      :func:`sam_optax.sam`; :math:`m` tracks the device-averaged gradient
      (one extra ``pmean`` of the gradient), so the state stays replicated.
    has_aux: ``grad_fn`` returns ``(gradient, aux)``; ``aux`` is dropped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.FriendlySAMState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.friendly_sam(optax.sgd(0.1), rho=0.05, lmbda=0.9)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                              grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(jnp.zeros(3), tx.init(jnp.zeros(3)))
    >>> state.grad_ema  # m_0 = g_0 (and the first ascent is SAM's)
    Array([-2., -2., -2.], dtype=float32)
    >>> params, state = step(params, state)
    >>> state.grad_ema.round(4)  # 0.9 m_0 + 0.1 g_1
    Array([-1.9588, -1.9588, -1.9588], dtype=float32)

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024 (official code:
    nblt/F-SAM, ``FriendlySAM`` in ``utils.py``).
  """
  base_tx = _validation.check_base(base_tx)
  for name, value in (("rho", rho), ("sigma", sigma), ("eta", eta),
                      ("eps", eps)):
    _validation.check_non_negative(name, value)
  _check_fraction("lmbda", lmbda)
  _validation.check_bools(adaptive=adaptive, has_aux=has_aux)

  def init_fn(params):
    scalar = jnp.zeros([], jnp.float32)
    return FriendlySAMState(
        sam_count=jnp.zeros([], jnp.int32), base_state=base_tx.init(params),
        grad_ema=_to_compute(optax.tree.zeros_like(params)),
        grad_norm=scalar, perturbation_norm=scalar)

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    grads = _checked_grads("friendly_sam", updates, params, grad_fn, axis_name)
    rho_t = _validation.rho_at(rho, state.sam_count, state.base_state)
    g32 = _to_compute(grads)
    m = state.grad_ema
    sigma32 = jnp.asarray(sigma).astype(jnp.float32)
    ascent = _add_scaled(g32, -sigma32, m)  # m = 0 at the first step.
    g_sam, info = _gradient.sam_gradient(
        _drop_aux(grad_fn, has_aux), params, ascent, rho_t, adaptive, eta,
        eps=eps, mask=mask, adaptive_mask=adaptive_mask, axis_name=axis_name)
    g_sam = optax.tree.cast_like(g_sam, grads)
    lmbda32 = jnp.asarray(lmbda).astype(jnp.float32)
    mean_g = _pmean(g32, axis_name)
    first = state.sam_count == 0
    new_m = jax.tree.map(
        lambda mi, gi: jnp.where(
            first, gi, lmbda32.astype(gi.dtype) * mi
            + (1 - lmbda32).astype(gi.dtype) * gi).astype(mi.dtype)
        if _is_float(mi) else mi, m, mean_g)
    new_updates, base_state = base_tx.update(
        g_sam, state.base_state, params, **extra_args)
    return new_updates, FriendlySAMState(
        sam_count=optax.safe_increment(state.sam_count),
        base_state=base_state, grad_ema=new_m, grad_norm=info.grad_norm,
        perturbation_norm=info.perturbation_norm)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
