"""MSAM: SAM along the negative momentum, one gradient per step (Becker et
al.)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._core import eval_params as _eval_params
from sam_optax._core import gradient as _gradient
from sam_optax._core import skeleton as _skeleton
from sam_optax._core import tree as _tree
from sam_optax._core import validation as _validation

_MOMENTUM_NAMES = ("trace", "mu")


class MSAMState(NamedTuple):
  r"""What :func:`msam` keeps between steps (``SAMState.method_state``).

  Attributes:
    perturbation_scale: :math:`c = \rho / (\|v\|_2 + \text{eps})` of the
      perturbation the held params carry, :math:`\epsilon = -c\, v`, with
      :math:`v` the base optimizer's current momentum (0 before the first
      step: the first gradient is taken at :math:`w_0`).
    momentum_norm: :math:`\|v\|_2` (logged as the next step's
      ``ascent_norm``; kept so that no step norms the momentum twice).
  """

  perturbation_scale: jax.Array  # shape=(), dtype=jnp.float32
  momentum_norm: jax.Array  # shape=(), dtype=jnp.float32


def _momentum(base_state: Any, params: Any = None) -> Any:
  """The base optimizer's momentum buffer (its ``trace`` or ``mu``), checked
  to be shaped like ``params`` when they are given."""
  found = {}
  for name in _MOMENTUM_NAMES:
    try:
      value = optax.tree.get(base_state, name)
    except KeyError as error:
      raise ValueError(
          f"msam found several `{name}` fields in the base optimizer's "
          "state; keep one momentum in the base optimizer.") from error
    if value is not None:
      found[name] = value
  if len(found) != 1:
    raise ValueError(
        "msam perturbs along the base optimizer's momentum and needs exactly "
        f"one of the state fields {list(_MOMENTUM_NAMES)}; found "
        f"{sorted(found)}. Use e.g. optax.sgd(lr, momentum=0.9) (field "
        "`trace`) or optax.adam (field `mu`).")
  (name, value), = found.items()
  if params is not None:
    same = jax.tree.structure(value) == jax.tree.structure(params) and all(
        jnp.shape(v) == jnp.shape(p) for v, p in
        zip(jax.tree.leaves(value), jax.tree.leaves(params)))
    if not same:
      raise ValueError(
          f"msam perturbs along the base optimizer's momentum, but its "
          f"`{name}` field is not shaped like the params (e.g. optax.sm3 "
          "keeps per-axis accumulators in `mu`). Use a base optimizer "
          "whose momentum is param-shaped, e.g. optax.sgd(lr, "
          "momentum=0.9) or optax.adam.")
  return value


def _unperturb(sam_state: _skeleton.SAMState, params: Any) -> Any:
  """w = held + c v."""
  v = _momentum(sam_state.base_state)
  return jax.tree.map(
      lambda p, m: (_tree.to_compute(p) + sam_state.method_state
                    .perturbation_scale * _tree.to_compute(m)).astype(p.dtype),
      params, v)


def msam(
    base_tx: optax.GradientTransformation,
    rho: optax.ScalarOrSchedule = 0.3,
    *,
    weight_decay: float | jax.Array = 0.0,
    learning_rate: optax.ScalarOrSchedule | None = None,
    eps: float | jax.Array = 1e-12,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MSAM: a SAM-like step at SGD's cost, ascending along the momentum.

  MSAM replaces SAM's ascent direction (which costs a second gradient) by
  the base optimizer's momentum :math:`v` (``trace`` of ``optax.sgd``,
  ``mu`` of ``optax.adam``): the gradient is taken at

  .. math::

    \tilde w_t = w_t - \rho\, \frac{v_{t-1}}{\|v_{t-1}\|_2 + \text{eps}},

  and the base optimizer, fed :math:`\nabla L(\tilde w_t)`, updates the clean
  weights :math:`w_t \to w_{t+1}` (its momentum becomes :math:`v_t`). The
  perturbation is *against* the momentum: since :math:`v` accumulates past
  gradients, :math:`-v` is where the weights came from, which the paper finds
  a better ascent direction than the current gradient at large ρ.

  **Calling convention (drop-in, as the authors' and
  ``optax.contrib.schedule_free``):** the params your training loop holds
  are :math:`\tilde w`, the point where the one gradient is taken, so the
  train step is exactly a plain Optax step (no ``grad_fn``). Each ``update``
  moves them from :math:`\tilde w_t` to :math:`\tilde w_{t+1}`; the loop
  starts from :math:`w_0` (the momentum is 0, so :math:`\tilde w_0 = w_0`).

  .. warning::
    Evaluate and checkpoint ``sam_optax.eval_params(state, params)``, the
    clean :math:`w`, not the held params (they are perturbed by ρ).

  The momentum is the base optimizer's own buffer, read from its state (no
  extra param-sized state): with ``optax.chain(optax.add_decayed_weights(wd),
  optax.sgd(lr, momentum))`` this is step for step the authors' ``MSAM``
  (weight decay of the held params, as theirs). Their ``AdamW_MSAM`` decays
  the *clean* weights after the Adam step, :math:`w_{t+1} = (w_t + u_t)(1 -
  \eta_t \lambda)`: use ``optax.adam`` as the base with ``weight_decay=λ`` and
  ``learning_rate=η`` here (``optax.adamw`` as the base instead decays the
  held weights, before the step: close, not equal).

  Args:
    base_tx: the optimizer; its state must hold one momentum buffer, a field
      ``trace`` (``optax.sgd(..., momentum=...)``, ``optax.trace``) or ``mu``
      (``optax.adam``, ``optax.lion``, ...).
    rho: the radius ρ ≥ 0 or a schedule of the step (the authors' configs:
      3 for CIFAR ResNets/WRNs with SGD, 0.3 for ImageNet; their default
      0.3).
    weight_decay: λ of the decoupled weight decay of the clean weights after
      the base step (``AdamW_MSAM``'s); 0 for none.
    learning_rate: η (number or schedule of the step) multiplying
      ``weight_decay``; required when ``weight_decay`` is not 0.
    eps: added to :math:`\|v\|_2` (the authors' 1e-12).
    axis_name: the data-parallel axis of ``pmap``/``shard_map``: the
      gradient passed to ``update`` is this device's and is averaged over
      the axis (one ``pmean``), so the momentum, ε and the held params stay
      replicated.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.SAMState` whose ``method_state`` is a
    :class:`sam_optax.MSAMState`. Its ``radius`` is the norm of the ε at
    which this step's gradient was taken (0 on the first step) and
    ``ascent_norm`` is :math:`\|v_{t-1}\|_2`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.5)
    >>> @jax.jit
    ... def step(params, state):  # A plain Optax step: no grad_fn.
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   params, state = step(params, state)
    >>> clean = sam_optax.eval_params(state, params)
    >>> float(jnp.linalg.norm(params - clean))  # the held params carry ε
    0.5
    >>> clean.round(4)
    Array([0.7471, 0.7471], dtype=float32)

  References:
    Becker, Altrock and Risse, `Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead <https://arxiv.org/abs/2401.12033>`_,
    2024 (official code: MarlonBecker/MSAM, ``optimizer/msam.py`` and
    ``optimizer/adamW_msam.py``).
  """
  _validation.check_non_negative("weight_decay", weight_decay)
  if (learning_rate is None and not isinstance(weight_decay, jax.core.Tracer)
      and np.any(np.asarray(weight_decay) != 0)):
    raise ValueError("msam: weight_decay needs the learning_rate it is "
                     "scaled by (learning_rate=...).")

  def rule(step, method_state):
    v_norm = method_state.momentum_norm
    radius = method_state.perturbation_scale * v_norm
    info = _gradient.SAMInfo(v_norm, radius, None, None, None)
    return step.pmean(step.grads), method_state, info

  def finish(step, updates, base_state, method_state):
    v_old = _momentum(step.base_state)
    v_new = _momentum(base_state)
    c_old = method_state.perturbation_scale
    v_norm = _tree.norm(v_new).astype(jnp.float32)
    c_new = jnp.asarray(step.rho, jnp.float32) / (  # ε = -c v
        v_norm + jnp.asarray(eps, jnp.float32))
    u = _tree.to_compute(updates)
    if learning_rate is not None:
      lr = _skeleton.rho_at(learning_rate, step.step_count, step.base_state)
      decay = jnp.asarray(lr, jnp.float32) * jnp.asarray(weight_decay,
                                                         jnp.float32)
      clean = jax.tree.map(lambda p, m: _tree.to_compute(p) + c_old * m,
                           step.params, _tree.to_compute(v_old))
      u = jax.tree.map(lambda u, w: u - decay * (w + u), u, clean)
    new_updates = jax.tree.map(
        lambda u, a, b, ref: (u + c_old * a - c_new * b).astype(ref.dtype),
        u, _tree.to_compute(v_old), _tree.to_compute(v_new), updates)
    return new_updates, MSAMState(c_new, v_norm)

  def init_method_state(params):
    # Checks the momentum at init (abstractly: no second base state).
    base_init = _validation.check_base(base_tx).init
    _momentum(jax.eval_shape(base_init, params), params)
    return MSAMState(jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))

  return _skeleton.transformation(
      "msam", base_tx, rule, rho, _gradient.AscentOptions(eps=eps),
      axis_name=axis_name, needs_grad_fn=False, finish=finish,
      init_method_state=init_method_state)


_eval_params.register(MSAMState, _unperturb)
