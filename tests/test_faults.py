"""Faults and bad input: no silent wrong step (non-finite values, negative ρ,
arguments that name the culprit, integrations that would fail far away)."""

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import helpers

LR = 0.1
FACTORIES = {
    "sam": sam_optax.sam,
    "asam": functools.partial(sam_optax.sam, adaptive=True),
    "gsam": functools.partial(sam_optax.gsam, alpha=0.5),
    "looksam": functools.partial(sam_optax.looksam, every_k=2),
    "friendly_sam": sam_optax.friendly_sam,
}
methods = pytest.mark.parametrize("name", list(FACTORIES))


def guarded_steps(name, faults, where):
  """Runs sam-family steps under sam(apply_if_finite(base)).

  ``faults[i]`` puts a NaN in step i's gradient: in the clean pass
  (``where="clean"``) or only at the perturbed point (``"perturbed"``).
  Returns the params and states after each step.
  """
  rho = optax.linear_schedule(0.3, 0.0, 4)  # Shows a schedule that advanced.
  kwargs = {"every_k": 1} if (name == "looksam" and where == "perturbed") \
      else {}
  tx = FACTORIES[name](
      optax.apply_if_finite(optax.sgd(LR, momentum=0.9), 3), rho=rho,
      **kwargs)

  @jax.jit
  def step(params, state, fault):
    poison = jnp.where(fault, jnp.nan, 1.0)
    clean = helpers.quadratic_grad(params)
    if where == "clean":
      clean = jax.tree.map(lambda g: g * poison, clean)
    updates, state = tx.update(
        clean, state, params,
        grad_fn=lambda p: jax.tree.map(lambda g: g * poison,
                                       helpers.quadratic_grad(p)))
    return optax.apply_updates(params, updates), state

  params, state = helpers.quadratic_params(), None
  state = tx.init(params)
  out = []
  for fault in faults:
    params, state = step(params, state, fault)
    out.append((params, state))
  return out


@methods
@pytest.mark.parametrize("where", ["clean", "perturbed"])
def test_apply_if_finite_inside_skips_the_whole_step(name, where):
  # A NaN in either pass: the step is skipped and counted, params, the step
  # count (hence the ρ schedule), the method's state and the logs stay as
  # they were, and the run continues as if the step had not happened.
  faulty = guarded_steps(name, [False, True, False, False], where)
  clean = guarded_steps(name, [False, False, False], where)
  (p0, s0), (p1, s1) = faulty[0], faulty[1]
  chex.assert_trees_all_equal(p1, p0)
  assert int(s1.base_state.notfinite_count) == 1
  assert not bool(s1.base_state.last_finite)
  chex.assert_trees_all_equal(
      s1._replace(base_state=None), s0._replace(base_state=None))
  chex.assert_trees_all_close(faulty[-1][0], clean[-1][0], rtol=1e-6)
  assert int(faulty[-1][1].base_state.total_notfinite) == 1
  assert int(faulty[-1][1].step_count) == 3
  chex.assert_tree_all_finite(faulty[-1])


def test_bf16_gradient_of_1e20_keeps_its_finite_norm():
  # ‖g‖² of a bf16 gradient of 1e20 overflows the float32 sum, but the
  # gradient and its norm (2e20) are finite: the norm is rescaled by the
  # largest magnitude, and ε has radius ρ (it used to be inf and NaN: SAM
  # silently off).
  g = {"w": jnp.full((4,), 1e20, jnp.bfloat16),
       "v": jnp.full((2,), -3e19, jnp.bfloat16)}
  p = sam_optax.ascent_direction(g, g, 0.05, exact_norms=True)
  g32 = np.concatenate([np.asarray(g["w"], np.float64),
                        np.asarray(g["v"], np.float64)])
  np.testing.assert_allclose(float(p.ascent_norm), np.linalg.norm(g32),
                             rtol=1e-6)
  np.testing.assert_allclose(
      np.concatenate([p.epsilon["w"], p.epsilon["v"]]),
      0.05 * g32 / np.linalg.norm(g32), rtol=1e-6)
  np.testing.assert_allclose(float(p.radius), 0.05, rtol=1e-6)
  # Through the transformation, the whole step is finite.
  params = {"w": jnp.ones(4, jnp.bfloat16), "v": jnp.ones(2, jnp.bfloat16)}
  tx = sam_optax.sam(optax.sgd(1e-22), rho=0.05, exact_norms=True)
  updates, state = tx.update(g, tx.init(params), params,
                             grad_fn=lambda p: g)
  chex.assert_tree_all_finite((updates, state))
  np.testing.assert_allclose(float(state.grad_norm), np.linalg.norm(g32),
                             rtol=1e-6)
  # The rescaled norm's derivative is still g/‖g‖.
  big = jnp.array([3e20, 4e20], jnp.float32)
  np.testing.assert_allclose(jax.grad(lambda x: sam_optax.ascent_direction(
      {"w": x}, {"w": x}, 0.1).ascent_norm)(big), [0.6, 0.8], rtol=1e-6)
  # A large but representable norm is fine.
  g = {"w": jnp.full((4,), 1e15, jnp.float32)}
  p = sam_optax.ascent_direction(g, g, 0.05)
  np.testing.assert_allclose(p.epsilon["w"], 0.025, rtol=1e-6)


@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
def test_a_non_finite_gradient_is_a_fault_not_a_silent_zero(bad):
  # An inf or NaN gradient: ε is NaN (never 0, which would switch SAM off
  # silently), so that sam(optax.apply_if_finite(base)) skips the step.
  g = {"w": jnp.array([1.0, bad, 2.0], jnp.bfloat16)}
  p = sam_optax.ascent_direction(g, g, 0.05)
  assert np.all(np.isnan(np.asarray(p.epsilon["w"], np.float32)))
  assert not np.isfinite(float(p.ascent_norm))


@methods
def test_nan_in_the_clean_gradient_logs_a_nan_grad_norm(name):
  # The log is how a user finds the fault: a NaN in one element of the
  # clean gradient reads grad_norm = NaN (it read 0.0).
  params = helpers.quadratic_params()
  g = helpers.quadratic_grad(params)
  g = {**g, "b": g["b"].at[1].set(jnp.nan)}
  tx = FACTORIES[name](optax.sgd(LR), exact_norms=True)
  _, state = jax.jit(lambda g: tx.update(
      g, tx.init(params), params, grad_fn=helpers.quadratic_grad))(g)
  assert np.isnan(float(state.grad_norm))
  assert np.isnan(float(state.ascent_norm))


def test_complex_params_through_ascent_direction_are_named():
  # SAM's ε is not defined for complex leaves here (as in the
  # transformations): a clear error naming the leaf, not jax's TypeError.
  w = {"a": jnp.ones(2), "z": jnp.array([1 + 2j, 3 - 1j], jnp.complex64)}
  with pytest.raises(ValueError, match="Complex params.*'z'.*real and "
                     "imaginary"):
    sam_optax.ascent_direction(w, w, 0.05)
  real = {"a": jnp.ones(2), "z": jnp.ones(2)}
  with pytest.raises(ValueError, match="Complex gradient.*'z'"):
    sam_optax.ascent_direction(w, real, 0.05)


def test_microbatched_without_the_leading_axis_says_micro_batch():
  params = helpers.quadratic_params()
  g = helpers.quadratic_grad(params)  # No leading micro-batch axis.
  tx = sam_optax.sam(optax.sgd(LR), microbatched=True)
  with pytest.raises(ValueError, match="microbatched=True.*micro-batch axis"):
    tx.update(g, tx.init(params), params, grad_fn=helpers.quadratic_grad)
  with pytest.raises(ValueError, match="micro-batch axis"):
    sam_optax.sam_gradient(helpers.quadratic_grad, params, g,
                           microbatched=True)
  # Stacked per micro-batch, it runs.
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), g)
  sam_optax.sam_gradient(jax.vmap(helpers.quadratic_grad), params, stacked,
                         microbatched=True)


class LossScale(NamedTuple):
  """Dynamic loss scaling (the recipe of docs/faults.md)."""

  scale: jax.Array
  good_steps: jax.Array


def test_fp16_dynamic_loss_scaling_recipe():
  # float16 params; the loss is scaled before differentiating and the
  # gradient unscaled in float32. An overflow in either pass makes the SAM
  # gradient non-finite, apply_if_finite skips the step, and the scale drops.
  x = jax.random.normal(jax.random.key(0), (32, 4))
  y = x @ jnp.array([1.0, -2.0, 0.5, 3.0])
  params = {"w": jnp.zeros(4, jnp.float16)}

  def loss(p):
    return jnp.mean((x.astype(jnp.float16) @ p["w"] - y.astype(
        jnp.float16)) ** 2)

  tx = sam_optax.sam(optax.apply_if_finite(optax.sgd(0.05), 20), rho=0.05)

  @jax.jit
  def step(params, state, ls):
    def grad_fn(p):  # ∇(scale·L) in float16, unscaled in float32.
      g = jax.grad(lambda q: loss(q) * ls.scale.astype(jnp.float16))(p)
      return jax.tree.map(lambda a: a.astype(jnp.float32) / ls.scale, g)

    updates, state = tx.update(grad_fn(params), state, params,
                               grad_fn=grad_fn)
    finite = optax.tree.get(state, "last_finite")
    good = jnp.where(finite, ls.good_steps + 1, 0)
    grow = good >= 5
    ls = LossScale(
        scale=jnp.where(finite, jnp.where(grow, ls.scale * 2, ls.scale),
                        ls.scale / 2),
        good_steps=jnp.where(grow, 0, good))
    return optax.apply_updates(params, updates), state, ls

  ls = LossScale(jnp.asarray(2.0 ** 15), jnp.asarray(0))  # Overflows first.
  state = tx.init(params)
  skipped, scales = [], []
  for _ in range(40):
    params, state, ls = step(params, state, ls)
    skipped.append(not bool(state.base_state.last_finite))
    scales.append(float(ls.scale))
  assert skipped[0] and scales[0] == 2.0 ** 14  # Overflow: skip and halve.
  assert not skipped[-1]
  chex.assert_tree_all_finite(params)
  assert float(loss(params)) < 0.2 * float(loss({"w": jnp.zeros(4)}))


def test_negative_rho_at_run_time_is_clipped_to_zero():
  # A schedule that runs past zero, and a ρ injected under jit: ε = 0 (the
  # base step), never a descent along −g.
  params = helpers.quadratic_params()
  tx = sam_optax.sam(optax.sgd(LR), rho=lambda t: 0.3 - 0.5 * t)
  _, states = helpers.run_steps(tx, params, 3)
  np.testing.assert_allclose([s.radius for s in states], [0.3, 0.0, 0.0],
                             atol=1e-7)
  injected = optax.inject_hyperparams(sam_optax.sam)(optax.sgd(LR), rho=0.1)
  state = injected.init(params)
  state.hyperparams["rho"] = jnp.asarray(-0.2)
  g = helpers.quadratic_grad(params)
  updates, state = jax.jit(lambda s: injected.update(
      g, s, params, grad_fn=helpers.quadratic_grad))(state)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda x: -LR * x, g))
  assert float(state.inner_state.radius) == 0.0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rho=lambda: 0.05), TypeError, "rho"),
    (dict(rho=lambda t: jnp.ones(3)), ValueError, r"rho\(0\)"),
    (dict(rho=lambda t: -0.1), ValueError, r"rho\(0\)"),
    (dict(eta=lambda t: 0.01), TypeError, "eta"),
    (dict(rho=float("inf")), ValueError, "rho"),
    (dict(rho=1j), ValueError, "rho"),
    (dict(eta=float("inf"), adaptive=True), ValueError, "eta"),
    (dict(eps=float("nan")), ValueError, "eps"),
])
@methods
def test_bad_arguments_fail_at_construction_naming_them(name, kwargs, error,
                                                        match):
  with pytest.raises(error, match=match):
    FACTORIES[name](optax.sgd(LR), **kwargs)


@methods
def test_bad_inputs_fail_at_the_first_update_naming_them(name):
  params = helpers.quadratic_params()
  g = helpers.quadratic_grad(params)

  def update(tx, grads=g, p=params, grad_fn=helpers.quadratic_grad):
    return tx.update(grads, tx.init(p), p, grad_fn=grad_fn)

  with pytest.raises(ValueError, match="`mask`.*'b'.*shape"):
    update(FACTORIES[name](optax.sgd(LR),
                           mask={"a": True, "b": jnp.array([True, False])}))
  with pytest.raises(ValueError, match="grad_fn.*int32.*floating point"):
    update(FACTORIES[name](optax.sgd(LR), every_k=1) if name == "looksam"
           else FACTORIES[name](optax.sgd(LR)),
           grad_fn=lambda p: jax.tree.map(lambda x: x.astype(jnp.int32),
                                          helpers.quadratic_grad(p)))
  int_params = {**params, "step": jnp.array(2, jnp.int32)}
  float0_grads = jax.grad(
      lambda p: helpers.quadratic_loss({"a": p["a"], "b": p["b"]}),
      allow_int=True)(int_params)
  with pytest.raises(ValueError, match="float0.*'step'"):
    update(FACTORIES[name](optax.sgd(LR)), grads=float0_grads, p=int_params)
  complex_params = {"a": params["a"].astype(jnp.complex64), "b": params["b"]}
  with pytest.raises(ValueError, match="Complex params.*'a'"):
    update(FACTORIES[name](optax.sgd(LR)), p=complex_params,
           grads=jax.tree.map(jnp.conj, complex_params))


def test_sam_inside_multi_transform_points_to_the_mask_recipe():
  params = helpers.quadratic_params()
  tx = optax.multi_transform(
      {"sam": sam_optax.sam(optax.sgd(LR)), "frozen": optax.set_to_zero()},
      {"a": "sam", "b": "frozen"})
  with pytest.raises(ValueError, match="MaskedNode.*mask="):
    tx.update(helpers.quadratic_grad(params), tx.init(params), params,
              grad_fn=helpers.quadratic_grad)
  # The recipe: SAM outside, the frozen part neither perturbed nor updated.
  tx = sam_optax.sam(optax.multi_transform(
      {"sgd": optax.sgd(LR), "frozen": optax.set_to_zero()},
      {"a": "sgd", "b": "frozen"}), rho=0.1, mask={"a": True, "b": False})
  new, _ = helpers.run_steps(tx, params, 2)
  chex.assert_trees_all_equal(new["b"], params["b"])
  assert float(jnp.abs(new["a"] - params["a"]).max()) > 1e-3
