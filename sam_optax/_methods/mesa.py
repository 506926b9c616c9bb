"""MESA: SAF's trajectory loss against an EMA teacher (Du et al., 2022)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import trajectory as _trajectory
from sam_optax._core import tree as _tree
from sam_optax._core import validation as _validation


class MESAState(NamedTuple):
  """State of :func:`mesa`.

  Attributes:
    count: the number of ``update`` calls.
    base_state: the base optimizer's state.
    teacher: the EMA of the weights after each update (params' structure,
      float32 or float64), starting at the initial params.
    trajectory_weight: λ for the next step's trajectory loss: λ from
      ``start_step`` on, 0 before.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  base_state: optax.OptState
  teacher: Any  # like params, float32 (float64 for float64 leaves)
  trajectory_weight: jax.Array  # shape=(), dtype=jnp.float32



def mesa(
    base_tx: optax.GradientTransformation,
    decay: float | jax.Array = 0.9998,
    lam: float | jax.Array = 0.3,
    start_step: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""MESA: the base optimizer, plus an EMA teacher for the trajectory loss.

  After each base update :math:`w_{t+1} = w_t + u_t` the teacher moves to

  .. math::

    v_{t+1} = \delta\, v_t + (1 - \delta)\, w_{t+1}, \qquad v_0 = w_0

  (``optax.tree.update_moment`` with order 1; timm's ``ModelEmaV2``, which
  the official code uses). The gradient the base optimizer receives is the
  caller's: MESA is one gradient per step, of

  .. math::

    L(w) + \lambda\, \tau^2\, \mathrm{KL}\big(
    \mathrm{softmax}(f(v; x)/\tau) \,\|\, \mathrm{softmax}(f(w; x)/\tau)\big)

  with the teacher's outputs :math:`f(v; x)` from one extra forward pass.
  The train step reads :func:`teacher_params` and
  ``state.trajectory_weight`` (λ from ``start_step`` on, else 0):

  .. code-block:: python

    teacher = sam_optax.teacher_params(state)
    lam = sam_optax.trajectory_weight(state)

    def loss_fn(params):
      logits = model.apply(params, x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + lam * sam_optax.trajectory_loss(
          logits, model.apply(teacher, x), temperature=5.0)

    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)

  (Put the teacher's forward pass under ``lax.cond(lam > 0, ...)`` to skip
  it before ``start_step``.) The teacher holds float32 copies of the
  params: one param-sized buffer. BatchNorm statistics are not params: keep
  their EMA next to the model state if the teacher should use its own.
  Under data parallelism, pass averaged gradients as for any Optax
  optimizer; the teacher then stays replicated.

  Args:
    base_tx: the optimizer.
    decay: δ in [0, 1], the EMA decay per step (official code: 0.9998 for
      ImageNet-scale runs; shorter runs need a shorter memory, e.g. 0.99).
    lam: λ ≥ 0, the weight of the trajectory loss (official code: 0.3 for
      MESA).
    start_step: the first step (``count``) with λ > 0; the paper's
      :math:`E_{\rm start}` epochs times the steps per epoch (the official
      code starts after epoch 5, i.e. at ``6 * steps_per_epoch``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`MESAState`.

  Examples:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = sam_optax.mesa(optax.sgd(1.0), decay=0.5, lam=0.3, start_step=1)
    >>> w = jnp.array([4.0])
    >>> state = tx.init(w)
    >>> float(sam_optax.trajectory_weight(state))  # Not started yet.
    0.0
    >>> updates, state = tx.update(jnp.array([2.0]), state, w)
    >>> w = optax.apply_updates(w, updates)  # w = 2
    >>> sam_optax.teacher_params(state)  # 0.5 * 4 + 0.5 * 2
    Array([3.], dtype=float32)
    >>> round(float(sam_optax.trajectory_weight(state)), 2)
    0.3

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022 (MESA, Eq. 7-8;
    official code AngusDujw/SAF, ``MESA_train.py``).
  """
  base_tx = _validation.check_base(base_tx)
  _validation.check_fraction("decay", decay)
  _validation.check_non_negative("lam", lam)
  _validation.check_non_negative("start_step", start_step)

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    return MESAState(
        count=count, base_state=base_tx.init(params),
        teacher=_tree.to_compute(params),
        trajectory_weight=_trajectory.weight_from(count >= start_step, lam))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "mesa needs the params to move the teacher: tx.update(grads, "
          "state, params).")
    updates, base_state = base_tx.update(updates, state.base_state, params,
                                         **extra_args)
    new_params = _tree.to_compute(optax.apply_updates(params, updates))
    teacher = optax.tree.update_moment(
        new_params, state.teacher, jnp.asarray(decay, jnp.float32), 1)
    teacher = optax.tree.cast_like(teacher, state.teacher)
    count = optax.safe_increment(state.count)
    return updates, MESAState(count, base_state, teacher,
                              _trajectory.weight_from(count >= start_step, lam))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)



def teacher_params(state: Any) -> Any:
  """MESA's teacher: the EMA weights in ``state`` (wherever it sits).

  ``state`` is the whole optimizer state (``optax.chain``,
  ``optax.inject_hyperparams``, ... are searched, like
  :func:`sam_optax.eval_params`). Returns float32 (float64) params.
  """
  return _trajectory.find_state(state, MESAState, "teacher_params").teacher


