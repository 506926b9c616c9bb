"""The skeleton every SAM-family transformation is built on.

A method (``sam``, ``gsam``, ``looksam``, ...) supplies only its *rule*: how
to turn the clean gradient, the ``grad_fn`` and its own state into the
gradient the base optimizer applies. :func:`transformation` owns the rest,
the same for every method, as ``optax.MultiSteps`` owns its inner state:

* argument checks (the base optimizer, ρ, η, eps, the static flags);
* ``init``: the step count, the base optimizer's state, the method's state
  and the logged scalars, all of a structure known at ``init``;
* ``update``: the call checks (``grad_fn`` and ``params`` given, the axis
  bound, the gradient shaped like the params and local to the device), ρ at
  the step (outer steps under ``optax.MultiSteps``), the unpacking of
  ``grad_fn``'s output (``has_aux``, ``value_and_grad``), the perturbed loss
  and sharpness, and the base optimizer's update of ``w``.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sam_optax._core import gradient as _gradient
from sam_optax._core import perturbation as _perturbation
from sam_optax._core import sharding as _sharding
from sam_optax._core import validation as _validation


class SAMState(NamedTuple):
  r"""State of :func:`sam_optax.sam` and every SAM variant.

  Attributes:
    step_count: number of ``update`` calls (micro-steps under
      ``optax.MultiSteps``).
    base_state: the wrapped optimizer's state.
    method_state: what the method keeps between steps (``None`` for SAM and
      GSAM; e.g. :class:`sam_optax.LookSAMState`).
    ascent_norm: :math:`\|T g\|_2` of the last ascent gradient over the
      perturbed leaves (:math:`\|g\|_2` for SAM; averaged over devices and
      micro-batches).
    radius: the radius of the last ε: ρ, or 0 if the ascent gradient was 0
      (or the step computed no ε, e.g. LookSAM's reuse steps).
    grad_norm: :math:`\|g\|_2` of the last ascent gradient with
      ``exact_norms=True``; ``None`` otherwise.
    perturbation_norm: the last achieved :math:`\|\epsilon\|_2` (after
      rounding to the params' dtype) with ``exact_norms=True``; ``None``
      otherwise.
    perturbed_loss: the loss at the perturbed params, :math:`L(w + \epsilon)`,
      when ``grad_fn`` returns it (``value_and_grad=True``); ``None``
      otherwise.
    sharpness: :math:`L(w + \epsilon) - L(w)` when ``value_and_grad=True`` and
      the clean loss is passed as ``value=`` to ``update``; NaN if it was not
      passed; ``None`` when ``value_and_grad=False``.
  """

  step_count: jax.Array  # shape=(), dtype=jnp.int32
  base_state: optax.OptState
  method_state: Any
  ascent_norm: jax.Array  # shape=(), dtype=jnp.float32
  radius: jax.Array  # shape=(), dtype=jnp.float32
  grad_norm: jax.Array | None  # shape=(), dtype=jnp.float32
  perturbation_norm: jax.Array | None  # shape=(), dtype=jnp.float32
  perturbed_loss: jax.Array | None  # shape=(), dtype=jnp.float32
  sharpness: jax.Array | None  # shape=(), dtype=jnp.float32


class Step(NamedTuple):
  """What a method's rule sees at one ``update``.

  Attributes:
    grads: the clean gradient at ``params``, checked and in the params'
      structure (local to the device under ``axis_name``; with a leading
      micro-batch axis under ``microbatched``).
    params: the parameters w.
    rho: ρ at this step.
    step_count: the number of earlier ``update`` calls.
    grad_fn: ``grad_fn(perturbed_params) -> (gradient, loss)``; ``loss`` is
      ``None`` unless ``value_and_grad``.
    options: the ascent options shared by every method.
    axis_name: the data-parallel axis, or ``None``.
    value_and_grad: whether ``grad_fn`` returns the perturbed loss.
    base_state: the base optimizer's state *before* this update (read by
      one-gradient methods that perturb along the base optimizer's momentum,
      e.g. MSAM).
  """

  grads: Any
  params: Any
  rho: Any
  step_count: jax.Array
  grad_fn: Callable[[Any], tuple[Any, Any]]
  options: _gradient.AscentOptions
  axis_name: Any
  value_and_grad: bool
  base_state: Any = None

  def local_sam_gradient(self, ascent_grads: Any = None, *,
                         microbatched: bool = False
                         ) -> tuple[Any, _gradient.SAMInfo]:
    """This device's ∇L(w + ε) with ε from ``ascent_grads`` (default: g)."""
    ascent_grads = self.grads if ascent_grads is None else ascent_grads
    return _gradient.perturbed_gradient(
        self.grad_fn, self.params, ascent_grads, self.rho, self.options,
        axis_name=self.axis_name, microbatched=microbatched)

  def sam_gradient(self, ascent_grads: Any = None, *,
                   microbatched: bool = False
                   ) -> tuple[Any, _gradient.SAMInfo]:
    """∇L(w + ε), and the norms, averaged over the devices."""
    g_sam, info = self.local_sam_gradient(ascent_grads,
                                          microbatched=microbatched)
    return self.pmean_with_info(g_sam, info)

  def pmean(self, tree: Any) -> Any:
    """``lax.pmean`` over the data-parallel axis (identity without one)."""
    return tree if self.axis_name is None else lax.pmean(tree, self.axis_name)

  def pmean_with_info(self, tree: Any, info: _gradient.SAMInfo
                      ) -> tuple[Any, _gradient.SAMInfo]:
    """Averages ``tree`` and the logged norms in one collective."""
    tree, norms = self.pmean((tree, info[:4]))
    return tree, _gradient.SAMInfo(*norms, info.aux)

  def info_without_ascent(self) -> _gradient.SAMInfo:
    """This device's info for a step that computes no ε (radius 0, loss NaN).

    The norms are those of the ascent the step would have taken (e.g. for
    LookSAM's reuse steps); average them with :meth:`pmean_with_info`.
    """
    p = _perturbation.ascent_direction(
        self.grads, self.params, 0.0, adaptive=self.options.adaptive,
        eta=self.options.eta, mask=self.options.mask,
        adaptive_mask=self.options.adaptive_mask,
        exact_norms=self.options.exact_norms)
    zero = jnp.zeros([], jnp.float32)
    norms = jax.tree.map(lambda x: x.astype(jnp.float32),
                         (p.ascent_norm, zero, p.grad_norm, p.norm))
    loss = jnp.full([], jnp.nan, jnp.float32) if self.value_and_grad else None
    return _gradient.SAMInfo(*norms, aux=loss)


# rule(step, method_state) -> (gradient, new_method_state, info): the gradient
# for the base optimizer and the info, both averaged over the devices.
Rule = Callable[[Step, Any], tuple[Any, Any, _gradient.SAMInfo]]
# finish(step, updates, base_state, method_state) -> (updates, method_state).
Finish = Callable[[Step, Any, Any, Any], tuple[Any, Any]]
# zero_radius(step, method_state, mean_grads) -> method_state: the method's
# state after a step whose ρ is 0 (``mean_grads``: the clean gradient
# averaged over the devices and micro-batches, the one the base optimizer
# applies).
ZeroRadius = Callable[[Step, Any, Any], Any]


def _keep_state(step: Step, method_state: Any, mean_grads: Any) -> Any:
  del step, mean_grads
  return method_state


def is_python_zero(rho: Any) -> bool:
  """Whether ``rho`` is the Python (or NumPy scalar) number 0."""
  return (isinstance(rho, numbers.Number) and not isinstance(rho, bool)
          and rho == 0)


def zero_radius_step(step: Step, method_state: Any, *,
                     microbatched: bool = False,
                     zero_radius: ZeroRadius = _keep_state
                     ) -> tuple[Any, Any, _gradient.SAMInfo]:
  """The rule's output at ρ = 0: the clean gradient (averaged over the
  devices and micro-batches), ``zero_radius``'s method state, no ε; no call
  of ``grad_fn``. Every logged norm is 0 (no ascent was computed: measuring
  ‖g‖ would cost a pass over the gradient), the perturbed loss NaN."""
  grads = step.grads
  if microbatched:
    grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
  grads = step.pmean(grads)
  zero = jnp.zeros([], jnp.float32)
  exact = zero if step.options.exact_norms else None
  loss = jnp.full([], jnp.nan, jnp.float32) if step.value_and_grad else None
  info = _gradient.SAMInfo(zero, zero, exact, exact, loss)
  return grads, zero_radius(step, method_state, grads), info


def skip_at_zero_radius(rule: Rule, step: Step, method_state: Any, *,
                        template: Any, microbatched: bool = False,
                        zero_radius: ZeroRadius = _keep_state
                        ) -> tuple[Any, Any, _gradient.SAMInfo]:
  """``rule``, or :func:`zero_radius_step` where ρ is 0 at this step.

  A Python ρ chooses in Python (no ``lax.cond``); a traced ρ (a schedule,
  ``inject_hyperparams``) chooses with ``lax.cond``, so that a zero-radius
  step calls no ``grad_fn``. Both branches average over the devices
  themselves (ρ is the same on every device, so every device takes the same
  branch). Under ``jax.vmap`` with a batched ρ the ``cond`` becomes a
  ``select``: both branches run, the result is still the chosen one.
  """
  if isinstance(step.rho, numbers.Number):
    if is_python_zero(step.rho):
      return zero_radius_step(step, method_state, microbatched=microbatched,
                              zero_radius=zero_radius)
    return rule(step, method_state)

  def typed(out):
    gradient, new_state, info = out
    gradient = jax.tree.map(lambda x, g: x.astype(g.dtype), gradient,
                            template)
    new_state = jax.tree.map(
        lambda x, old: jnp.asarray(x).astype(jnp.result_type(old)),
        new_state, method_state)
    info = _gradient.SAMInfo(
        *jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tuple(info[:4])),
        None if info.aux is None else jnp.asarray(info.aux, jnp.float32))
    return gradient, new_state, info

  return lax.cond(
      step.rho > 0, lambda: typed(rule(step, method_state)),
      lambda: typed(zero_radius_step(step, method_state,
                                     microbatched=microbatched,
                                     zero_radius=zero_radius)))


def applied_steps(count: jax.Array, base_state: Any) -> jax.Array:
  """The number of base-optimizer steps: ``count``, or the outer (gradient)
  steps of an ``optax.MultiSteps`` (also inside ``optax.apply_if_finite``,
  whose skipped steps do not advance ``count``)."""
  if isinstance(base_state, optax.ApplyIfFiniteState):
    return applied_steps(count, base_state.inner_state)
  if isinstance(base_state, optax.MultiStepsState):
    return base_state.gradient_step
  return count


def rho_at(rho: optax.ScalarOrSchedule, count: jax.Array,
           base_state: Any) -> Any:
  """ρ at the number of base-optimizer steps, clipped at 0.

  A schedule is evaluated at :func:`applied_steps`. A ρ that is not a
  Python number (a schedule's value, or one set under
  ``inject_hyperparams``) is clipped at 0, as Optax's schedules clamp: a
  negative ρ would turn the ascent into a descent.
  """
  if callable(rho):
    rho = rho(applied_steps(count, base_state))
  if isinstance(rho, numbers.Number):
    return rho  # Validated >= 0 when the transformation was built.
  return jnp.maximum(rho, 0)


def _unpack(out: Any, has_aux: bool, value_and_grad: bool
            ) -> tuple[Any, Any]:
  """``grad_fn``'s output as ``(gradient, loss or None)``; aux dropped."""
  if value_and_grad:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
          "With value_and_grad=True, grad_fn must return (loss, gradient) "
          f"like jax.value_and_grad; got {type(out).__name__}.")
    value, grads = out
    loss = value[0] if has_aux else value
    return grads, jnp.mean(jnp.asarray(loss, jnp.float32))
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
          "With has_aux=True, grad_fn must return (gradient, aux); got "
          f"{type(out).__name__}.")
    return out[0], None
  return out, None


def variant(name: str, base_tx: Any, rule: Rule,
            rho: optax.ScalarOrSchedule, options: dict[str, Any],
            **skeleton_args: Any) -> optax.GradientTransformationExtraArgs:
  """:func:`transformation` for a method that takes ``sam``'s options as
  keyword arguments (``options``), with a clear error for unknown ones.
  ``skeleton_args`` go to :func:`transformation` (``init_method_state``,
  ``needs_grad_fn``, ``finish``, ``zero_radius``)."""
  unknown = sorted(set(options) - set(COMMON_OPTIONS))
  if unknown:
    raise TypeError(
        f"{name}() got unexpected keyword arguments {unknown}; it takes "
        f"{', '.join(COMMON_OPTIONS)} (as sam_optax.sam).")
  options = {**COMMON_OPTIONS, **options}
  return transformation(
      name, base_tx, rule, rho,
      _gradient.AscentOptions(
          **{k: options[k] for k in _gradient.AscentOptions._fields}),
      axis_name=options["axis_name"], has_aux=options["has_aux"],
      value_and_grad=options["value_and_grad"],
      skip_zero_radius=options["skip_zero_radius"], **skeleton_args)


def _scalar_mean(x: Any, axis_name: Any) -> jax.Array:
  x = jnp.mean(jnp.asarray(x, jnp.float32))
  return x if axis_name is None else lax.pmean(x, axis_name)


# The keyword arguments every method takes, with their defaults (see
# :func:`sam_optax.sam`).
COMMON_OPTIONS = {
    "adaptive": False, "eta": 0.01, "eps": 1e-12, "mask": None,
    "adaptive_mask": None, "axis_name": None, "has_aux": False,
    "value_and_grad": False, "perturb_in_float32": False,
    "exact_norms": False, "rho_multipliers": None, "skip_zero_radius": True,
}


def takes_sam_options(method: Callable[..., Any]) -> Callable[..., Any]:
  """Spells ``sam``'s options out in the signature of ``method(**options)``.

  ``inspect.signature`` (hence ``help``, the docs and
  ``optax.inject_hyperparams``, which injects ``eta`` and ``eps`` like the
  method's own numbers) then sees every option as a keyword argument.
  """
  signature = inspect.signature(method)
  own = [p for p in signature.parameters.values()
         if p.kind is not inspect.Parameter.VAR_KEYWORD]
  common = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                              default=default)
            for name, default in COMMON_OPTIONS.items()]
  method.__signature__ = signature.replace(parameters=own + common)
  return method


def transformation(
    name: str,
    base_tx: Any,
    rule: Rule,
    rho: optax.ScalarOrSchedule,
    options: _gradient.AscentOptions,
    *,
    axis_name: Any = None,
    has_aux: bool = False,
    value_and_grad: bool = False,
    init_method_state: Callable[[Any], Any] = lambda params: None,
    microbatched: bool = False,
    local_grads: bool = True,
    needs_grad_fn: bool = True,
    finish: Finish | None = None,
    zero_radius: ZeroRadius | None = None,
    skip_zero_radius: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Builds a SAM-family transformation around ``rule``.

  Args:
    name: the method's name, for error messages.
    base_tx: the optimizer that applies the rule's gradient (an Optax
      transformation or ``optax.MultiSteps``).
    rule: ``rule(step, method_state) -> (gradient, method_state, info)``.
    rho: the radius or its schedule.
    options: how ε is built (``adaptive``, ``eta``, ``eps``, the masks,
      ``perturb_in_float32``, ``exact_norms``), validated here.
    axis_name: the data-parallel axis of ``pmap``/``shard_map``, or ``None``.
    has_aux: ``grad_fn`` returns ``(gradient, aux)``; ``aux`` is dropped.
    value_and_grad: ``grad_fn`` returns ``(loss, gradient)``.
    init_method_state: ``params -> method_state``.
    microbatched: the gradient passed to ``update`` has a leading
      micro-batch axis.
    local_grads: under ``axis_name``, reject gradients already reduced over
      the axis (``False`` when the rule averages them itself).
    needs_grad_fn: ``False`` for one-gradient methods, whose train step is a
      plain Optax step: ``grad_fn`` is then optional and ``step.grad_fn`` is
      whatever the caller passed (possibly ``None``).
    finish: ``finish(step, updates, base_state, method_state) -> (updates,
      method_state)``, run after the base optimizer's update: e.g. to move
      the held params to the next perturbed point (MSAM). Methods whose held
      params are not the clean ones also register how to undo that with
      :func:`sam_optax._core.eval_params.register`.
    zero_radius: ``zero_radius(step, method_state, mean_grads) ->
      method_state``, the method's state after a step whose ρ is exactly 0
      (default: unchanged). Such a step is the base optimizer's step on the
      clean gradient and calls no ``grad_fn`` (:func:`skip_at_zero_radius`);
      methods with ``needs_grad_fn=False`` (one gradient) always run
      ``rule``.
    skip_zero_radius: ``False`` runs ``rule`` straight-line for a traced ρ
      (no ``lax.cond``; a zero ρ then pays the second gradient). A Python ρ
      never needs the ``cond``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SAMState`.
  """
  base_tx = _validation.check_base(base_tx)
  _validation.check_non_negative("rho", rho, schedule=True)
  for arg, value in (("eta", options.eta), ("eps", options.eps)):
    _validation.check_non_negative(arg, value)
  _validation.check_bools(
      adaptive=options.adaptive, has_aux=has_aux,
      value_and_grad=value_and_grad, microbatched=microbatched,
      perturb_in_float32=options.perturb_in_float32,
      exact_norms=options.exact_norms, skip_zero_radius=skip_zero_radius)

  def init_fn(params):
    scalar = jnp.zeros([], jnp.float32)
    exact = scalar if options.exact_norms else None
    loss = scalar if value_and_grad else None
    return SAMState(
        step_count=jnp.zeros([], jnp.int32), base_state=base_tx.init(params),
        method_state=init_method_state(params), ascent_norm=scalar,
        radius=scalar, grad_norm=exact, perturbation_norm=exact,
        perturbed_loss=loss, sharpness=loss)

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    # obj_fn stays in extra_args: a base optimizer may want it too (sophia).
    grad_fn = _validation.resolve_grad_fn(
        name, grad_fn, extra_args.get("obj_fn"), has_aux=has_aux,
        value_and_grad=value_and_grad)
    if needs_grad_fn or params is None:
      _validation.check_call(name, grad_fn, params)
    tree_name = f"The gradient passed to {name}"
    leading = ()
    if microbatched and jax.tree.leaves(updates):
      leading = jax.tree.leaves(updates)[0].shape[:1]
    grads = _gradient.conform_to_params(updates, params, tree_name, leading)
    if axis_name is not None:
      _sharding.check_axis_bound(axis_name)
      if local_grads:
        _sharding.check_local(grads, axis_name, tree_name)
    step = Step(
        grads=grads, params=params,
        rho=rho_at(rho, state.step_count, state.base_state),
        step_count=state.step_count,
        grad_fn=(None if grad_fn is None else
                 lambda p: _unpack(grad_fn(p), has_aux, value_and_grad)),
        options=options, axis_name=axis_name, value_and_grad=value_and_grad,
        base_state=state.base_state)
    template = jax.tree.map(lambda g: g[0], grads) if leading else grads
    if needs_grad_fn and (skip_zero_radius
                          or isinstance(step.rho, numbers.Number)):
      gradient, method_state, info = skip_at_zero_radius(
          rule, step, state.method_state, template=template,
          microbatched=microbatched,
          zero_radius=zero_radius or _keep_state)
    else:
      gradient, method_state, info = rule(step, state.method_state)
    perturbed_loss = sharpness = None
    if value_and_grad:
      perturbed_loss = _scalar_mean(info.aux, axis_name)
      clean_loss = extra_args.get("value")
      sharpness = (jnp.full([], jnp.nan, jnp.float32) if clean_loss is None
                   else perturbed_loss - _scalar_mean(clean_loss, axis_name))
    gradient = jax.tree.map(lambda x, g: x.astype(g.dtype), gradient,
                            template)
    new_updates, base_state = base_tx.update(
        gradient, state.base_state, params, **extra_args)
    if finish is not None:
      new_updates, method_state = finish(step, new_updates, base_state,
                                         method_state)
    new_state = SAMState(
        step_count=optax.safe_increment(state.step_count),
        base_state=base_state, method_state=method_state,
        ascent_norm=info.ascent_norm, radius=info.radius,
        grad_norm=info.grad_norm, perturbation_norm=info.perturbation_norm,
        perturbed_loss=perturbed_loss, sharpness=sharpness)
    if isinstance(base_state, optax.ApplyIfFiniteState):
      # sam(apply_if_finite(base)) skipped a non-finite gradient (from either
      # pass): the whole step is undone, not just the base optimizer's part.
      skipped = jnp.logical_not(base_state.last_finite)
      new_state = optax.tree.where(
          skipped, state._replace(base_state=base_state), new_state)
      if finish is not None:
        new_updates = optax.tree.where(
            skipped, optax.tree.zeros_like(new_updates), new_updates)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
