"""Functional-SAM: the perturbed Jacobian with the clean loss derivative."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax._core import preconditioner as _preconditioner
from sam_optax._core import skeleton as _skeleton
from sam_optax._core import validation as _validation


def functional_value_and_grad(
    outputs_fn: Callable[[Any], Any], loss_fn: Callable[[Any], Any],
    params: Any) -> tuple[jax.Array, Any, Any]:
  r"""The clean loss, gradient and output gradient from one ``jax.vjp``.

  With :math:`F` = ``outputs_fn`` and :math:`\ell` = ``loss_fn``, returns
  :math:`(\ell(F(\theta)),\ \nabla_\theta\,\ell(F(\theta)),\
  \nabla_F\,\ell(F(\theta)))`: one forward pass of the model, one backward
  pass, the cost of ``jax.value_and_grad``. Pass the gradient as
  ``updates`` and the output gradient as ``output_grads=`` to
  :func:`sam_optax.functional_sam`'s ``update``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sam_optax
    >>> outputs_fn = lambda w: jnp.array([w[0] * w[1], w[1]])
    >>> loss_fn = lambda f: 0.5 * jnp.sum(f ** 2)
    >>> loss, g, df = sam_optax.functional_value_and_grad(
    ...     outputs_fn, loss_fn, jnp.array([2.0, 3.0]))
    >>> float(loss), g.tolist(), df.tolist()
    (22.5, [18.0, 15.0], [6.0, 3.0])
  """
  outputs, pullback = jax.vjp(outputs_fn, params)
  loss, output_grads = jax.value_and_grad(loss_fn)(outputs)
  (grads,) = pullback(output_grads)
  return loss, grads, output_grads


@_skeleton.takes_sam_options
def functional_sam(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    *,
    preconditioned: bool = False,
    preconditioner: Callable[[Any], Any] | None = None,
    b2: float = 0.999,
    precond_eps: float = 1e-8,
    bias_correction: bool = True,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Functional-SAM (Singh et al., 2025), optionally preconditioned.

  Write the loss as :math:`L(\theta) = \ell(F(\theta))`, :math:`F` the
  network's outputs (the logits) and :math:`\ell` the loss of the outputs.
  SAM's perturbed gradient splits by the chain rule as
  :math:`\nabla L(\theta + \epsilon) = J_F(\theta + \epsilon)^\top
  \nabla_F \ell(F(\theta + \epsilon))`; Functional-SAM keeps the Jacobian
  at the perturbed point and the loss derivative at the clean one:

  .. math::

    \epsilon = \rho\,\frac{g}{\|g\|_2 + \mathrm{eps}},\quad
    g = \nabla L(\theta), \qquad
    g_F = J_F(\theta + \epsilon)^\top\, \nabla_F\,\ell(F(\theta)),

  and :math:`g_F` goes to ``base_tx``, which updates :math:`\theta`. With
  ``preconditioned=True`` the ascent is that of
  :func:`sam_optax.preconditioned_sam`,
  :math:`\epsilon = \rho\, P^{-1} g / \|P^{-1} g\|_2` with
  :math:`P = \sqrt{\hat\nu} + \epsilon_P` from the Adam-family base state
  (the paper's best variant on C4 language models). :math:`g_F` is one
  ``jax.vjp`` of ``outputs_fn`` at :math:`\theta + \epsilon` pulled back
  with the clean output gradient: a forward and a backward pass, as SAM's
  second gradient.

  ``update(updates, state, params, *, outputs_fn, output_grads=None,
  loss_fn=None, **extra_args)``:

  * ``outputs_fn(params) -> outputs`` (any pytree, e.g. the logits);
  * ``output_grads``: :math:`\nabla_F \ell(F(\theta))` at the clean point,
    as :func:`sam_optax.functional_value_and_grad` returns it together with
    the loss and ``updates`` (:math:`g`) from one ``jax.vjp``: the whole
    step then costs what SAM's does (two forward and two backward passes);
  * or ``loss_fn(outputs) -> scalar`` instead: ``update`` computes
    :math:`F(\theta)` and the output gradient itself (one more forward pass,
    which XLA may or may not merge with the caller's clean pass), passes
    the clean loss on as ``value=`` (for the sharpness) unless given, and
    with ``value_and_grad=True`` logs the perturbed loss
    :math:`\ell(F(\theta + \epsilon))` for free.

  ``grad_fn=`` and ``obj_fn=`` are rejected: Functional-SAM needs the split
  into outputs and loss.

  Args:
    base_tx: the optimizer that applies :math:`g_F` (Adam-family with
      ``preconditioned=True`` unless ``preconditioner`` is given).
    rho: the radius ρ ≥ 0 or a schedule.
    preconditioned: precondition the ascent with the base optimizer's
      second moment (see :func:`sam_optax.preconditioned_sam`).
    preconditioner, b2, precond_eps, bias_correction: as in
      :func:`sam_optax.preconditioned_sam` (used with ``preconditioned``).
    **options: ``sam``'s options (``eps``, ``mask``, ``axis_name``,
      ``value_and_grad``, ``perturb_in_float32``, ``exact_norms``,
      ``rho_multipliers``, and ``adaptive``/``eta``/``adaptive_mask`` without
      ``preconditioned``); ``has_aux`` is rejected.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.SAMState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> x = jnp.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
    >>> y = jnp.array([0, 1, 1])
    >>> outputs_fn = lambda w: jnp.tanh(x @ w['h']) @ w['o']  # logits
    >>> def loss_fn(logits):
    ...   return optax.softmax_cross_entropy_with_integer_labels(
    ...       logits, y).mean()
    >>> w = {'h': jnp.eye(2), 'o': jnp.array([[1.0, -1.0], [0.5, 0.5]])}
    >>> tx = sam_optax.functional_sam(optax.adamw(0.01), rho=0.05,
    ...                               preconditioned=True)
    >>> @jax.jit
    ... def step(w, state):
    ...   loss, grads, dlogits = sam_optax.functional_value_and_grad(
    ...       outputs_fn, loss_fn, w)
    ...   updates, state = tx.update(grads, state, w, outputs_fn=outputs_fn,
    ...                              output_grads=dlogits)
    ...   return optax.apply_updates(w, updates), state, loss
    >>> state = tx.init(w)
    >>> for _ in range(50):
    ...   w, state, loss = step(w, state)
    >>> bool(loss < 0.4)
    True

  References:
    Singh, Mobahi, Agarwala, Dauphin, `Avoiding spurious sharpness
    minimization broadens applicability of SAM
    <https://arxiv.org/abs/2502.02407>`_, ICML 2025.
  """
  name = "functional_sam"
  _validation.check_bools(preconditioned=preconditioned)
  if options.get("has_aux"):
    raise TypeError(
        "functional_sam() does not take has_aux: outputs_fn returns the "
        "outputs only.")
  if preconditioned:
    _preconditioner.check_args(
        name, options, preconditioner, b2, precond_eps, bias_correction)
    rule = _preconditioner.rule(
        name, preconditioner, b2, precond_eps, bias_correction)
  else:
    if preconditioner is not None:
      raise ValueError(
          "functional_sam: preconditioner= is used only with "
          "preconditioned=True.")

    def rule(step, method_state):
      g_sam, info = step.sam_gradient()
      return g_sam, method_state, info

  value_and_grad = bool(options.get("value_and_grad", False))
  inner = _skeleton.variant(name, base_tx, rule, rho, options)
  if preconditioned:
    inner = _preconditioner.checked_init(name, inner, preconditioner,
                                         bias_correction=bias_correction)

  def update_fn(updates, state, params=None, *, outputs_fn=None,
                output_grads=None, loss_fn=None, grad_fn=None,
                **extra_args):
    if grad_fn is not None or extra_args.get("obj_fn") is not None:
      raise ValueError(
          "functional_sam takes outputs_fn= and output_grads= (or loss_fn=) "
          "instead of grad_fn=/obj_fn=: it needs the model split into "
          "outputs (logits) and the loss of the outputs.")
    if outputs_fn is None or (output_grads is None) == (loss_fn is None):
      raise ValueError(
          "functional_sam needs outputs_fn= (params -> outputs) and exactly "
          "one of output_grads= (the loss gradient w.r.t. the outputs at "
          "params, from sam_optax.functional_value_and_grad) or loss_fn= "
          "(outputs -> scalar loss).")
    if params is None:
      raise ValueError("functional_sam needs the params: tx.update(grads, "
                       "state, params, outputs_fn=..., output_grads=...).")
    if value_and_grad and loss_fn is None:
      raise ValueError(
          "functional_sam with value_and_grad=True logs the perturbed loss "
          "loss_fn(outputs_fn(params + eps)): pass loss_fn= to update.")
    if output_grads is None:
      clean_loss, output_grads = jax.value_and_grad(loss_fn)(
          outputs_fn(params))
      if extra_args.get("value") is None:
        extra_args["value"] = clean_loss
    cotangent = jax.lax.stop_gradient(output_grads)

    def functional_grad(perturbed):
      outputs, pullback = jax.vjp(outputs_fn, perturbed)
      ct = jax.tree.map(lambda c, o: jnp.asarray(c).astype(o.dtype),
                        cotangent, outputs)
      (g_f,) = pullback(ct)
      if value_and_grad:
        return loss_fn(outputs), g_f
      return g_f

    return inner.update(updates, state, params, grad_fn=functional_grad,
                        **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


functional_sam.__signature__ = functional_sam.__signature__.replace(
    parameters=[p for p in functional_sam.__signature__.parameters.values()
                if p.name != "has_aux"])
