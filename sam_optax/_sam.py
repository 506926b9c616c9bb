"""``sam``: Sharpness-Aware Minimization as an Optax gradient transformation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _gradient, _validation


class SAMState(NamedTuple):
  """State of :func:`sam`.

  Attributes:
    sam_count: number of ``update`` calls (micro-steps under
      ``optax.MultiSteps``).
    base_state: the wrapped optimizer's state.
    grad_norm: ‖g‖₂ of the last ascent gradient (over the perturbed leaves;
      averaged over devices when ``axis_name`` is set).
    perturbation_norm: the last achieved ‖ε‖₂ (after rounding to the params'
      dtype).
    perturbed_loss: the loss at the perturbed params, ``L(w + ε)``, when
      ``grad_fn`` returns it (``value_and_grad=True``); ``None`` otherwise.
    sharpness: ``L(w + ε) − L(w)`` when ``value_and_grad=True`` and the clean
      loss is passed as ``value=`` to ``update``; NaN if it was not passed;
      ``None`` when ``value_and_grad=False``.
  """

  sam_count: jax.Array  # shape=(), dtype=jnp.int32
  base_state: optax.OptState
  grad_norm: jax.Array  # shape=(), dtype=jnp.float32
  perturbation_norm: jax.Array  # shape=(), dtype=jnp.float32
  perturbed_loss: jax.Array | None  # shape=(), dtype=jnp.float32
  sharpness: jax.Array | None  # shape=(), dtype=jnp.float32


def sam(
    base_tx: optax.GradientTransformation | optax.MultiSteps,
    rho: optax.ScalarOrSchedule = 0.05,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    *,
    eps: float | jax.Array = 1e-12,
    mask: Any = None,
    adaptive_mask: Any = None,
    axis_name: Any = None,
    sync_ascent: bool = False,
    ascent_groups: Sequence[Sequence[int]] | None = None,
    has_aux: bool = False,
    value_and_grad: bool = False,
    microbatched: bool = False,
    perturb_in_float32: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization (SAM) and its adaptive variant (ASAM).

  SAM minimises the worst loss in a ball of radius ρ around the weights,
  :math:`\min_w \max_{\|\epsilon\| \le \rho} L(w + \epsilon)`, with a
  first-order step: from the gradient :math:`g = \nabla L(w)` it builds

  .. math::

    \epsilon = \rho\,\frac{g}{\|g\|_2 + \mathrm{eps}}
    \quad\text{(SAM)},\qquad
    \epsilon = \rho\,\frac{T^2 g}{\|T g\|_2 + \mathrm{eps}},\;
    T = |w| + \eta \quad\text{(ASAM)},

  evaluates :math:`g_{\rm SAM} = \nabla L(w + \epsilon)` with ``grad_fn``, and
  hands :math:`g_{\rm SAM}` to ``base_tx``, which updates ``w`` (not
  :math:`w + \epsilon`).

  ``update(updates, state, params, *, grad_fn, **extra_args)``: ``updates``
  is the gradient at ``params``; ``grad_fn(perturbed_params)`` returns the
  gradient at the perturbed point. Other keyword arguments are passed on to
  ``base_tx``.

  Args:
    base_tx: the optimizer that applies the SAM gradient: any Optax
      transformation. ``sam`` wraps the *whole* base pipeline, so
      ``sam(optax.chain(optax.clip_by_global_norm(1.), optax.sgd(.1)))`` clips
      the SAM gradient, whereas a clip chained before ``sam`` only shapes the
      ascent direction. For gradient accumulation pass ``optax.MultiSteps``
      here (``sam(optax.MultiSteps(base, k))``), never the other way round.
    rho: the radius ρ ≥ 0, or an Optax schedule of the step (evaluated at the
      number of base-optimizer steps: ``gradient_step`` under MultiSteps).
      Typical: 0.05 for SAM (0.01 to 0.2), about 10x larger for ASAM (0.5
      to 2).
    adaptive: ``True`` for ASAM (Kwon et al., 2021).
    eta: ASAM's η ≥ 0, added to :math:`|w|` so that zero weights still move.
    eps: added to the norm in the denominator. A zero gradient gives ε = 0
      (never NaN) whatever its value.
    mask: which leaves are perturbed: ``None`` (all float leaves), a pytree
      (or prefix) of bools, a callable ``params -> pytree of bools``, or a
      :class:`sam_optax.PathMask` (:func:`sam_optax.path_mask`,
      :func:`sam_optax.ndim_mask`). Masked-out leaves are not perturbed and do
      not enter the norm; they still receive the gradient at the perturbed
      point. E.g. ``mask=sam_optax.ndim_mask()`` leaves biases and
      normalisation parameters unperturbed; its negation perturbs only them
      (SAM-ON).
    adaptive_mask: with ``adaptive=True``, which perturbed leaves are
      rescaled by :math:`T = |w| + \eta`; the others use :math:`T = 1`.
      Default ``None``: every leaf, the paper's elementwise operator. The
      official ASAM code uses :math:`T = 1` for biases:
      ``adaptive_mask=sam_optax.exclude_biases()`` reproduces it.
    axis_name: data parallelism under ``jax.pmap``/``jax.shard_map``. Each
      device perturbs with its *local* gradient (m-sharpness with m = the
      per-device batch), and the SAM gradients are averaged with
      ``lax.pmean``: pass local, un-averaged gradients as ``updates``. Under
      ``shard_map`` take them w.r.t. :func:`sam_optax.mark_varying` params.
    sync_ascent: with ``axis_name``, average the ascent gradient over all
      devices first (m = the global batch, as single-device SAM).
    ascent_groups: with ``axis_name``, average the ascent gradient within
      these groups of device indices (``axis_index_groups``, ``pmap`` only):
      m = the group's batch.
    has_aux: ``grad_fn`` returns ``(gradient, aux)`` (``jax.grad(...,
      has_aux=True)``); ``aux`` is dropped (e.g. the perturbed pass's
      BatchNorm statistics). Use :func:`sam_optax.sam_gradient` to keep it.
    value_and_grad: ``grad_fn`` returns ``(loss, gradient)`` like
      ``jax.value_and_grad`` (``((loss, aux), gradient)`` with ``has_aux``);
      the perturbed loss is stored in the state, and with ``value=loss`` passed
      to ``update`` so is the sharpness ``L(w + ε) − L(w)``.
    microbatched: in-device m-sharpness: ``updates`` carries a leading
      micro-batch axis (one gradient per micro-batch) and ``grad_fn`` takes
      params stacked along it. Each micro-batch gets its own ε; the SAM
      gradients are averaged. See :func:`sam_optax.split_microbatches`.
    perturb_in_float32: give ``grad_fn`` float32 perturbed params when the
      params are bf16/fp16: :math:`w + \epsilon` rounded to bf16 loses most
      of ε on large models. ``grad_fn`` must then accept float32 params.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SAMState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> def loss_fn(w, x):
    ...   return jnp.mean((x @ w - 1.0) ** 2)
    >>> x = jnp.eye(3)
    >>> params = jnp.zeros(3)
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   grads = jax.grad(loss_fn)(params, x)
    ...   updates, state = tx.update(
    ...       grads, state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, x))
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(100):
    ...   params, state = step(params, state)
    >>> params.round(2)
    Array([1., 1., 1.], dtype=float32)
    >>> round(float(state.perturbation_norm), 4)  # ‖ε‖ = ρ unless g = 0.
    0.05

  .. note::
    BatchNorm: compute the new batch statistics in the clean pass and drop
    those of the perturbed pass (``has_aux=True``), as google-research/sam.

  .. note::
    ``optax.MultiSteps(sam(base))`` is wrong: it perturbs along the running
    mean of the micro-batch gradients and evaluates only the last micro-batch
    there. Use ``sam(optax.MultiSteps(base, k))``: SAM per micro-batch, SAM
    gradients accumulated.

  .. note::
    Under ``optax.inject_hyperparams`` (``rho`` then shows in
    ``state.hyperparams``), a plain callable ``mask`` would be taken for a
    schedule: use a :class:`sam_optax.PathMask` or pass
    ``static_args=('mask',)``.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  base_tx = _validation.check_base(base_tx)
  for name, value in (("rho", rho), ("eta", eta), ("eps", eps)):
    _validation.check_non_negative(name, value)
  _validation.check_bools(
      adaptive=adaptive, sync_ascent=sync_ascent, has_aux=has_aux,
      value_and_grad=value_and_grad, microbatched=microbatched,
      perturb_in_float32=perturb_in_float32)
  if axis_name is None and (sync_ascent or ascent_groups is not None):
    raise ValueError("sync_ascent and ascent_groups need an axis_name.")

  def init_fn(params):
    scalar = jnp.zeros([], jnp.float32)
    return SAMState(
        sam_count=jnp.zeros([], jnp.int32),
        base_state=base_tx.init(params),
        grad_norm=scalar,
        perturbation_norm=scalar,
        perturbed_loss=scalar if value_and_grad else None,
        sharpness=scalar if value_and_grad else None,
    )

  def split_output(out):
    """Normalises ``grad_fn``'s output to ``(gradient, (loss, aux))``."""
    if value_and_grad:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "With value_and_grad=True, grad_fn must return (loss, gradient) "
            f"like jax.value_and_grad; got {type(out).__name__}.")
      value, grads = out
      loss, aux = value if has_aux else (value, None)
      return grads, (loss, aux)
    if has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "With has_aux=True, grad_fn must return (gradient, aux); got "
            f"{type(out).__name__}.")
      grads, aux = out
      return grads, (None, aux)
    return out, (None, None)

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    _validation.check_call("sam", grad_fn, params)
    base_state = state.base_state
    rho_t = _validation.rho_at(rho, state.sam_count, base_state)

    sam_grads, info = _gradient.sam_gradient(
        lambda p: split_output(grad_fn(p)), params, updates, rho_t, adaptive,
        eta, eps=eps, mask=mask, adaptive_mask=adaptive_mask, has_aux=True,
        axis_name=axis_name, sync_ascent=sync_ascent,
        ascent_groups=ascent_groups, microbatched=microbatched,
        perturb_in_float32=perturb_in_float32)
    perturbed_loss, _ = info.aux
    sharpness = None
    if value_and_grad:
      perturbed_loss = jnp.mean(jnp.asarray(perturbed_loss, jnp.float32))
      if axis_name is not None:
        perturbed_loss = jax.lax.pmean(perturbed_loss, axis_name)
      clean_loss = extra_args.get("value")
      if clean_loss is None:
        sharpness = jnp.full([], jnp.nan, jnp.float32)
      else:
        clean_loss = jnp.mean(jnp.asarray(clean_loss, jnp.float32))
        if axis_name is not None:
          clean_loss = jax.lax.pmean(clean_loss, axis_name)
        sharpness = perturbed_loss - clean_loss
    else:
      perturbed_loss = None

    new_updates, base_state = base_tx.update(
        sam_grads, base_state, params, **extra_args)
    return new_updates, SAMState(
        sam_count=optax.safe_increment(state.sam_count),
        base_state=base_state,
        grad_norm=info.grad_norm,
        perturbation_norm=info.perturbation_norm,
        perturbed_loss=perturbed_loss,
        sharpness=sharpness,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

