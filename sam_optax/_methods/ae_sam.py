"""AE-SAM: SAM only where the gradient norm is large (Jiang et al.)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sam_optax._core import skeleton as _skeleton
from sam_optax._core import tree as _tree
from sam_optax._core import validation as _validation


class AESAMState(NamedTuple):
  r"""What :func:`ae_sam` keeps between steps (``SAMState.method_state``).

  Attributes:
    sq_norm_mean: :math:`\mu`, the running mean of :math:`\|g\|_2^2`.
    sq_norm_var: :math:`\sigma^2`, its running variance.
  """

  sq_norm_mean: jax.Array  # shape=(), dtype=jnp.float32
  sq_norm_var: jax.Array  # shape=(), dtype=jnp.float32


@_skeleton.takes_sam_options
def ae_sam(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    threshold: optax.ScalarOrSchedule = 0.0,
    decay: float | jax.Array = 0.9,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""AE-SAM: SAM on the steps whose gradient norm is unusually large.

  Models :math:`\|g_t\|_2^2` as Gaussian with a running mean and variance
  (exponential moving averages with decay δ, both starting at 0),

  .. math::

    \mu_t = \delta \mu_{t-1} + (1 - \delta) \|g_t\|^2, \qquad
    \sigma_t^2 = \delta \sigma_{t-1}^2 + (1 - \delta)
      (\|g_t\|^2 - \mu_t)^2,

  and hands the base optimizer the SAM gradient (as :func:`sam_optax.sam`)
  when :math:`\|g_t\|^2 \ge \mu_t + c_t \sigma_t` (a sharp region), the
  clean gradient otherwise. The choice is a ``lax.cond``: the base steps do
  not call ``grad_fn``. If :math:`\|g\|^2` were Gaussian, SAM would run on a
  fraction :math:`1 - \Phi(c_t)` of the steps; the paper decreases
  :math:`c_t` linearly from :math:`\lambda_2 = 1` to :math:`\lambda_1 = -1`
  over training (about 16% SAM at the start, 84% at the end, half on
  average): ``threshold=optax.linear_schedule(1.0, -1.0, total_steps)``.

  Args:
    base_tx: the optimizer that applies the gradient.
    rho: the radius ρ ≥ 0 or a schedule of the step.
    threshold: :math:`c_t`, a number or a schedule of the update count
      (default 0: SAM on about half the steps); may be negative.
    decay: δ in [0, 1], the decay of the running moments (paper: 0.9).
    **options: ``sam``'s options (``adaptive``, ``eta``, ``eps``, ``mask``,
      ``adaptive_mask``, ``axis_name``, ``has_aux``, ``value_and_grad``,
      ``perturb_in_float32``, ``exact_norms``), as in :func:`sam_optax.sam`.
      Under ``axis_name`` :math:`\|g\|^2` is the device-average of each
      device's :math:`\|g_i\|^2` (a scalar ``pmean``; the choice is the same
      on every device and the state stays replicated); the SAM steps are
      :func:`sam_optax.sam`'s, the base steps average the clean gradients.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.SAMState` whose ``method_state`` is a
    :class:`sam_optax.AESAMState`. Its ``radius`` is 0 on the base steps.

  Examples:
    On a converging run ‖g‖² keeps falling below its running mean, so after
    the first steps AE-SAM stops paying for the second gradient:

    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> grad = jax.grad(lambda w: jnp.sum((w - 1.0) ** 2))
    >>> tx = sam_optax.ae_sam(optax.sgd(0.1), rho=0.05, threshold=0.0,
    ...                       decay=0.5)
    >>> update = jax.jit(lambda w, s: tx.update(grad(w), s, w, grad_fn=grad))
    >>> params, state, sam_steps = jnp.zeros(3), tx.init(jnp.zeros(3)), []
    >>> while len(sam_steps) < 6:
    ...   updates, state = update(params, state)
    ...   params = optax.apply_updates(params, updates)
    ...   sam_steps.append(bool(state.radius > 0))
    >>> sam_steps
    [True, True, False, False, False, False]

  References:
    Jiang, Yang, Zhang and Kwok, `An Adaptive Policy to Employ
    Sharpness-Aware Minimization <https://arxiv.org/abs/2304.14647>`_, ICLR
    2023 (Algorithm 1).
  """
  _validation.check_fraction("decay", decay)

  def init_method_state(params):
    del params
    zero = jnp.zeros([], jnp.float32)
    return AESAMState(zero, zero)

  def moments(step, method_state):
    sq_norm = jnp.square(_tree.norm(step.grads)).astype(jnp.float32)
    sq_norm = step.pmean(sq_norm)
    d = jnp.asarray(decay, jnp.float32)
    mean = d * method_state.sq_norm_mean + (1 - d) * sq_norm
    var = d * method_state.sq_norm_var + (1 - d) * jnp.square(sq_norm - mean)
    return sq_norm, mean, var

  def zero_radius(step, method_state, mean_grads):
    del mean_grads  # The moments track every step's ‖g‖², as in `rule`.
    _, mean, var = moments(step, method_state)
    return AESAMState(mean, var)

  def rule(step, method_state):
    sq_norm, mean, var = moments(step, method_state)
    # Not rho_at: a threshold may be negative (the paper's ends at -1).
    c = threshold(step.step_count) if callable(threshold) else threshold
    use_sam = sq_norm >= mean + jnp.asarray(c, jnp.float32) * jnp.sqrt(var)

    def base_step():
      return step.pmean_with_info(step.grads, step.info_without_ascent())

    g, info = lax.cond(use_sam, step.sam_gradient, base_step)
    return g, AESAMState(mean, var), info

  return _skeleton.variant("ae_sam", base_tx, rule, rho, options,
                           init_method_state=init_method_state,
                           zero_radius=zero_radius)
