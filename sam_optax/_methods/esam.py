"""ESAM: SAM on random tensors and the sharpest examples (Du et al.).

Efficient SAM has two parts, both optional:

* **Stochastic weight perturbation (SWP)**: each step perturbs only a random
  subset of the weight tensors (each kept with probability β), the kept part
  of SAM's ε scaled by 1/β so that ε is unbiased.
* **Sharpness-sensitive data selection (SDS)**: the per-example losses at
  w and at w + ε (one forward pass) tell which examples' loss rose most; the
  perturbed gradient is taken on the γ·B sharpest ones only.

SDS needs per-example losses, so :func:`esam` is called with a per-example
loss function and the batch (``example_loss_fn=``, ``batch=``) instead of
``sam``'s ``grad_fn``. With a static γ the selected sub-batch has a static
shape (``lax.top_k``), so the second backward pass really runs on γ·B
examples under ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sam_optax._core import gradient as _gradient
from sam_optax._core import perturbation as _perturbation
from sam_optax._core import sharding as _sharding
from sam_optax._core import skeleton as _skeleton
from sam_optax._core import tree as _tree
from sam_optax._core import validation as _validation


class ESAMState(NamedTuple):
  """What :func:`esam` keeps between steps (``SAMState.method_state``).

  Attributes:
    key: the PRNG key of the next step's SWP draws (a raw ``uint32[2]`` key,
      replicated over devices: every device draws the same tensors).
    perturbed_fraction: the fraction of the float leaves that the last step
      perturbed (1 without SWP).
  """

  key: jax.Array  # shape=(2,), dtype=jnp.uint32
  perturbed_fraction: jax.Array  # shape=(), dtype=jnp.float32


def num_selected(batch_size: int, gamma: float) -> int:
  """The number of examples SDS keeps: ``max(1, floor(γ·B))`` (static)."""
  return max(1, int(np.floor(gamma * batch_size + 1e-9)))


def swp_keep(key: jax.Array, beta: Any, params: Any) -> tuple[Any, jax.Array]:
  """This step's SWP draws: a bool per leaf, and the next key.

  ``key, sub = jax.random.split(key)``; the leaves of ``params`` (in
  ``jax.tree.leaves`` order) are kept where
  ``jax.random.bernoulli(sub, β, (num_leaves,))`` is true.
  """
  key, sub = jax.random.split(key)
  leaves, treedef = jax.tree.flatten(params)
  draws = jax.random.bernoulli(sub, jnp.asarray(beta, jnp.float32),
                               (len(leaves),))
  return treedef.unflatten([draws[i] for i in range(len(leaves))]), key


def sds_gradient(example_loss_fn: Callable[[Any, Any], jax.Array],
                 params: Any, batch: Any, clean_losses: jax.Array | None,
                 gamma: float) -> tuple[jax.Array, Any]:
  r"""The loss at ``params`` and the gradient on the sharpest examples.

  With :math:`\ell_i(w)` the per-example losses, ``clean_losses`` the
  :math:`\ell_i` at the clean point and ``params`` the perturbed point,
  keeps the :math:`k =` :func:`num_selected` examples with the largest
  :math:`\ell_i(w + \epsilon) - \ell_i(w)` (``lax.top_k``) and returns
  ``(mean_i ℓ_i(w + ε) over the whole batch, ∇ mean_{i ∈ top k}
  ℓ_i(w + ε))``. With ``gamma >= 1`` the whole batch is used and the two come
  from one ``jax.value_and_grad`` pass.
  """
  def mean_loss(p, b):
    return jnp.mean(example_loss_fn(p, b))

  if gamma >= 1:
    return jax.value_and_grad(mean_loss)(params, batch)
  after = example_loss_fn(params, batch)
  if jnp.ndim(after) != 1:
    raise ValueError(
        "example_loss_fn must return one loss per example (shape (B,)); got "
        f"shape {jnp.shape(after)}.")
  k = num_selected(after.shape[0], gamma)
  increase = lax.stop_gradient(after - clean_losses)
  _, index = lax.top_k(increase, k)
  subset = jax.tree.map(lambda x: jnp.take(x, index, axis=0), batch)
  grads = jax.grad(mean_loss)(params, subset)
  return jnp.mean(after), grads


@_skeleton.takes_sam_options
def esam(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    beta: float | jax.Array = 1.0,
    gamma: float = 1.0,
    seed: int = 0,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Efficient SAM (ESAM): stochastic weight perturbation and data selection.

  With the clean gradient :math:`g` and SAM's perturbation
  :math:`\epsilon_{\rm SAM} = \rho\, g / (\|g\|_2 + \mathrm{eps})`, each step

  1. (SWP) draws :math:`m_l \sim \mathrm{Bernoulli}(\beta)` for every weight
     tensor :math:`l` and perturbs by
     :math:`\epsilon_l = m_l\, \epsilon_{{\rm SAM}, l} / \beta` (the norm is
     that of the whole :math:`g`, so
     :math:`\mathbb{E}[\epsilon] = \epsilon_{\rm SAM}`);
  2. (SDS) evaluates the per-example losses at :math:`w + \epsilon` (a
     forward pass) and keeps the :math:`k = \max(1, \lfloor\gamma B\rfloor)`
     examples :math:`B^+` with the largest increase
     :math:`\ell_i(w + \epsilon) - \ell_i(w)`;
  3. hands :math:`\nabla_w \frac{1}{k}\sum_{i \in B^+} \ell_i(w + \epsilon)`
     to the base optimizer, which updates :math:`w`.

  ``beta = gamma = 1`` is SAM exactly (one perturbed ``value_and_grad``).

  The train step passes the per-example loss and the batch instead of
  ``grad_fn``; the clean per-example losses, if the step already has them,
  save a forward pass:

  .. code-block:: python

    def example_loss(params, batch):  # -> shape (B,)
      logits = model.apply(params, batch["x"])
      return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                             batch["y"])

    (loss, losses), grads = jax.value_and_grad(
        lambda p: (l := example_loss(p, batch)).mean(), has_aux=True)(params)
    updates, state = tx.update(grads, state, params,
                               example_loss_fn=example_loss, batch=batch,
                               example_losses=losses)

  ``batch`` is any pytree whose leaves have the examples on axis 0; the
  selected examples are gathered with ``jnp.take``.

  .. note::
    **What it saves in JAX.** SDS: the perturbed backward pass runs on
    :math:`k` examples instead of :math:`B`, but SDS adds a forward pass at
    :math:`w + \epsilon` on the whole batch (and one at :math:`w` when
    ``example_losses`` is not given). In units of a forward pass (backward
    ≈ 2), SAM costs 6 and ESAM-SDS :math:`4 + 3\gamma`: 5.5 at γ = 0.5, an
    8% saving (XLA counts 5-8% fewer flops than SAM on a small MLP and
    CNN; the step time is within noise of SAM's). Without
    ``example_losses`` ESAM computes the clean losses itself; under
    ``jax.jit`` XLA merged that forward pass with the clean gradient's in
    our measurements. SWP saves nothing
    here: the clean gradient comes in whole, and a random per-tensor
    ``stop_gradient`` (``jnp.where`` or ``lax.cond``) does not remove the
    weight-gradient products from the compiled program (measured in
    ``docs/esam_saf.md`` and ``benchmarks/esam_saf.py``). SWP is shipped
    for its regularisation effect only.

  Args:
    base_tx: the optimizer that applies the gradient.
    rho: the radius ρ ≥ 0 or a schedule of the step.
    beta: β in (0, 1], the probability that a tensor is perturbed (paper:
      0.6 on CIFAR).
    gamma: γ in (0, 1], the fraction of the batch the perturbed gradient is
      taken on (paper: 0.5 on CIFAR). Static (it sets a shape).
    seed: the seed of the SWP draws (the key lives in the state).
    **options: ``sam``'s options ``adaptive``, ``eta``, ``eps``, ``mask``,
      ``adaptive_mask``, ``axis_name``, ``perturb_in_float32``,
      ``exact_norms``, as in :func:`sam_optax.sam` (``mask`` leaves are never
      perturbed; SWP draws among the others). ``has_aux`` and
      ``value_and_grad`` are not taken: the perturbed loss is always logged
      (``SAMState.perturbed_loss``, the mean over the whole batch), and the
      sharpness too when the clean losses (``example_losses=`` or
      ``value=``) are known. Under ``axis_name`` every device perturbs with
      its own gradient and selects among its own examples; the gradients
      are averaged (the SWP draws are the same on every device).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``example_loss_fn`` (``(params, batch) -> (B,)`` losses), ``batch`` and
    optionally ``example_losses`` (the ``(B,)`` losses at ``params``). With
    ``gamma=1`` (no data selection) it also takes ``obj_fn=`` (``params ->
    scalar`` loss, as Levanter passes it) instead: the perturbed gradient
    and loss are then ``jax.value_and_grad(obj_fn)``; with ``gamma < 1``
    ``obj_fn`` is an error, since SDS needs one loss per example. State
    :class:`sam_optax.SAMState` with an :class:`ESAMState` as
    ``method_state``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> def example_loss(w, batch):  # one loss per row of batch['x']
    ...   return 0.5 * (batch['x'] @ w - batch['y']) ** 2
    >>> batch = {'x': jnp.eye(4), 'y': jnp.array([1.0, 2.0, 3.0, 4.0])}
    >>> tx = sam_optax.esam(optax.sgd(0.1), rho=0.05, gamma=0.5)
    >>> @jax.jit
    ... def step(w, state):
    ...   grads = jax.grad(lambda w: example_loss(w, batch).mean())(w)
    ...   updates, state = tx.update(grads, state, w,
    ...                              example_loss_fn=example_loss,
    ...                              batch=batch)
    ...   return optax.apply_updates(w, updates), state
    >>> w, state = step(jnp.zeros(4), tx.init(jnp.zeros(4)))
    >>> [round(float(v), 4) for v in w]  # Only the 2 sharpest examples moved.
    [0.0, 0.0, 0.1514, 0.2018]
    >>> round(float(state.sharpness), 4)  # L(w + ε) - L(w) on the batch.
    0.0688

  References:
    Du et al., `Efficient Sharpness-aware Minimization for Improved Training
    of Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022
    (Algorithm 1; official code dydjw9/Efficient_SAM).
  """
  for flag in ("has_aux", "value_and_grad"):
    if flag in options:
      raise TypeError(
          f"esam() does not take {flag}: it always logs the perturbed loss, "
          "and takes example_loss_fn= and batch= in update instead of "
          "grad_fn.")
  _validation.check_fraction("beta", beta)
  if not isinstance(beta, jax.core.Tracer) and not np.asarray(beta) > 0:
    raise ValueError(f"`beta` must be in (0, 1], got {beta!r}.")
  if isinstance(gamma, (jax.Array, jax.core.Tracer)) or not isinstance(
      gamma, (int, float, np.number)) or not 0 < gamma <= 1:
    raise ValueError(
        f"`gamma` must be a Python number in (0, 1] (it sets the static size "
        f"of the selected sub-batch), got {gamma!r}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"`seed` must be an int, got {seed!r}.")

  def init_method_state(params):
    del params
    return ESAMState(jax.random.PRNGKey(seed), jnp.ones([], jnp.float32))

  def rule(step, method_state):
    opts = step.options
    p = _perturbation.ascent_direction(
        step.grads, step.params, step.rho, adaptive=opts.adaptive,
        eta=opts.eta, eps=opts.eps, mask=opts.mask,
        adaptive_mask=opts.adaptive_mask, exact_norms=opts.exact_norms)
    keep, key = swp_keep(method_state.key, beta, step.params)
    inv_beta = 1.0 / jnp.asarray(beta, jnp.float32)
    epsilon = jax.tree.map(
        lambda e, k: jnp.where(k, e * inv_beta.astype(e.dtype), 0),
        _gradient.scale_epsilon(p.epsilon, step.params,
                                opts.rho_multipliers), keep)
    perturbed = _perturbation.perturb(
        step.params, epsilon, keep_dtype=not opts.perturb_in_float32)
    if step.axis_name is not None:
      perturbed = _sharding.mark_varying(perturbed, step.axis_name)
    grads, loss = step.grad_fn(perturbed)
    grads = _gradient.conform_to_params(grads, step.params,
                                        "The gradient of example_loss_fn")
    grads = jax.tree.map(lambda s, g: s.astype(g.dtype), grads, step.grads)
    radius = _tree.norm(epsilon).astype(jnp.float32)
    achieved = None
    if opts.exact_norms:
      achieved = _gradient._achieved_norm(perturbed, step.params, radius)
      achieved = achieved.astype(jnp.float32)
    grad_norm = None if p.grad_norm is None else p.grad_norm.astype(
        jnp.float32)
    info = _gradient.SAMInfo(p.ascent_norm.astype(jnp.float32), radius,
                             grad_norm, achieved, loss)
    grads, info = step.pmean_with_info(grads, info)
    floats = [k for k, w in zip(jax.tree.leaves(keep),
                                jax.tree.leaves(step.params))
              if _tree.is_float(w)]
    fraction = (jnp.mean(jnp.stack(floats).astype(jnp.float32)) if floats
                else jnp.ones([], jnp.float32))
    return grads, ESAMState(key, fraction), info

  inner = _skeleton.variant(
      "esam", base_tx, rule, rho, {**options, "value_and_grad": True},
      init_method_state=init_method_state)

  def update_fn(updates, state, params=None, *, example_loss_fn=None,
                batch=None, example_losses=None, grad_fn=None,
                **extra_args):
    if grad_fn is not None:
      raise ValueError(
          "esam takes example_loss_fn= and batch= (per-example losses), not "
          "grad_fn: tx.update(grads, state, params, example_loss_fn=f, "
          "batch=batch).")
    if extra_args.get("obj_fn") is not None:
      if example_loss_fn is not None or batch is not None:
        raise ValueError(
            "esam got both obj_fn= and example_loss_fn=/batch=; pass one.")
      if gamma < 1:
        raise ValueError(
            f"esam with gamma={gamma} selects examples, so it needs the "
            "per-example losses: tx.update(grads, state, params, "
            "example_loss_fn=f, batch=batch). obj_fn= (a scalar loss) works "
            "only with gamma=1 (SWP alone).")
      if params is None:
        raise ValueError("esam needs the params: tx.update(grads, state, "
                         "params, obj_fn=...).")
      # The skeleton turns obj_fn into jax.value_and_grad(obj_fn).
      return inner.update(updates, state, params, **extra_args)
    if example_loss_fn is None or batch is None:
      raise ValueError(
          "esam needs the per-example loss and the batch: tx.update(grads, "
          "state, params, example_loss_fn=lambda p, b: losses_of_shape_B, "
          "batch=batch).")
    if params is None:
      raise ValueError("esam needs the params: tx.update(grads, state, "
                       "params, example_loss_fn=..., batch=...).")
    clean = example_losses
    if clean is None and gamma < 1:
      clean = example_loss_fn(params, batch)
    if clean is not None:
      clean = lax.stop_gradient(jnp.asarray(clean))
      if jnp.ndim(clean) != 1:
        raise ValueError(
            "example_losses must hold one loss per example (shape (B,)); got "
            f"shape {jnp.shape(clean)}.")
      if extra_args.get("value") is None:
        extra_args["value"] = jnp.mean(clean.astype(jnp.float32))
    return inner.update(
        updates, state, params,
        grad_fn=lambda p: sds_gradient(example_loss_fn, p, batch, clean,
                                       gamma),
        **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


# sam's options in the signature (for help() and optax.inject_hyperparams),
# less the two that esam sets itself.
esam.__signature__ = esam.__signature__.replace(parameters=[
    p for p in esam.__signature__.parameters.values()
    if p.name not in ("has_aux", "value_and_grad")])
