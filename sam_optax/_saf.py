"""SAF and MESA: sharpness-aware training for free (Du et al., NeurIPS 2022).

Both replace SAM's second gradient by a *trajectory loss* added to the
training loss: a temperature-scaled KL divergence from the model's outputs
on the batch to reference outputs of the same examples,

.. math::

  L_{\rm tra} = \tau^2\\, \frac{1}{B}\\sum_i \\mathrm{KL}\big(
  \\mathrm{softmax}(z^{\rm ref}_i/\tau)\\,\big\\|\\,
  \\mathrm{softmax}(z_i/\tau)\big),

weighted by λ from a start epoch on. One gradient per step:

* **SAF** takes :math:`z^{\rm ref}` from the model's own outputs
  :math:`\tilde E` epochs earlier, stored per example (:func:`saf` keeps the
  store in its state, keyed by example index);
* **MESA** takes them from an exponential moving average (EMA) of the
  weights, one extra forward pass and no per-example memory (:func:`mesa`
  keeps the EMA weights in its state; :func:`teacher_params` reads them).

The loss term itself is :func:`trajectory_loss`; the transformations only
keep the references and say, in ``trajectory_weight``, the λ to use at the
next step (0 before the start).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sam_optax import _tree, _validation


def trajectory_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                    temperature: float | jax.Array = 5.0) -> jax.Array:
  r"""SAF/MESA's trajectory loss: :math:`\tau^2` KL(teacher ‖ student).

  .. math::

    \tau^2\, \frac{1}{B}\sum_{i=1}^{B}\sum_c p_{ic}\,
    (\log p_{ic} - \log q_{ic}),\qquad
    p_i = \mathrm{softmax}(z^{\rm ref}_i/\tau),\;
    q_i = \mathrm{softmax}(z_i/\tau),

  the official code's ``F.kl_div(log_softmax(z/τ), softmax(z_ref/τ))``
  summed over classes, averaged over the examples, times :math:`\tau^2`.
  No gradient flows into the teacher's logits (``lax.stop_gradient``).

  Args:
    student_logits: :math:`z`, shape ``(..., num_classes)``.
    teacher_logits: :math:`z^{\rm ref}`, the same shape.
    temperature: τ > 0 (paper: 5).

  Returns:
    A float32 scalar (mean over every axis but the last).

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> z = jnp.array([[2.0, 0.0, -1.0]])
    >>> float(sam_optax.trajectory_loss(z, z))
    0.0
    >>> uniform = jnp.zeros((1, 3))  # KL(uniform || softmax(z)) at τ = 1:
    >>> round(float(sam_optax.trajectory_loss(z, uniform, 1.0)), 4)
    0.7379

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022 (Eq. 5-6; official
    code AngusDujw/SAF).
  """
  tau = jnp.asarray(temperature, jnp.float32)
  z = jnp.asarray(student_logits).astype(jnp.float32)
  z_ref = lax.stop_gradient(jnp.asarray(teacher_logits).astype(jnp.float32))
  log_q = jax.nn.log_softmax(z / tau, axis=-1)
  log_p = jax.nn.log_softmax(z_ref / tau, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return tau ** 2 * jnp.mean(kl)


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


def _weight(active: jax.Array, lam: Any) -> jax.Array:
  return jnp.where(active, jnp.asarray(lam, jnp.float32), 0.0)


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
        trajectory_weight=_weight(count >= start_step, lam))

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
                              _weight(count >= start_step, lam))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class SAFState(NamedTuple):
  """State of :func:`saf`.

  Attributes:
    count: the number of ``update`` calls.
    base_state: the base optimizer's state.
    outputs: the per-example output store, shape
      ``(num_examples, minus_epoch + 1, num_outputs)``, float32: slot
      ``e % (minus_epoch + 1)`` holds the outputs recorded in epoch ``e``.
    epoch: the epoch of the next step, ``count // steps_per_epoch``.
    trajectory_weight: λ for the next step's trajectory loss: λ when
      ``epoch > start_epoch``, 0 before.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  base_state: optax.OptState
  outputs: jax.Array  # shape=(N, minus_epoch + 1, C), dtype=jnp.float32
  epoch: jax.Array  # shape=(), dtype=jnp.int32
  trajectory_weight: jax.Array  # shape=(), dtype=jnp.float32


def saf(
    base_tx: optax.GradientTransformation,
    num_examples: int,
    num_outputs: int,
    steps_per_epoch: int,
    lam: float | jax.Array = 0.3,
    start_epoch: int = 5,
    minus_epoch: int = 3,
) -> optax.GradientTransformationExtraArgs:
  r"""SAF: the base optimizer, plus a per-example store of past outputs.

  Each ``update`` records the outputs (logits) the step computed for its
  examples, ``tx.update(grads, state, params, example_ids=ids,
  outputs=logits)``, in the store slot of the current epoch. The train step
  reads the outputs of the same examples :math:`\tilde E` (``minus_epoch``)
  epochs earlier with :func:`saf_targets` and adds
  ``trajectory_weight(state) * trajectory_loss(logits, targets, τ)``:

  .. code-block:: python

    targets = sam_optax.saf_targets(state, ids)
    lam = sam_optax.trajectory_weight(state)

    def loss_fn(params):
      logits = model.apply(params, x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + lam * sam_optax.trajectory_loss(logits, targets), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, example_ids=ids,
                               outputs=logits)

  No extra forward or backward pass: the cost is the store, ``num_examples
  × (minus_epoch + 1) × num_outputs`` float32 numbers in the optimizer state
  (CIFAR-10: 50000 × 4 × 10 = 8 MB; for ImageNet, 20 GB, the official code
  keeps it in host memory: do the same with the two lines of
  :func:`saf_targets` and the write in ``update`` on a NumPy array). It
  assumes every example is seen once per epoch (a permutation per epoch);
  an example not seen in epoch :math:`e - \tilde E` reads whatever that slot
  last held (zeros at first: a uniform target).

  Args:
    base_tx: the optimizer.
    num_examples: N, the size of the training set (``example_ids`` are in
      ``[0, N)``).
    num_outputs: the number of logits per example.
    steps_per_epoch: the number of ``update`` calls per epoch.
    lam: λ ≥ 0, the weight of the trajectory loss (paper: 0.3 on CIFAR,
      0.8 on ImageNet; official code default 0.16). The term's gradient on
      the logits is λτ(q − p): with τ = 5, λ ≥ 1 diverged on the digits
      benchmark, where τ = 1, λ = 3 was best (``docs/esam_saf.md``).
    start_epoch: :math:`E_{\rm start}`; λ applies from epoch
      ``start_epoch + 1`` on (the official ``epoch > kl_start_epoch``).
      At least ``minus_epoch``, so that the slot read has been written.
    minus_epoch: :math:`\tilde E`, how many epochs back the targets are
      (official code default 3).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SAFState`; ``update`` takes ``example_ids`` (int, shape
    ``(B,)``) and ``outputs`` (shape ``(B, num_outputs)``).

  Examples:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = sam_optax.saf(optax.sgd(0.1), num_examples=4, num_outputs=2,
    ...                    steps_per_epoch=2, start_epoch=1, minus_epoch=1)
    >>> w, state = jnp.zeros(2), tx.init(jnp.zeros(2))
    >>> for t in range(4):  # 2 epochs of 2 steps of 2 examples.
    ...   ids = jnp.array([2 * (t % 2), 2 * (t % 2) + 1])
    ...   logits = jnp.full((2, 2), float(t))
    ...   _, state = tx.update(jnp.zeros(2), state, w, example_ids=ids,
    ...                        outputs=logits)
    >>> sam_optax.saf_targets(state, jnp.array([0, 3]))  # Epoch 1's outputs
    Array([[2., 2.],
           [3., 3.]], dtype=float32)
    >>> int(state.epoch), round(float(sam_optax.trajectory_weight(state)), 2)
    (2, 0.3)

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022 (SAF, Eq. 5-6,
    Algorithm 1; official code AngusDujw/SAF, ``SAF_train.py``).
  """
  base_tx = _validation.check_base(base_tx)
  _validation.check_non_negative("lam", lam)
  for name, value in (("num_examples", num_examples),
                      ("num_outputs", num_outputs),
                      ("steps_per_epoch", steps_per_epoch),
                      ("minus_epoch", minus_epoch)):
    _validation.check_positive_int(name, value)
  _check_count("start_epoch", start_epoch)
  if start_epoch < minus_epoch:
    raise ValueError(
        f"start_epoch ({start_epoch}) must be >= minus_epoch ({minus_epoch}):"
        " before that the targets' slot has not been written.")
  slots = minus_epoch + 1

  def state_at(count, base_state, outputs):
    epoch = (count // steps_per_epoch).astype(jnp.int32)
    return SAFState(count, base_state, outputs, epoch,
                    _weight(epoch > start_epoch, lam))

  def init_fn(params):
    return state_at(jnp.zeros([], jnp.int32), base_tx.init(params),
                    jnp.zeros((num_examples, slots, num_outputs),
                              jnp.float32))

  def update_fn(updates, state, params=None, *, example_ids=None,
                outputs=None, **extra_args):
    if example_ids is None or outputs is None:
      raise ValueError(
          "saf records this step's outputs: tx.update(grads, state, params, "
          "example_ids=ids, outputs=logits).")
    ids = jnp.asarray(example_ids)
    outputs = lax.stop_gradient(jnp.asarray(outputs, jnp.float32))
    if ids.ndim != 1 or outputs.shape != (ids.shape[0], num_outputs):
      raise ValueError(
          f"example_ids must have shape (B,) and outputs (B, {num_outputs});"
          f" got {ids.shape} and {outputs.shape}.")
    updates, base_state = base_tx.update(updates, state.base_state, params,
                                         **extra_args)
    store = state.outputs.at[ids, state.epoch % slots].set(outputs)
    return updates, state_at(optax.safe_increment(state.count), base_state,
                             store)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_count(name: str, value: Any) -> None:
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)) or value < 0:
    raise ValueError(f"`{name}` must be an int >= 0, got {value!r}.")


def _find(state: Any, kind: type, what: str) -> Any:
  found = [leaf for leaf in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, (MESAState, SAFState)))
           if isinstance(leaf, kind)]
  if len(found) != 1:
    raise ValueError(
        f"{what} needs exactly one {kind.__name__} in the optimizer state; "
        f"found {len(found)}.")
  return found[0]


def teacher_params(state: Any) -> Any:
  """MESA's teacher: the EMA weights in ``state`` (wherever it sits).

  ``state`` is the whole optimizer state (``optax.chain``,
  ``optax.inject_hyperparams``, ... are searched, like
  :func:`sam_optax.eval_params`). Returns float32 (float64) params.
  """
  return _find(state, MESAState, "teacher_params").teacher


def saf_targets(state: Any, example_ids: jax.Array) -> jax.Array:
  r"""SAF's reference outputs for ``example_ids``: from epoch
  :math:`e - \tilde E`, :math:`e` the epoch of the next step.

  Slot ``(e - minus_epoch) % (minus_epoch + 1) == (e + 1) % (minus_epoch +
  1)`` of the store, shape ``(B, num_outputs)``.
  """
  s = _find(state, SAFState, "saf_targets")
  slots = s.outputs.shape[1]
  return s.outputs[jnp.asarray(example_ids), (s.epoch + 1) % slots]


def trajectory_weight(state: Any) -> jax.Array:
  """λ for the next step's trajectory loss (0 before the start), from the
  :class:`MESAState` or :class:`SAFState` in ``state``."""
  found = [leaf for leaf in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, (MESAState, SAFState)))
           if isinstance(leaf, (MESAState, SAFState))]
  if len(found) != 1:
    raise ValueError(
        "trajectory_weight needs exactly one MESAState or SAFState in the "
        f"optimizer state; found {len(found)}.")
  return found[0].trajectory_weight
