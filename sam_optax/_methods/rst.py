"""RST: SAM with probability p, else the base step (Zhao et al.)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sam_optax._core import skeleton as _skeleton
from sam_optax._core import validation as _validation


class RSTState(NamedTuple):
  """What :func:`rst` keeps between steps (``SAMState.method_state``).

  Attributes:
    key: the PRNG key of the coin flips (``jax.random.PRNGKey``): step
      ``t`` uses ``jax.random.fold_in(key, t)``.
  """

  key: jax.Array  # shape=(2,), dtype=jnp.uint32


def sam_drawn(key: jax.Array, step: Any, probability: Any) -> jax.Array:
  """Whether step ``step`` computes SAM: a Bernoulli(p) draw."""
  return jax.random.bernoulli(jax.random.fold_in(key, step),
                              jnp.asarray(probability, jnp.float32))


@_skeleton.takes_sam_options
def rst(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    probability: optax.ScalarOrSchedule = 0.5,
    seed: int | jax.Array = 0,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Randomized sharpness-aware training (RST): SAM with probability p.

  Each step flips a coin: with probability :math:`p_t` it hands the base
  optimizer the SAM gradient :math:`\nabla L(w + \epsilon)` (as
  :func:`sam_optax.sam`), otherwise the clean gradient :math:`g`. The choice
  is a ``lax.cond``, so under ``jax.jit`` the base steps do **not** call
  ``grad_fn``: a step costs :math:`1 + p` gradients on average. The coins
  come from a PRNG key kept in the state (``fold_in(key, step)``), so runs
  are reproducible and, under ``axis_name``, every device makes the same
  choice.

  Args:
    base_tx: the optimizer that applies the gradient.
    rho: the radius ρ ≥ 0 or a schedule of the step.
    probability: :math:`p \in [0, 1]`, or a schedule of the step (the paper
      studies constant, linear and other schedules, e.g.
      ``optax.linear_schedule(0.0, 1.0, total_steps)``; ``p = 0.5`` halves
      SAM's extra cost).
    seed: the seed of the PRNG key kept in the state (an int).
    **options: ``sam``'s options (``adaptive``, ``eta``, ``eps``, ``mask``,
      ``adaptive_mask``, ``axis_name``, ``has_aux``, ``value_and_grad``,
      ``perturb_in_float32``, ``exact_norms``), as in :func:`sam_optax.sam`.
      Under ``axis_name`` the SAM steps are :func:`sam_optax.sam`'s
      (per-device ε, SAM gradients averaged) and the base steps average the
      clean gradients.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.SAMState` whose ``method_state`` is a
    :class:`sam_optax.RSTState`. Its ``radius`` is 0 on the base steps, so
    it also shows which steps computed SAM.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> grad = jax.grad(lambda w: jnp.sum((w - 1.0) ** 2))
    >>> tx = sam_optax.rst(optax.sgd(0.1), rho=0.05, probability=0.5)
    >>> step = jax.jit(lambda w, s: tx.update(grad(w), s, w, grad_fn=grad))
    >>> w, state, radii = jnp.zeros(3), tx.init(jnp.zeros(3)), []
    >>> for _ in range(8):
    ...   updates, state = step(w, state)
    ...   w = optax.apply_updates(w, updates)
    ...   radii.append(round(float(state.radius), 2))
    >>> radii  # SAM where the coin said so (radius 0: a base step).
    [0.0, 0.05, 0.0, 0.05, 0.05, 0.0, 0.0, 0.05]

  References:
    Zhao, Zhang and Hu, `Randomized Sharpness-Aware Training for Boosting
    Computational Efficiency in Deep Learning
    <https://arxiv.org/abs/2203.09962>`_, 2022 (also SS-SAM).
  """
  if not callable(probability):
    _validation.check_fraction("probability", probability)

  def init_method_state(params):
    del params
    return RSTState(jax.random.PRNGKey(jnp.asarray(seed).astype(jnp.int32)))

  def rule(step, method_state):
    p = _skeleton.rho_at(probability, step.step_count, step.base_state)

    def sam_step():
      g_sam, info = step.sam_gradient()
      return g_sam, info

    def base_step():
      return step.pmean_with_info(step.grads, step.info_without_ascent())

    g, info = lax.cond(sam_drawn(method_state.key, step.step_count, p),
                       sam_step, base_step)
    return g, method_state, info

  return _skeleton.variant("rst", base_tx, rule, rho, options,
                           init_method_state=init_method_state)
