"""SAF: the trajectory loss against past outputs per example (Du et al.)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sam_optax._core import trajectory as _trajectory
from sam_optax._core import validation as _validation


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
  _trajectory.check_count("start_epoch", start_epoch)
  if start_epoch < minus_epoch:
    raise ValueError(
        f"start_epoch ({start_epoch}) must be >= minus_epoch ({minus_epoch}):"
        " before that the targets' slot has not been written.")
  slots = minus_epoch + 1

  def state_at(count, base_state, outputs):
    epoch = (count // steps_per_epoch).astype(jnp.int32)
    return SAFState(count, base_state, outputs, epoch,
                    _trajectory.weight_from(epoch > start_epoch, lam))

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



def saf_targets(state: Any, example_ids: jax.Array) -> jax.Array:
  r"""SAF's reference outputs for ``example_ids``: from epoch
  :math:`e - \tilde E`, :math:`e` the epoch of the next step.

  Slot ``(e - minus_epoch) % (minus_epoch + 1) == (e + 1) % (minus_epoch +
  1)`` of the store, shape ``(B, num_outputs)``.
  """
  s = _trajectory.find_state(state, SAFState, "saf_targets")
  slots = s.outputs.shape[1]
  return s.outputs[jnp.asarray(example_ids), (s.epoch + 1) % slots]


