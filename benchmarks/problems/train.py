"""The one training loop of the benchmarks, the examples and the tests.

:func:`make_step` is one training step of a :class:`~._base.Problem`'s
model with any transformation of the package (or a plain Optax one made to
accept the extra arguments with ``optax.with_extra_args_support``); the
``kind`` says how the step feeds the transformation:

* ``"grad_fn"``: ``tx.update(grads, state, params, grad_fn=...)``, the
  convention of ``sam``, ``gsam``, ``looksam``, ``rst``... (one-gradient
  methods ignore ``grad_fn``);
* ``"esam"``: ``example_loss_fn=`` and ``batch=`` (ESAM's selection);
* ``"mesa"`` / ``"saf"``: one gradient of the loss plus λ times the
  trajectory loss against the EMA teacher / the stored outputs.

:func:`make_train` turns a whole run (every epoch, every step, then the
evaluation at ``sam_optax.eval_params``) into one jitted function, compiled
once per (problem, transformation, kind) and reused for every seed and
hyperparameter value (hyperparameters are traced scalars).

The second gradients a run really evaluates are counted with a host callback
inside ``grad_fn``: a transformation that skips ``grad_fn`` on a step (a
``lax.cond``, e.g. LookSAM's reuse steps) is not charged for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax

from ._base import Functional, Problem

KINDS = ("grad_fn", "esam", "mesa", "saf", "functional")
TAU = 1.0  # MESA/SAF temperature (at the paper's 5, large λ diverges here).


class _Counter:
  """Counts ``grad_fn`` evaluations from inside jitted code."""

  def __init__(self):
    self._lock = threading.Lock()
    self.calls = 0

  def __call__(self):
    with self._lock:
      self.calls += 1

  def take(self) -> int:
    jax.effects_barrier()
    with self._lock:
      calls, self.calls = self.calls, 0
    return calls


GRAD_FN_CALLS = _Counter()


def radius_of(opt_state) -> jax.Array:
  """The radius of the run's SAMState (0 for transformations without)."""
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, sam_optax.SAMState))
           if isinstance(s, sam_optax.SAMState)]
  return found[0].radius if found else jnp.zeros([])


class Carry(NamedTuple):
  params: Any
  rest: Any  # BatchNorm statistics ({} without).
  opt_state: Any
  perturbed_steps: jax.Array  # Steps whose SAMState radius was non-zero.


def make_step(problem: Problem, f: Functional, tx, kind: str = "grad_fn",
              count: bool = False, value_and_grad: bool = False) -> Callable:
  """``step(carry, (x, y, idx)) -> (carry, loss)``, for ``lax.scan``.

  ``value_and_grad``: for a transformation built with
  ``value_and_grad=True``: ``grad_fn`` returns ``(loss, grads)`` and the
  step passes ``value=loss`` (the state then records the sharpness).
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if kind == "functional":
    return make_functional_step(problem, f, tx, count)

  def step(carry: Carry, batch):
    params, rest, opt_state, perturbed = carry
    x, y, idx = batch

    def loss(p, batch_stats=rest, x=x, y=y):
      out, new_rest = f.apply(p, batch_stats, x, True)
      return problem.example_loss(out, y).mean(), (new_rest, out)

    if kind in ("mesa", "saf"):
      lam = sam_optax.trajectory_weight(opt_state)
      if kind == "mesa":
        targets, _ = f.apply(sam_optax.teacher_params(opt_state), rest, x,
                             False)
      else:
        targets = sam_optax.saf_targets(opt_state, idx)

      def total(p):
        value, (new_rest, out) = loss(p)
        return (value + lam * sam_optax.trajectory_loss(out, targets, TAU),
                (value, new_rest, out))

      grads, (value, new_rest, out) = jax.grad(total, has_aux=True)(params)
      extra = ({"example_ids": idx, "outputs": out} if kind == "saf"
               else {})
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
    else:
      (value, (new_rest, _)), grads = jax.value_and_grad(
          loss, has_aux=True)(params)
      if kind == "esam":

        def example_losses(p, batch):
          out, _ = f.apply(p, rest, batch[0], True)
          return problem.example_loss(out, batch[1])

        updates, opt_state = tx.update(
            grads, opt_state, params, example_loss_fn=example_losses,
            batch=(x, y))
      else:

        def grad_fn(p):
          out = jax.value_and_grad(lambda q: loss(q)[0])(p)
          if count:
            jax.debug.callback(GRAD_FN_CALLS)
          return out if value_and_grad else out[1]

        extra = {"value": value} if value_and_grad else {}
        updates, opt_state = tx.update(grads, opt_state, params,
                                       grad_fn=grad_fn, **extra)
    perturbed = perturbed + (radius_of(opt_state) > 0).astype(jnp.int32)
    params = optax.apply_updates(params, updates)
    return Carry(params, new_rest, opt_state, perturbed), value

  return step


def scan_runner(problem: Problem, tx, x, y, kind: str = "grad_fn",
                quick: bool = False, seed: int = 0):
  """``(run, carry)``: ``run(carry, idx)`` is a jitted ``lax.scan`` of
  steps over the rows of ``idx`` (a ``(steps, batch)`` array of example
  indices into ``x``, ``y``); ``carry`` the initial state. For timing."""
  f = Functional(problem.model(seed, quick))
  step = make_step(problem, f, tx, kind)

  def run(carry, idx):
    return jax.lax.scan(lambda c, i: step(c, (x[i], y[i], i)), carry,
                        idx)[0]

  carry = Carry(f.params, f.rest, tx.init(f.params),
                jnp.zeros([], jnp.int32))
  return jax.jit(run), carry


def outputs(problem: Problem, f: Functional, params, rest, x) -> jax.Array:
  """The model's evaluation-mode outputs on ``x``, in chunks."""
  n, chunk = x.shape[0], problem.eval_chunk
  if n <= chunk:
    return f.apply(params, rest, x, False)[0]
  pad = -n % chunk
  xs = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  out = jax.lax.map(lambda c: f.apply(params, rest, c, False)[0],
                    xs.reshape((-1, chunk) + x.shape[1:]))
  return out.reshape((-1,) + out.shape[2:])[:n]


def split_metric(problem: Problem, f: Functional, params, rest, x, y):
  """The problem's metric on one split (a mean over its examples)."""
  return jnp.mean(problem.evaluate(outputs(problem, f, params, rest, x), y))


class EvalContext(NamedTuple):
  """What a problem's ``extra_metrics`` gets, inside the jitted run."""

  problem: Problem
  f: Functional
  params: Any  # The evaluation parameters (``sam_optax.eval_params``).
  rest: Any
  arrays: Mapping[str, jax.Array]
  key: jax.Array


def batches(key, n: int, batch_size: int, epochs: int) -> jax.Array:
  """``(epochs * n // batch_size, batch_size)`` example indices: each
  epoch a fresh permutation, the last incomplete batch dropped."""
  per_epoch = n // batch_size

  def one(k):
    return jax.random.permutation(k, n)[:per_epoch * batch_size].reshape(
        per_epoch, batch_size)

  return jax.vmap(one)(jax.random.split(key, epochs)).reshape(-1,
                                                              batch_size)


def make_train(problem: Problem, make_tx: Callable, kind: str = "grad_fn",
               epochs: int | None = None, quick: bool = False,
               count: bool = True, batch_size: int | None = None,
               curves: bool = False, train_fit: bool = False):
  """A jitted whole run: ``train(init, key, arrays, y_train, h) -> dict``.

  Args:
    problem: the problem.
    make_tx: ``make_tx(base, h, total_steps)`` -> the transformation around
      the problem's base optimizer (``h``: a dict of traced scalars).
    kind: how the step calls the transformation (see :func:`make_step`).
    epochs: default the problem's (quick) epochs.
    quick: the problem's quick variant.
    count: count the ``grad_fn`` evaluations (see :data:`GRAD_FN_CALLS`).
    batch_size: default the problem's.
    curves: also return ``test_curve``, the test metric at the end of every
      epoch (whole epochs only).
    train_fit: also return ``train_fit`` (the metric on the training
      targets trained on) and ``train_clean`` (on ``arrays["y_train_clean"]``
      when given).

  Returns:
    ``train(init, key, arrays, y_train, h)`` where ``init`` is
    ``(params, rest)`` of :func:`init`, ``arrays`` the dict of
    :func:`device_arrays`; it returns ``val``, ``test`` (the metric at the
    evaluation parameters), ``perturbed_fraction`` (steps with a non-zero
    radius), ``final_loss`` and the problem's extra metrics. Attributes
    ``total_steps`` and ``functional`` are attached.
  """
  f = Functional(problem.model(0, quick))
  epochs = epochs or problem.epochs_for(quick)
  batch_size = batch_size or problem.batch_size
  max_steps = problem.steps_for(quick)

  def total_steps(n):
    if max_steps is not None:
      return max_steps * epochs  # ``epochs`` multiplies the budget.
    return epochs * (n // batch_size)

  def train(init, key, arrays, y_train, h):
    params, rest = init
    n = arrays["x_train"].shape[0]
    total = total_steps(n)
    tx = make_tx(problem.base(total, quick), h, total)
    step = make_step(problem, f, tx, kind, count)
    data_key, eval_key = jax.random.split(key)
    per_epoch = n // batch_size
    idx = batches(data_key, n, batch_size, -(-total // per_epoch))[:total]

    def body(carry, i):
      return step(carry, (arrays["x_train"][i], y_train[i], i))

    carry = Carry(params, rest, tx.init(params), jnp.zeros([], jnp.int32))
    if curves:

      def epoch(carry, epoch_idx):
        carry, losses = jax.lax.scan(body, carry, epoch_idx)
        p = sam_optax.eval_params(carry.opt_state, carry.params)
        return carry, (losses, split_metric(
            problem, f, p, carry.rest, arrays["x_test"], arrays["y_test"]))

      carry, (losses, curve) = jax.lax.scan(
          epoch, carry, idx.reshape(-1, per_epoch, batch_size))
      losses = losses.reshape(-1)
    else:
      carry, losses = jax.lax.scan(body, carry, idx)
    clean = sam_optax.eval_params(carry.opt_state, carry.params)
    out = {
        "val": split_metric(problem, f, clean, carry.rest, arrays["x_val"],
                            arrays["y_val"]),
        "test": split_metric(problem, f, clean, carry.rest,
                             arrays["x_test"], arrays["y_test"]),
        "perturbed_fraction": carry.perturbed_steps / total,
        "final_loss": jnp.mean(losses[-max(1, total // 20):]),
    }
    if curves:
      out["test_curve"] = curve
    if train_fit:
      out["train_fit"] = split_metric(problem, f, clean, carry.rest,
                                      arrays["x_train"], y_train)
      if "y_train_clean" in arrays:
        out["train_clean"] = split_metric(problem, f, clean, carry.rest,
                                          arrays["x_train"],
                                          arrays["y_train_clean"])
    if problem.extra_metrics is not None:
      out.update(problem.extra_metrics(EvalContext(
          problem, f, clean, carry.rest, arrays, eval_key)))
    return out

  jitted = jax.jit(train)
  n_train = None

  def run(init, key, arrays, y_train, h):
    nonlocal n_train
    n_train = arrays["x_train"].shape[0]
    GRAD_FN_CALLS.take()  # Forget calls of an earlier, unfinished run.
    out = {k: np.asarray(v).tolist()
           for k, v in jitted(init, key, arrays, y_train, h).items()}
    out["grad_fn_calls_per_step"] = (GRAD_FN_CALLS.take()
                                     / total_steps(n_train))
    return out

  run.functional = f
  run.total_steps = total_steps
  run.epochs = epochs
  run.batch_size = batch_size
  return run


def init(problem: Problem, seed: int, quick: bool = False):
  """``(params, rest)`` of the problem's model initialised with ``seed``."""
  f = Functional(problem.model(seed, quick))
  return f.params, f.rest


def device_arrays(data, y_train=None) -> dict[str, jax.Array]:
  """The splits (and ``data.extra``) as device arrays, for ``train``."""
  out = {k: jnp.asarray(getattr(data, k)) for k in (
      "x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
  out.update({k: jnp.asarray(v) for k, v in data.extra.items()})
  if y_train is not None:
    out["y_train"] = jnp.asarray(y_train)
  return out


def traced(h: Mapping[str, float]) -> dict[str, jax.Array]:
  """Hyperparameters as float32 scalars: one compilation for a grid."""
  return {k: jnp.float32(v) for k, v in h.items()}


def run_seed(train, problem: Problem, data, setting: str, seed: int,
             h: Mapping[str, float], quick: bool = False,
             arrays=None) -> dict[str, float]:
  """One run: the seed sets the initialisation, the batches and the noise."""
  y_train = problem.train_targets(data, setting, seed)
  arrays = dict(arrays if arrays is not None else device_arrays(data))
  arrays["y_train"] = jnp.asarray(y_train)
  return train(init(problem, seed, quick), jax.random.key(seed), arrays,
               arrays["y_train"], traced(h))


def np_float(x) -> float:
  return float(np.asarray(x))


# ----------------------------------------------------------------------------
# Functional-SAM's kind (issue 24): ``make_step`` (hence ``make_train`` and
# ``scan_runner``) hands ``kind="functional"`` to this step.
# ----------------------------------------------------------------------------


def make_functional_step(problem: Problem, f: Functional, tx,
                         count: bool = False) -> Callable:
  """``step(carry, (x, y, idx)) -> (carry, loss)`` for Functional-SAM.

  The clean loss, gradient and output gradient (the logits' gradient) come
  from one :func:`sam_optax.functional_value_and_grad`; the step then calls
  ``tx.update(grads, state, params, outputs_fn=..., output_grads=...)``, the
  convention of :func:`sam_optax.functional_sam`. ``count`` counts the
  calls of ``outputs_fn`` the transformation makes (the perturbed pass) in
  :data:`GRAD_FN_CALLS`. A model with BatchNorm statistics pays one more
  training-mode forward pass for their update (none for ``text-lm``).
  """

  def step(carry: Carry, batch):
    params, rest, opt_state, perturbed = carry
    x, y, _ = batch

    def clean_outputs(p):
      return f.apply(p, rest, x, True)[0]

    def outputs_fn(p):
      if count:
        jax.debug.callback(GRAD_FN_CALLS)
      return clean_outputs(p)

    def loss_fn(out):
      return problem.example_loss(out, y).mean()

    value, grads, output_grads = sam_optax.functional_value_and_grad(
        clean_outputs, loss_fn, params)
    new_rest = (f.apply(params, rest, x, True)[1] if jax.tree.leaves(rest)
                else rest)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   outputs_fn=outputs_fn,
                                   output_grads=output_grads)
    perturbed = perturbed + (radius_of(opt_state) > 0).astype(jnp.int32)
    params = optax.apply_updates(params, updates)
    return Carry(params, new_rest, opt_state, perturbed), value

  return step
