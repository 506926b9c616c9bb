"""``sam``: Sharpness-Aware Minimization as an Optax gradient transformation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from sam_optax._core import gradient as _gradient
from sam_optax._core import skeleton as _skeleton
from sam_optax._core import validation as _validation


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
    exact_norms: bool = False,
    rho_multipliers: Any = None,
    skip_zero_radius: bool = True,
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
  gradient at the perturbed point. Instead of ``grad_fn`` you may pass
  ``obj_fn(params) -> loss`` (Levanter's and ``optax.contrib.sophia``'s
  name; ``(loss, aux)`` with ``has_aux``): it is used as
  ``grad_fn=jax.grad(obj_fn)``, or ``jax.value_and_grad(obj_fn)`` with
  ``value_and_grad=True`` (the perturbed loss comes free); both at once is
  an error. Other keyword arguments, ``obj_fn`` included, are passed on to
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
    exact_norms: also log :math:`\|g\|_2` and the achieved
      :math:`\|\epsilon\|_2` in the state (``grad_norm``,
      ``perturbation_norm``). Free for SAM with float32 params; for ASAM two
      more reductions over the params (measured: up to 1.2x the step time of
      a hand-written ASAM step on MLPs), and one more pass for bf16/fp16
      params. By default the state logs what the step computes anyway:
      ``ascent_norm`` (:math:`\|Tg\|_2`, i.e. :math:`\|g\|_2` for SAM) and
      ``radius`` (ρ, or 0 for a zero gradient).
    rho_multipliers: per-leaf radii: leaf :math:`l` is perturbed by
      :math:`m_l\,\epsilon_l`, with ε as above (the norm stays the global
      one, so :math:`m_l = 1` everywhere is SAM). ``None`` (all 1), a
      pytree of scalars shaped like the params (or a prefix of them), or a
      callable ``(path, shape) -> scalar`` (``path`` as
      :func:`sam_optax.path_mask` sees it). This expresses layerwise
      perturbation scaling, e.g. the spectral rule behind μP² (Haas et al.,
      2024), :math:`m_l \propto \sqrt{\text{fan\_out}/\text{fan\_in}}`
      for a ``(fan_in, fan_out)`` kernel (see ``docs/language_models.md``).
      ``radius`` still logs ρ; ``exact_norms`` measures the scaled ε.
    skip_zero_radius: with a traced ρ (a schedule, ``inject_hyperparams``),
      choose with a ``lax.cond`` on ρ > 0, so a step whose ρ is exactly 0 is
      the base step and calls no ``grad_fn`` (late-phase SAM's early steps
      cost one gradient). ``False`` computes the step straight-line: a zero ρ
      then pays the second gradient (ε = 0, the same update), but nothing
      runs inside a ``cond``. Use ``False`` for convolutional models on
      XLA:CPU, which runs convolutions inside a ``cond`` branch on a much
      slower path (measured: SAM 33x the SGD step inside the ``cond``
      against 3.1x straight-line on a small CNN, ``docs/benchmarks.md``).
      A Python ρ never needs the ``cond``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.SAMState` (``method_state`` is ``None``).

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
    >>> round(float(state.radius), 4)  # ‖ε‖ = ρ unless g = 0.
    0.05

  .. note::
    BatchNorm: compute the new batch statistics in the clean pass and drop
    those of the perturbed pass (``has_aux=True``), as google-research/sam.

  .. note::
    A step whose ρ is exactly 0 (a schedule such as
    :func:`sam_optax.late_phase`, or ρ set to 0 under
    ``optax.inject_hyperparams``) is the base optimizer's step on the clean
    gradient, bit for bit, and calls no ``grad_fn``: the choice is a
    ``lax.cond`` on the step's ρ (none for a Python ρ), the same in every
    method that calls ``grad_fn``. Under ``jax.vmap`` with a batched ρ the
    ``cond`` becomes a ``select``: both branches run (correct, not cheaper).
    On XLA:CPU, convolutions inside the ``cond``'s SAM branch run on a
    slower path (jax-ml/jax#12868): for a CNN on CPU with a scheduled ρ,
    pass ``skip_zero_radius=False``, or (late-phase SAM) switch between two
    Python radii as docs/variants.md shows.

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
  _validation.check_bools(sync_ascent=sync_ascent)
  if rho_multipliers is not None and not callable(rho_multipliers):
    jax.tree.map(lambda m: _validation.check_non_negative(
        "rho_multipliers", m), rho_multipliers)
  synced = sync_ascent or ascent_groups is not None
  if axis_name is None and synced:
    raise ValueError("sync_ascent and ascent_groups need an axis_name.")

  def rule(step, method_state):
    ascent = step.grads
    if synced:
      ascent = _gradient.sync_ascent_grads(ascent, axis_name, ascent_groups)
    g_sam, info = step.sam_gradient(ascent, microbatched=microbatched)
    return g_sam, method_state, info

  return _skeleton.transformation(
      "sam", base_tx, rule, rho,
      _gradient.AscentOptions(adaptive, eta, eps, mask, adaptive_mask,
                              perturb_in_float32, exact_norms,
                              rho_multipliers),
      axis_name=axis_name, has_aux=has_aux, value_and_grad=value_and_grad,
      microbatched=microbatched, local_grads=not synced,
      skip_zero_radius=skip_zero_radius)
