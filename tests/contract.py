"""The Optax contract battery's shared parts: the methods, the problems and
the base optimizers (used by tests/test_contract.py and, on 8 fake devices,
tests/multidevice/test_contract_sharding.py).

``METHODS`` has one entry per method of the package. An entry says how to
build the method around a base optimizer and how a train step calls it,
through the method's documented convention (``grad_fn``, ESAM's per-example
loss and batch, SAF/MESA's trajectory loss, or a plain Optax step for the
methods that hold perturbed params); the battery then reads the params to
evaluate with ``sam_optax.eval_params`` for every method. A new method joins
the battery with one entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sam_optax

# SAF/MESA read outputs ("logits") per example: one example, two outputs.
NUM_OUTPUTS = 2


class Problem(NamedTuple):
  """A loss written as a sum of per-example terms.

  Attributes:
    params: the initial params.
    target: the minimiser.
    terms: ``params -> (n,)`` terms whose sum is the loss (ESAM's examples).
    outputs_fn: ``params -> (1, NUM_OUTPUTS)``, the "logits" SAF and MESA
      track (default: the first params, see :meth:`outputs`).
  """

  params: Any
  target: Any
  terms: Callable[[Any], jax.Array]
  outputs_fn: Callable[[Any], jax.Array] | None = None

  def loss(self, params):
    return jnp.sum(self.terms(params))

  def grad(self, params):
    return jax.grad(self.loss)(params)

  @property
  def batch(self):
    """Every term twice: ESAM's data selection with gamma = 1/2 then keeps
    n of 2n examples, the sharpest terms' copies, and all n terms once
    where the increases tie (rho = 0)."""
    n = jax.eval_shape(self.terms, self.params).shape[0]
    return jnp.tile(jnp.arange(n), 2)

  def example_loss(self, params, batch):
    """n times each term, so that the mean over the batch is the loss."""
    terms = self.terms(params)
    return terms.shape[0] * terms[batch]

  def outputs(self, params):
    """The two "logits" of the one example SAF and MESA track."""
    if self.outputs_fn is not None:
      return self.outputs_fn(params).astype(jnp.float32)
    flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(params)])
    return jnp.tile(flat, NUM_OUTPUTS)[:NUM_OUTPUTS][None].astype(jnp.float32)


def squared_distance(params, target):
  """The quadratic ``sum((params - target)**2)`` as a :class:`Problem`."""

  def terms(p):
    return jnp.concatenate([
        jnp.ravel(jnp.square(x - y)) for x, y in
        zip(jax.tree.leaves(p), jax.tree.leaves(target))])

  return Problem(params, target, terms)


# optax/contrib/_common_test.py's targets (same points, same losses).
def parabola(dtype=jnp.float32):
  return squared_distance(jnp.array([-1.0, 10.0, 1.0], dtype),
                          jnp.array([1.0, -1.0, 1.0], dtype))


def rosenbrock(dtype=jnp.float32):
  a, b = 1.0, 100.0

  def terms(p):
    return jnp.stack([jnp.square(a - p[0]), b * jnp.square(p[1] - p[0] ** 2)])

  return Problem(jnp.zeros(2, dtype), jnp.array([a, a ** 2], dtype), terms)


def matrix_parabola(dtype=jnp.float32):
  return squared_distance(jnp.zeros((2, 2), dtype),
                          jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype))


def mixed_tensors(dtype=jnp.float32):
  return squared_distance(
      (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)),
      (jnp.array([1.0, -1.0, 2.0], dtype),
       jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)))


TARGETS = {"parabola": parabola, "rosenbrock": rosenbrock,
           "matrix_parabola": matrix_parabola, "mixed_tensors": mixed_tensors}

# optax/contrib/_common_test.py's _BASE_OPTIMIZERS: optax tests a wrapper
# over each of them, learning rate 1 (mechanize learns the scale).
BASES = {
    "sgd": ("sgd", {"learning_rate": 1.0}),
    "sgd_momentum": ("sgd", {"learning_rate": 1.0, "momentum": 0.9}),
    "adam": ("adam", {"learning_rate": 1.0}),
    "adamw": ("adamw", {"learning_rate": 1.0}),
    "adamax": ("adamax", {"learning_rate": 1.0}),
    "adamaxw": ("adamaxw", {"learning_rate": 1.0}),
    "adan": ("adan", {"learning_rate": 1.0}),
    "amsgrad": ("amsgrad", {"learning_rate": 1.0}),
    "lamb": ("lamb", {"learning_rate": 1.0}),
    "lion": ("lion", {"learning_rate": 1.0, "b1": 0.99}),
    "noisy_sgd": ("noisy_sgd", {"learning_rate": 1.0, "eta": 1e-4,
                                "key": 0}),
    "novograd": ("novograd", {"learning_rate": 1.0}),
    "optimistic_gradient_descent": (
        "optimistic_gradient_descent",
        {"learning_rate": 1.0, "alpha": 0.7, "beta": 0.1}),
    "rmsprop": ("rmsprop", {"learning_rate": 1.0}),
    "rmsprop_momentum": ("rmsprop", {"learning_rate": 1.0, "momentum": 0.9}),
    "adabelief": ("adabelief", {"learning_rate": 1.0}),
    "radam": ("radam", {"learning_rate": 1.0}),
    "sm3": ("sm3", {"learning_rate": 3.0}),
    "yogi": ("yogi", {"learning_rate": 1.0, "b1": 0.99}),
}


# The step-size scale of the convergence runs: the listed optimizer's step
# times a cosine decay from this value to 0 (optax's battery instead learns
# the scale with ``contrib.mechanize``, which compiles far slower). Plain
# gradient steps need a smaller scale for Rosenbrock's curvature (~1000);
# sm3's Adagrad-like step already shrinks.
SCALES = {"sgd": 1e-3, "sgd_momentum": 1e-3, "noisy_sgd": 1e-3,
          "optimistic_gradient_descent": 1e-3, "sm3": 1.0}
SCALE = 1e-2


def base_optimizer(name: str, num_steps: int | None = None):
  """One of :data:`BASES`, as listed; with ``num_steps``, its steps scaled by
  a cosine decay to 0 over ``num_steps`` (for the convergence runs)."""
  opt_name, kwargs = BASES[name]
  base = getattr(optax, opt_name)(**kwargs)
  if num_steps is None:
    return base
  scale = SCALES.get(name, SCALE) / kwargs["learning_rate"]
  return optax.chain(base, optax.scale_by_schedule(
      optax.cosine_decay_schedule(scale, num_steps)))


def has_param_shaped_momentum(base_state, params) -> bool:
  """Whether the base state holds exactly one momentum (a ``trace`` or
  ``mu`` field) shaped like the params: what MSAM follows."""
  found = []
  for name in ("trace", "mu"):
    try:
      value = optax.tree.get(base_state, name)
    except KeyError:  # Several fields of that name.
      return False
    if value is not None:
      found.append(value)
  if len(found) != 1:
    return False
  shapes = [jnp.shape(x) for x in jax.tree.leaves(found[0])]
  return (jax.tree.structure(found[0]) == jax.tree.structure(params)
          and shapes == [jnp.shape(x) for x in jax.tree.leaves(params)])


# How a train step calls a method: step(tx, problem, params, state, extra)
# -> (updates, state); ``extra`` are extra args passed through to update.
Step = Callable[..., tuple[Any, Any]]


def grad_fn_step(tx, problem, params, state, **extra):
  """sam, gsam, looksam, ...: the clean gradient and ``grad_fn``."""
  return tx.update(problem.grad(params), state, params,
                   grad_fn=problem.grad, **extra)


def optax_step(tx, problem, params, state, **extra):
  """One-gradient methods (msam, rwp): a plain Optax step at the held
  params."""
  return tx.update(problem.grad(params), state, params, **extra)


def esam_step(tx, problem, params, state, **extra):
  """ESAM: the per-example loss and the batch instead of ``grad_fn``."""
  return tx.update(problem.grad(params), state, params,
                   example_loss_fn=problem.example_loss, batch=problem.batch,
                   **extra)


def saf_step(tx, problem, params, state, **extra):
  """SAF: the loss plus λ times the trajectory loss to the stored outputs."""
  ids = jnp.zeros([1], jnp.int32)
  targets = sam_optax.saf_targets(state, ids)
  lam = sam_optax.trajectory_weight(state)

  def loss(p):
    return problem.loss(p) + lam * sam_optax.trajectory_loss(
        problem.outputs(p), targets).astype(problem.loss(p).dtype)

  return tx.update(jax.grad(loss)(params), state, params, example_ids=ids,
                   outputs=problem.outputs(params), **extra)


def mesa_step(tx, problem, params, state, **extra):
  """MESA: the loss plus λ times the trajectory loss to the EMA teacher."""
  teacher = problem.outputs(sam_optax.teacher_params(state))
  lam = sam_optax.trajectory_weight(state)

  def loss(p):
    return problem.loss(p) + lam * sam_optax.trajectory_loss(
        problem.outputs(p), teacher).astype(problem.loss(p).dtype)

  return tx.update(jax.grad(loss)(params), state, params, **extra)


def functional_step(tx, problem, params, state, **extra):
  """Functional-SAM: the outputs (the per-example terms) and the loss of the
  outputs (their sum) instead of ``grad_fn``."""
  return tx.update(problem.grad(params), state, params,
                   outputs_fn=problem.terms, loss_fn=jnp.sum, **extra)


def has_adam_second_moment(base_state, params) -> bool:
  """Whether the base state holds exactly one param-shaped ``nu`` with a
  ``count`` next to it: what the preconditioned ascent reads."""
  found = [x for x in jax.tree.leaves(
      base_state, is_leaf=lambda x: hasattr(x, "_fields") and "nu" in
      x._fields) if hasattr(x, "_fields") and "nu" in x._fields]
  if len(found) != 1 or "count" not in found[0]._fields:
    return False
  shapes = [jnp.shape(x) for x in jax.tree.leaves(found[0].nu)]
  return (jax.tree.structure(found[0].nu) == jax.tree.structure(params)
          and shapes == [jnp.shape(x) for x in jax.tree.leaves(params)])


NEEDS_NU = (ValueError, "`nu`")


class Method(NamedTuple):
  """One method in the battery.

  Attributes:
    factory: the public function, ``factory(base, **kwargs)``.
    kwargs: its hyperparameters in the battery (small radii: SAM's fixed
      point is not the minimiser, see docs/contract.md).
    step: how a train step calls it (one of the ``*_step`` functions).
    static_args: the arguments ``optax.inject_hyperparams`` must not
      inject (they set shapes or Python branches).
    needs: ``needs(base_state, params)``, what the method requires of the
      base optimizer by design (``None``: nothing); where it is false,
      ``init`` must raise ``needs_error``.
    needs_error: the error type and the message it must match.
    radius: the name of the radius argument (``rho``, RWP's ``std``), or
      ``None`` for methods without one (SAF, MESA).
  """

  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  step: Step
  static_args: tuple[str, ...] = ()
  needs: Callable[[Any, Any], bool] | None = None
  needs_error: tuple[type[Exception], str] | None = None
  radius: str | None = "rho"

  def rejects(self, base, params) -> bool:
    """Whether the method rejects ``base`` by design."""
    return self.needs is not None and not self.needs(
        jax.eval_shape(base.init, params), params)

  def build(self, base, radius=None, **kwargs):
    """The method around ``base``; ``radius`` (a number or a schedule)
    replaces the battery's radius."""
    if radius is not None and self.radius is not None:
      kwargs[self.radius] = radius
    return self.factory(base, **{**self.kwargs, **kwargs})


RHO = 0.05
METHODS = {
    "sam": Method(sam_optax.sam, {"rho": RHO}, grad_fn_step),
    "asam": Method(sam_optax.sam, {"rho": RHO, "adaptive": True},
                   grad_fn_step, static_args=("adaptive",)),
    "gsam": Method(sam_optax.gsam, {"rho": RHO, "alpha": 0.5},
                   grad_fn_step),
    "looksam": Method(sam_optax.looksam, {"rho": RHO, "every_k": 2},
                      grad_fn_step, static_args=("every_k",)),
    "friendly_sam": Method(sam_optax.friendly_sam, {"rho": RHO},
                           grad_fn_step),
    "rst": Method(sam_optax.rst, {"rho": RHO, "probability": 0.5},
                  grad_fn_step, static_args=("seed",)),
    "ae_sam": Method(sam_optax.ae_sam, {"rho": RHO}, grad_fn_step),
    "esam": Method(sam_optax.esam, {"rho": RHO, "beta": 0.6, "gamma": 0.5},
                   esam_step, static_args=("gamma", "seed")),
    "msam": Method(
        sam_optax.msam, {"rho": RHO}, optax_step,
        needs=has_param_shaped_momentum,
        needs_error=(ValueError,
                     "msam perturbs along the base optimizer's momentum")),
    "rwp": Method(sam_optax.rwp, {"std": RHO}, optax_step,
                  static_args=("seed",), radius="std"),
    "saf": Method(
        functools.partial(sam_optax.saf, num_examples=1,
                          num_outputs=NUM_OUTPUTS),
        {"steps_per_epoch": 2, "start_epoch": 2, "minus_epoch": 1},
        saf_step,
        static_args=("num_examples", "num_outputs", "steps_per_epoch",
                     "start_epoch", "minus_epoch"), radius=None),
    "preconditioned_sam": Method(
        sam_optax.preconditioned_sam, {"rho": RHO}, grad_fn_step,
        static_args=("bias_correction",), needs=has_adam_second_moment,
        needs_error=NEEDS_NU),
    "functional_sam": Method(sam_optax.functional_sam, {"rho": RHO},
                             functional_step),
    "functional_sam_preconditioned": Method(
        sam_optax.functional_sam, {"rho": RHO, "preconditioned": True},
        functional_step, static_args=("preconditioned", "bias_correction"),
        needs=has_adam_second_moment, needs_error=NEEDS_NU),
    "mesa": Method(sam_optax.mesa, {"decay": 0.9, "start_step": 4},
                   mesa_step, static_args=("start_step",), radius=None),
}
