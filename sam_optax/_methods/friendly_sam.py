"""Friendly-SAM: ascend along the batch-specific gradient (Li et al., 2024)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import skeleton as _skeleton
from sam_optax._core import tree as _tree
from sam_optax._core import validation as _validation


class FriendlySAMState(NamedTuple):
  """What :func:`friendly_sam` keeps between steps (``SAMState.method_state``).

  Attributes:
    grad_ema: the exponential moving average :math:`m` of the clean
      gradients (params' structure, float32 or float64; of the
      device-averaged gradients under ``axis_name``).
  """

  grad_ema: Any  # like params, float32 (float64 for float64 leaves)


@_skeleton.takes_sam_options
def friendly_sam(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    sigma: float | jax.Array = 1.0,
    decay: float | jax.Array = 0.9,
    **options: Any,
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
    decay: λ in [0, 1], the EMA's decay (official code: 0.9 by default,
      0.6 to 0.95 in its CIFAR runs).
    **options: ``sam``'s options (``adaptive``, ``eta``, ``eps``, ``mask``,
      ``adaptive_mask``, ``axis_name``, ``has_aux``, ``value_and_grad``,
      ``perturb_in_float32``, ``exact_norms``), as in :func:`sam_optax.sam`.
      (The official code's ``adaptive`` is ASAM with η = 0.) Under
      ``axis_name`` each device ascends along its own :math:`g_i - \sigma m`
      and the SAM gradients are averaged, as in :func:`sam_optax.sam`;
      :math:`m` tracks the device-averaged gradient (averaged in the same
      collective as the SAM gradient), so the state stays replicated.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.SAMState` whose ``method_state`` is a
    :class:`sam_optax.FriendlySAMState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.friendly_sam(optax.sgd(0.1), rho=0.05, decay=0.9)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                              grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(jnp.zeros(3), tx.init(jnp.zeros(3)))
    >>> state.method_state.grad_ema  # m_0 = g_0 (and the first ascent is SAM's)
    Array([-2., -2., -2.], dtype=float32)
    >>> params, state = step(params, state)
    >>> state.method_state.grad_ema.round(4)  # 0.9 m_0 + 0.1 g_1
    Array([-1.9588, -1.9588, -1.9588], dtype=float32)

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024 (official code:
    nblt/F-SAM, ``FriendlySAM`` in ``utils.py``).
  """
  _validation.check_non_negative("sigma", sigma)
  _validation.check_fraction("decay", decay)

  def init_method_state(params):
    return FriendlySAMState(_tree.to_compute(optax.tree.zeros_like(params)))

  def rule(step, method_state):
    g, m = _tree.to_compute(step.grads), method_state.grad_ema
    ascent = _tree.add_scale(g, -jnp.asarray(sigma, jnp.float32), m)
    g_sam, info = step.local_sam_gradient(ascent)
    (g_sam, mean_g), info = step.pmean_with_info((g_sam, g), info)
    return g_sam, next_state(step, method_state, mean_g), info

  def next_state(step, method_state, mean_g):
    m = method_state.grad_ema
    decay32 = jnp.asarray(decay, jnp.float32)
    new_m = optax.tree.where(step.step_count == 0, mean_g,
                             optax.tree.update_moment(mean_g, m, decay32, 1))
    return FriendlySAMState(optax.tree.cast_like(new_m, m))

  return _skeleton.variant("friendly_sam", base_tx, rule, rho, options,
                           init_method_state=init_method_state,
                           zero_radius=next_state)
