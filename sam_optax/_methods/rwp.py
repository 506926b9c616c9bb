"""Random weight perturbation: the gradient at w + ε, ε filter-wise Gaussian
noise (Li et al.), one gradient per step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import eval_params as _eval_params
from sam_optax._core import gradient as _gradient
from sam_optax._core import skeleton as _skeleton
from sam_optax._core import tree as _tree


class RWPState(NamedTuple):
  """What :func:`rwp` keeps between steps (``SAMState.method_state``).

  Attributes:
    key: the PRNG key all the noise derives from (``jax.random.PRNGKey``):
      step ``t``'s noise is drawn from ``jax.random.fold_in(key, t)``, so it
      is regenerated, never stored.
    noise_std: per leaf, the standard deviation of the noise the held params
      carry: one per filter (last axis) for leaves with 2 or more axes, one
      per leaf otherwise (float32; all 0 before the first step).
  """

  key: jax.Array  # shape=(2,), dtype=jnp.uint32
  noise_std: Any  # per leaf: shape=(leaf.shape[-1],) or (), float32


def filter_norms(params: Any) -> Any:
  """Per leaf: the L2 norm of each filter (last axis) for leaves with 2 or
  more axes, of the whole leaf otherwise (float32)."""

  def leaf_norm(w):
    w = jnp.asarray(w, jnp.float32)
    if w.ndim >= 2:
      return jnp.sqrt(jnp.sum(w * w, axis=tuple(range(w.ndim - 1))))
    return jnp.sqrt(jnp.sum(w * w))

  return jax.tree.map(leaf_norm, params)


def noise(key: jax.Array, step: Any, noise_std: Any, params: Any) -> Any:
  """The noise of step ``step``: N(0, std²) per filter, in float32."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, step), max(len(leaves), 1))
  stds = treedef.flatten_up_to(noise_std)
  return treedef.unflatten([
      jax.random.normal(k, jnp.shape(w), jnp.float32) * s
      for k, w, s in zip(keys, leaves, stds)])


def _unperturb(sam_state: _skeleton.SAMState, params: Any) -> Any:
  """w = held - ε, ε regenerated from the key, the step and the stds."""
  ms = sam_state.method_state
  eps = noise(ms.key, sam_state.step_count, ms.noise_std, params)
  return jax.tree.map(lambda p, e: (p - e).astype(p.dtype), params, eps)


def rwp(
    base_tx: optax.GradientTransformation,
    std: optax.ScalarOrSchedule = 0.01,
    *,
    seed: int | jax.Array = 0,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Random weight perturbation (RWP): the gradient at Gaussian-perturbed
  weights, one gradient per step.

  Each step's gradient is taken at :math:`\tilde w_t = w_t + \epsilon_t`
  with fresh noise scaled to each filter's norm, as in the authors' code
  (``ARWP.first_step`` with ``eta = 0``):

  .. math::

    \epsilon_t[\ldots, j] \sim \mathcal N\!\left(0,\;
      \sigma_t^2 \,\|w_t[\ldots, j]\|_2^2\right)

  for a leaf with 2 or more axes (filter :math:`j` = the *last* axis, the
  output units of Flax ``Dense``/``Conv`` kernels; PyTorch's first axis), and
  :math:`\mathcal N(0, \sigma_t^2 \|w_t\|_2^2)` for biases and scalars. The
  base optimizer, fed :math:`\nabla L(\tilde w_t)`, updates the clean
  :math:`w_t \to w_{t+1}`.

  **Calling convention (drop-in, one gradient):** the training loop holds
  :math:`\tilde w` and the train step is a plain Optax step (no
  ``grad_fn``); each ``update`` moves the held params from
  :math:`w_t + \epsilon_t` to :math:`w_{t+1} + \epsilon_{t+1}`. The noise is
  never stored: it is regenerated from a PRNG key in the state (the only
  extra state is the key and one float per filter), so ``update`` draws it
  twice per step (:math:`\epsilon_t` to remove, :math:`\epsilon_{t+1}` to
  add). The first gradient is taken at :math:`w_0` (no noise yet).

  .. warning::
    Evaluate and checkpoint ``sam_optax.eval_params(state, params)``, the
    clean :math:`w`, not the held (noisy) params.

  Differences from the authors' code: the base optimizer receives the held
  params, so a weight decay in it (``optax.add_decayed_weights``) decays
  :math:`w + \epsilon` (theirs decays :math:`w`: a zero-mean difference
  :math:`\lambda \epsilon` in the gradient); and the adaptive variant (ARWP,
  noise divided by :math:`\sqrt{1 + \eta F}` with a running Fisher :math:`F`)
  and the mixed loss of m-ARWP (two gradients) are not implemented. The
  paper grows σ during training (``CosineInc``: :math:`\sigma_t = \sigma_0
  (1 + k (1 - \cos(\pi t / T)) / 2)`, e.g. :math:`k = 10`): pass it as a
  schedule.

  Args:
    base_tx: the optimizer that applies the gradient.
    std: σ ≥ 0, the noise's standard deviation relative to each filter's
      norm, or a schedule of the step (authors' scripts: 0.001 to 0.01 at
      the start, with their increasing schedule).
    seed: the seed of the PRNG key kept in the state (an int).
    axis_name: the data-parallel axis of ``pmap``/``shard_map``: every device
      draws the *same* noise (the key is replicated, so the held params stay
      replicated) and the gradients are averaged (one ``pmean``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.SAMState` whose ``method_state`` is a
    :class:`sam_optax.RWPState`. Its ``radius`` is :math:`\|\epsilon_t\|_2`,
    the norm of the noise at which this step's gradient was taken.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> loss = lambda w: jnp.sum((w["k"] - 1.0) ** 2)
    >>> tx = sam_optax.rwp(optax.sgd(0.1), std=0.1)
    >>> @jax.jit
    ... def step(params, state):  # A plain Optax step: no grad_fn.
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> params = {"k": jnp.zeros((3, 2))}
    >>> state = tx.init(params)
    >>> params, state = step(params, state)  # The first step has no noise.
    >>> clean = sam_optax.eval_params(state, params)["k"]
    >>> bool(jnp.allclose(clean, 0.2))  # w_1 = w_0 - 0.1 g(w_0)
    True
    >>> bool(jnp.any(params["k"] != clean))  # the held params are noisy
    True
    >>> state.method_state.noise_std["k"].round(4)  # σ ‖w[:, j]‖ per filter
    Array([0.0346, 0.0346], dtype=float32)

  References:
    Li et al., `Revisiting Random Weight Perturbation for Efficiently
    Improving Generalization <https://arxiv.org/abs/2404.00357>`_, TMLR 2024
    (official code: nblt/mARWP, ``ARWP`` in ``utils.py``); Bisla et al.,
    `Low-Pass Filtering SGD for Recovering Flat Optima
    <https://arxiv.org/abs/2201.08025>`_, AISTATS 2022 (filter-wise noise).
  """

  def init_method_state(params):
    key = jax.random.PRNGKey(jnp.asarray(seed).astype(jnp.int32))
    zeros = jax.tree.map(lambda s: jnp.zeros_like(s),
                         filter_norms(params))
    return RWPState(key, zeros)

  def rule(step, method_state):
    eps = noise(method_state.key, step.step_count, method_state.noise_std,
                step.params)
    zero = jnp.zeros([], jnp.float32)
    info = _gradient.SAMInfo(zero, _tree.norm(eps).astype(jnp.float32),
                             None, None, None)
    # ε_t goes on to ``finish`` with the state (the skeleton hands the rule's
    # method state to ``finish``; only ``finish``'s is kept): drawn once, not
    # twice (XLA does not merge the two draws; measured 1.5x the step time).
    return step.pmean(step.grads), (method_state, eps), info

  def finish(step, updates, base_state, method_state):
    method_state, old = method_state
    key, count = method_state.key, step.step_count
    clean = jax.tree.map(lambda p, e: _tree.to_compute(p) - e, step.params,
                         old)
    u = _tree.to_compute(updates)
    next_clean = jax.tree.map(jnp.add, clean, u)
    sigma = _skeleton.rho_at(std, optax.safe_increment(count), base_state)
    new_std = jax.tree.map(lambda n: jnp.asarray(sigma, jnp.float32) * n,
                           filter_norms(next_clean))
    new = noise(key, optax.safe_increment(count), new_std, step.params)
    new_updates = jax.tree.map(
        lambda u, a, b, ref: (u - a + b).astype(ref.dtype), u, old, new,
        updates)
    return new_updates, RWPState(key, new_std)

  return _skeleton.transformation(
      "rwp", base_tx, rule, std, _gradient.AscentOptions(),
      axis_name=axis_name, needs_grad_fn=False, finish=finish,
      init_method_state=init_method_state)


_eval_params.register(RWPState, _unperturb)
