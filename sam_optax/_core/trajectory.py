"""The trajectory loss of SAF and MESA (Du et al., NeurIPS 2022).

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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


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



def weight_from(active: jax.Array, lam: Any) -> jax.Array:
  """λ where ``active``, else 0 (float32)."""
  return jnp.where(active, jnp.asarray(lam, jnp.float32), 0.0)


def check_count(name: str, value: Any) -> None:
  """Validates a concrete int >= 0 (an epoch or example count)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)) or value < 0:
    raise ValueError(f"`{name}` must be an int >= 0, got {value!r}.")


def _has_trajectory_weight(x: Any) -> bool:
  return isinstance(x, tuple) and "trajectory_weight" in getattr(
      x, "_fields", ())


def find_state(state: Any, kind: type, what: str) -> Any:
  """The one ``kind`` state (a NamedTuple) anywhere in ``state``."""
  found = [leaf for leaf in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(leaf, kind)]
  if len(found) != 1:
    raise ValueError(
        f"{what} needs exactly one {kind.__name__} in the optimizer state; "
        f"found {len(found)}.")
  return found[0]


def trajectory_weight(state: Any) -> jax.Array:
  """λ for the next step's trajectory loss (0 before the start), from the
  :class:`sam_optax.MESAState` or :class:`sam_optax.SAFState` in ``state``
  (the whole optimizer state: it is found wherever it sits)."""
  found = [leaf for leaf in jax.tree.leaves(
      state, is_leaf=_has_trajectory_weight) if _has_trajectory_weight(leaf)]
  if len(found) != 1:
    raise ValueError(
        "trajectory_weight needs exactly one MESAState or SAFState in the "
        f"optimizer state; found {len(found)}.")
  return found[0].trajectory_weight
