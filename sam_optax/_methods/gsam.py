"""GSAM: SAM that also shrinks the surrogate gap (Zhuang et al., 2022)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import skeleton as _skeleton
from sam_optax._core import tree as _tree
from sam_optax._core import validation as _validation


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


@_skeleton.takes_sam_options
def gsam(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    alpha: float | jax.Array = 0.3,
    **options: Any,
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
    **options: ``sam``'s options (``adaptive``, ``eta``, ``eps``, ``mask``,
      ``adaptive_mask``, ``axis_name``, ``has_aux``, ``value_and_grad``,
      ``perturb_in_float32``, ``exact_norms``), as in :func:`sam_optax.sam`.
      ``mask`` selects the perturbed leaves; the decomposition uses the whole
      gradient. Under ``axis_name`` each device uses its local :math:`g_i`
      and :math:`g_{{\rm SAM},i}` (per-device ascent *and* decomposition,
      as big_vision, which leaves the ``pmean`` to the caller) and the GSAM
      gradients are averaged with ``lax.pmean``.

  Returns:
    A transformation whose state is a :class:`sam_optax.SAMState` with no
    ``method_state`` (GSAM keeps nothing between steps).

  Examples:
    One step from the same point: GSAM's update is SAM's plus α times the
    part of the clean gradient orthogonal to :math:`g_{\rm SAM}`.

    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> grad = jax.grad(lambda w: jnp.sum(w ** 2 * jnp.array([1.0, 10.0])))
    >>> w = jnp.array([1.0, 1.0])
    >>> def first_update(tx):
    ...   updates, _ = tx.update(grad(w), tx.init(w), w, grad_fn=grad)
    ...   return [round(float(u), 3) for u in updates]
    >>> sgd = optax.sgd(1.0)
    >>> first_update(sam_optax.sam(sgd, rho=0.1))
    [-2.02, -21.99]
    >>> first_update(sam_optax.gsam(sgd, rho=0.1, alpha=0.5))
    [-1.939, -21.997]

  References:
    Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
    <https://openreview.net/forum?id=edONMAnhLu->`_, ICLR 2022; reference
    code google-research/big_vision, ``big_vision/trainers/proj/gsam/
    gsam.py`` (``g_gsam = g_robust - alpha * (g_clean - proj)``).
  """
  _validation.check_non_negative("alpha", alpha)

  def rule(step, method_state):
    g_sam, info = step.local_sam_gradient()
    g_sam = _tree.to_compute(g_sam)
    g_perp = _tree.orthogonal_part(_tree.to_compute(step.grads), g_sam)
    # At ρ = 0, g_perp is rounding noise: drop it so that GSAM is exactly
    # the base optimizer there, as every method is.
    alpha_t = jnp.where(step.rho > 0, jnp.asarray(alpha, jnp.float32), 0.0)
    g_gsam = _tree.add_scale(g_sam, -alpha_t, g_perp)
    g_gsam, info = step.pmean_with_info(g_gsam, info)
    return g_gsam, method_state, info

  return _skeleton.variant("gsam", base_tx, rule, rho, options)
