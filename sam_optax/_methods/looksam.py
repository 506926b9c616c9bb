"""LookSAM: a SAM gradient every k steps, reused in between (Liu et al.)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sam_optax._core import skeleton as _skeleton
from sam_optax._core import tree as _tree
from sam_optax._core import validation as _validation


class LookSAMState(NamedTuple):
  r"""What :func:`looksam` keeps between steps (``SAMState.method_state``).

  Attributes:
    orthogonal_grad: the cached :math:`g_v`, the part of the last SAM
      gradient orthogonal to the clean gradient (params' structure, float32
      or float64; built from device-averaged gradients under ``axis_name``).
    orthogonal_norm: :math:`\|g_v\|_2`, cached with it (so that the reuse
      steps do not read :math:`g_v` twice).
  """

  orthogonal_grad: Any  # like params, float32 (float64 for float64 leaves)
  orthogonal_norm: Any = None  # shape=(), float32 (float64 with float64)


@_skeleton.takes_sam_options
def looksam(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    every_k: int = 5,
    alpha: float | jax.Array = 0.7,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: a SAM gradient every ``every_k`` steps, reused in between.

  Every ``every_k``-th step (``step_count % every_k == 0``, the first step
  included) computes
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
  :math:`(k + 1)/k` plain steps instead of 2 (:math:`k` = ``every_k``).
  ``every_k = 1`` is SAM; ``alpha = 0`` is "SAM every k steps" (the base
  optimizer on the clean
  gradient in between). The cached :math:`g_v` is one param-sized float32
  buffer in the state.

  Args:
    base_tx: the optimizer that applies the gradient.
    rho: the radius ρ ≥ 0 or a schedule of the step.
    every_k: the period: a SAM gradient every ``every_k`` updates (paper:
      5 to 10).
    alpha: α ≥ 0, the weight of the reused direction (paper: 0.7).
    **options: ``sam``'s options (``adaptive``, ``eta``, ``eps``, ``mask``,
      ``adaptive_mask``, ``axis_name``, ``has_aux``, ``value_and_grad``,
      ``perturb_in_float32``, ``exact_norms``), as in :func:`sam_optax.sam`.
      ``mask`` selects the perturbed leaves; the decomposition uses the whole
      gradient. Under ``axis_name``: per-device ascent as in
      :func:`sam_optax.sam`, the SAM gradients averaged; :math:`g_v` is built
      from the *averaged* :math:`g` and :math:`g_s` (so the state stays
      replicated); on the reuse steps each device forms
      :math:`g_i + \alpha \|g_i\|/\|g_v\|\, g_v` and the results are
      averaged. With ``value_and_grad`` the reuse steps log a NaN perturbed
      loss (no perturbed pass ran).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.SAMState` whose ``method_state`` is a
    :class:`sam_optax.LookSAMState`. Its ``radius`` is 0 on the reuse steps,
    so it also shows which steps computed SAM.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> grad = jax.grad(lambda w: jnp.sum((w - 1.0) ** 2))
    >>> tx = sam_optax.looksam(optax.sgd(0.1), rho=0.05, every_k=3)
    >>> step = jax.jit(lambda w, s: tx.update(grad(w), s, w, grad_fn=grad))
    >>> w, state, radii = jnp.zeros(3), tx.init(jnp.zeros(3)), []
    >>> for _ in range(6):
    ...   updates, state = step(w, state)
    ...   w = optax.apply_updates(w, updates)
    ...   radii.append(round(float(state.radius), 2))
    >>> radii  # SAM on steps 0 and 3, g_v reused in between.
    [0.05, 0.0, 0.0, 0.05, 0.0, 0.0]

  .. note::
    Under ``jax.vmap`` a ``lax.cond`` with a batched predicate becomes a
    ``select`` and both branches run. The predicate here depends only on the
    step count, so vmapping over data or micro-batches keeps the saving.

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022 (Algorithm 1).
  """
  _validation.check_non_negative("alpha", alpha)
  _validation.check_positive_int("every_k", every_k)

  def init_method_state(params):
    cache = _tree.to_compute(optax.tree.zeros_like(params))
    return LookSAMState(cache, jnp.zeros([], _tree.accumulation_dtype(cache)))

  def rule(step, method_state):
    g = _tree.to_compute(step.grads)

    def sam_step():
      g_s, info = step.sam_gradient()
      g_s = _tree.to_compute(g_s)
      g_v = _tree.orthogonal_part(g_s, step.pmean(g))
      # At ρ = 0, g_v is rounding noise that the reuse steps would rescale
      # to α‖g‖: cache 0 instead, so that LookSAM is the base optimizer.
      g_v = _tree.add_scale(optax.tree.zeros_like(g_v), step.rho > 0, g_v)
      g_v = optax.tree.cast_like(g_v, method_state.orthogonal_grad)
      v_norm = _tree.norm(g_v).astype(method_state.orthogonal_norm.dtype)
      return g_s, LookSAMState(g_v, v_norm), info

    def reuse_step():
      g_v = method_state.orthogonal_grad
      scale = _tree.safe_div(_tree.norm(g), method_state.orthogonal_norm)
      direction = _tree.add_scale(
          g, jnp.asarray(alpha, jnp.float32) * scale, g_v)
      direction, info = step.pmean_with_info(direction,
                                             step.info_without_ascent())
      return direction, method_state, info

    period = jnp.asarray(every_k).astype(jnp.int32)
    return lax.cond(jnp.remainder(step.step_count, period) == 0, sam_step,
                    reuse_step)

  def zero_radius(step, method_state, mean_grads):
    del step, mean_grads  # A step with ρ = 0 caches no direction.
    return LookSAMState(optax.tree.zeros_like(method_state.orthogonal_grad),
                        jnp.zeros_like(method_state.orthogonal_norm))

  return _skeleton.variant("looksam", base_tx, rule, rho, options,
                           init_method_state=init_method_state,
                           zero_radius=zero_radius)
