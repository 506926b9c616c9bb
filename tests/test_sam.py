"""Tests for ``sam``: exact oracles and the Optax contract."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import helpers

LR = 0.1


def run_steps(tx, params, num_steps, loss=helpers.quadratic_loss, **kwargs):
  """``num_steps`` jitted SAM steps on ``loss``; the params and last state."""
  params, states = helpers.run_steps(tx, params, num_steps,
                                     grad=jax.grad(loss), **kwargs)
  return params, states[-1]


# --- Exact one-step oracles -------------------------------------------------


@pytest.mark.parametrize("rho", [0.01, 0.05, 0.5])
def test_one_sam_step_matches_hand_formula(rho):
  params = helpers.quadratic_params()
  new, state = run_steps(sam_optax.sam(optax.sgd(LR), rho=rho), params, 1)
  expected = helpers.sam_step_reference(helpers.flat(params), LR, rho)
  np.testing.assert_allclose(helpers.flat(new), expected, rtol=1e-6,
                             atol=1e-6)
  # A sign bug (descending to w − ε) must be caught by this oracle.
  wrong = helpers.sam_step_reference(helpers.flat(params), LR, -rho)
  assert np.max(np.abs(helpers.flat(new) - wrong)) > 1e-4
  g = helpers.A @ helpers.flat(params)
  np.testing.assert_allclose(state.ascent_norm, jnp.linalg.norm(g),
                             rtol=1e-6)
  np.testing.assert_allclose(state.radius, rho, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.01, 0.5])
def test_one_asam_step_matches_hand_formula(eta):
  params, rho = helpers.quadratic_params(), 0.5
  tx = sam_optax.sam(optax.sgd(LR), rho=rho, adaptive=True, eta=eta)
  new, _ = run_steps(tx, params, 1)
  expected = helpers.asam_step_reference(helpers.flat(params), LR, rho, eta)
  np.testing.assert_allclose(helpers.flat(new), expected, rtol=1e-6,
                             atol=1e-6)
  wrong = helpers.asam_step_reference(helpers.flat(params), LR, -rho, eta)
  assert np.max(np.abs(helpers.flat(new) - wrong)) > 1e-4


def test_two_momentum_steps_match_reference():
  params, rho, momentum = helpers.quadratic_params(), 0.05, 0.9
  tx = sam_optax.sam(optax.sgd(LR, momentum=momentum), rho=rho)
  new, _ = run_steps(tx, params, 2)
  w, trace = helpers.flat(params), 0.0
  for _ in range(2):
    g = helpers.A @ w
    g_sam = helpers.A @ (w + rho * g / jnp.linalg.norm(g))
    trace = g_sam + momentum * trace
    w = w - LR * trace
  np.testing.assert_allclose(helpers.flat(new), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", [optax.sgd(LR, momentum=0.9), optax.adam(LR),
                                  optax.adamw(LR, weight_decay=0.1)])
@pytest.mark.parametrize("adaptive", [False, True])
def test_rho_zero_equals_base_optimizer(base, adaptive):
  params = helpers.quadratic_params()
  sam_params, _ = run_steps(sam_optax.sam(base, rho=0.0, adaptive=adaptive),
                            params, 3)
  state = base.init(params)
  for _ in range(3):
    updates, state = base.update(helpers.quadratic_grad(params), state, params)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(sam_params, params, rtol=1e-5, atol=1e-7)


def test_base_optimizer_updates_w_not_w_plus_eps():
  # With a base that returns 0, the params must not move (ε is not applied).
  params = helpers.quadratic_params()
  new, _ = run_steps(sam_optax.sam(optax.sgd(0.0), rho=1.0), params, 1)
  chex.assert_trees_all_close(new, params)


# --- Hyperparameters: schedules, masks, zero gradients, dtypes --------------


def test_rho_schedule_is_evaluated_at_the_step_count():
  schedule = lambda count: 0.1 * count  # noqa: E731
  tx = sam_optax.sam(optax.sgd(LR), rho=schedule)
  params = helpers.quadratic_params()
  state = tx.init(params)
  norms = []
  for _ in range(3):
    g = helpers.quadratic_grad(params)
    updates, state = tx.update(g, state, params,
                               grad_fn=helpers.quadratic_grad)
    params = optax.apply_updates(params, updates)
    norms.append(float(state.radius))
  np.testing.assert_allclose(norms, [0.0, 0.1, 0.2], atol=1e-6)
  assert int(state.step_count) == 3


def test_masked_leaves_are_not_perturbed_but_updated():
  params = helpers.quadratic_params()
  seen = []

  def grad_fn(p):
    seen.append(p)
    return helpers.quadratic_grad(p)

  tx = sam_optax.sam(optax.sgd(LR), rho=0.3, mask={"a": True, "b": False})
  state = tx.init(params)
  g = helpers.quadratic_grad(params)
  updates, state = tx.update(g, state, params, grad_fn=grad_fn)
  np.testing.assert_array_equal(seen[0]["b"], params["b"])
  eps_a = 0.3 * g["a"] / jnp.linalg.norm(g["a"])
  np.testing.assert_allclose(seen[0]["a"], params["a"] + eps_a, rtol=1e-6)
  expected = helpers.quadratic_grad(seen[0])  # Gradient at w + ε everywhere.
  chex.assert_trees_all_close(updates, jax.tree.map(lambda x: -LR * x,
                                                    expected), rtol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_leaves_params_finite(adaptive):
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  loss = lambda p: jnp.sum(p["w"] ** 2) + p["b"] ** 2  # noqa: E731
  tx = sam_optax.sam(optax.sgd(LR), rho=0.05, adaptive=adaptive, eps=0.0)
  new, state = run_steps(tx, params, 2, loss=loss)
  chex.assert_tree_all_finite((new, state))
  chex.assert_trees_all_close(new, params)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_give_low_precision_updates(dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), helpers.quadratic_params())
  loss = lambda p: helpers.quadratic_loss(  # noqa: E731
      jax.tree.map(lambda x: x.astype(jnp.float32), p)).astype(dtype)
  tx = sam_optax.sam(optax.sgd(LR, momentum=0.9), rho=0.05)
  new, state = run_steps(tx, params, 2, loss=loss)
  assert all(x.dtype == dtype for x in jax.tree.leaves(new))
  assert state.ascent_norm.dtype == jnp.float32
  f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  ref, _ = run_steps(tx, f32, 2)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x.astype(jnp.float32),
                                           new), ref, atol=0.05)


def test_bf16_achieved_perturbation_and_float32_path():
  # w + ε rounded to bf16 loses part of ε; the float32 path keeps all of it.
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=20000), jnp.bfloat16)}
  loss = lambda p: 0.5 * jnp.sum(p["w"].astype(jnp.float32) ** 2)  # noqa
  grad = jax.grad(loss)
  seen = {}

  def grad_fn(p):
    seen["dtype"] = p["w"].dtype
    return grad(p)

  for float32_path in (False, True):
    tx = sam_optax.sam(optax.sgd(LR), rho=0.05, exact_norms=True,
                       perturb_in_float32=float32_path)
    state = tx.init(params)
    updates, state = tx.update(grad(params), state, params, grad_fn=grad_fn)
    assert updates["w"].dtype == jnp.bfloat16
    achieved = float(state.perturbation_norm)
    if float32_path:
      assert seen["dtype"] == jnp.float32
      np.testing.assert_allclose(achieved, 0.05, rtol=1e-4)
    else:
      assert seen["dtype"] == jnp.bfloat16
      assert abs(achieved / 0.05 - 1) > 0.01  # Rounding shows in the log.


# --- The Optax contract -----------------------------------------------------


def test_unknown_extra_args_are_accepted_and_passed_on():
  received = {}

  def update_fn(updates, state, params=None, **extra_args):
    received.update(extra_args)
    return updates, state

  base = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                               update_fn)
  tx = sam_optax.sam(base, rho=0.05)
  params = helpers.quadratic_params()
  tx.update(helpers.quadratic_grad(params), tx.init(params), params,
            grad_fn=helpers.quadratic_grad, value=1.0, some_flag="x")
  assert received == {"value": 1.0, "some_flag": "x"}
  # A plain GradientTransformation base gets no extra args and still works:
  # inside a chain the update is the SAM step of the clipped gradient's
  # direction (clipping does not change a direction).
  chained = optax.chain(optax.clip_by_global_norm(1e-3),
                        sam_optax.sam(optax.sgd(LR), rho=0.05))
  updates, _ = chained.update(helpers.quadratic_grad(params),
                              chained.init(params), params,
                              grad_fn=helpers.quadratic_grad, unknown=3)
  expected = helpers.sam_step_reference(helpers.flat(params), LR, 0.05)
  np.testing.assert_allclose(helpers.flat(params) + helpers.flat(updates),
                             expected, rtol=1e-6, atol=1e-6)


def test_missing_grad_fn_or_params_is_a_clear_error():
  tx = sam_optax.sam(optax.sgd(LR))
  params = helpers.quadratic_params()
  state = tx.init(params)
  g = helpers.quadratic_grad(params)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(g, state, params)
  with pytest.raises(ValueError, match="params"):
    tx.update(g, state, grad_fn=helpers.quadratic_grad)


def test_grad_fn_output_must_match_params():
  tx = sam_optax.sam(optax.sgd(LR))
  params = helpers.quadratic_params()
  state = tx.init(params)
  g = helpers.quadratic_grad(params)
  with pytest.raises(ValueError, match="grad_fn does not match"):
    tx.update(g, state, params, grad_fn=lambda p: {"a": p["a"]})
  with pytest.raises(ValueError, match="shape"):
    tx.update(g, state, params,
              grad_fn=lambda p: {"a": p["a"], "b": p["a"]})
  with pytest.raises(ValueError, match="gradient passed to sam"):
    tx.update({"a": g["a"]}, state, params, grad_fn=helpers.quadratic_grad)
  tx_aux = sam_optax.sam(optax.sgd(LR), has_aux=True)
  with pytest.raises(ValueError, match="has_aux"):
    tx_aux.update(g, state, params, grad_fn=helpers.quadratic_grad)


@pytest.mark.parametrize("kwargs,error", [
    ({"rho": -0.1}, "rho"),
    ({"eta": -1.0}, "eta"),
    ({"eps": -1e-12}, "eps"),
    ({"rho": float("nan")}, "rho"),
    ({"rho": "big"}, "rho"),
    ({"adaptive": 1}, "adaptive"),
    ({"sync_ascent": True}, "axis_name"),
])
def test_bad_hyperparameters_fail_at_construction(kwargs, error):
  with pytest.raises((ValueError, TypeError), match=error):
    sam_optax.sam(optax.sgd(LR), **kwargs)


def test_base_must_be_a_transformation():
  with pytest.raises(TypeError, match="base_tx"):
    sam_optax.sam(0.1)


def test_no_recompilation_and_stable_state():
  tx = sam_optax.sam(optax.adam(LR), rho=0.05)
  params = helpers.quadratic_params()
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    updates, state = tx.update(helpers.quadratic_grad(params), state, params,
                               grad_fn=helpers.quadratic_grad)
    return optax.apply_updates(params, updates), state

  initial = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for _ in range(3):
    params, state = step(params, state)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == initial


def test_inject_hyperparams_exposes_rho():
  params = helpers.quadratic_params()
  tx = optax.inject_hyperparams(sam_optax.sam)(optax.sgd(LR), rho=0.05)
  state = tx.init(params)
  assert float(state.hyperparams["rho"]) == pytest.approx(0.05)
  state.hyperparams["rho"] = jnp.asarray(0.5)
  g = helpers.quadratic_grad(params)
  updates, state = jax.jit(
      lambda s: tx.update(g, s, params, grad_fn=helpers.quadratic_grad))(state)
  expected = helpers.sam_step_reference(helpers.flat(params), LR, 0.5)
  np.testing.assert_allclose(
      helpers.flat(optax.apply_updates(params, updates)), expected, rtol=1e-6)
  # optax.tree.get finds exactly one rho.
  assert float(optax.tree.get(state, "rho")) == pytest.approx(0.5)


def test_inject_hyperparams_with_float16_params_and_zero_gradient():
  # inject_hyperparams casts eps = 1e-12 to float16, i.e. 0: still no NaN.
  params = {"w": jnp.zeros(4, jnp.float16)}
  loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2)  # noqa: E731
  tx = optax.inject_hyperparams(sam_optax.sam)(
      optax.sgd(LR), rho=0.05, adaptive=True, eta=0.01)
  assert state_dtype(tx.init(params).hyperparams["eps"]) == jnp.float16
  new, state = run_steps(tx, params, 2, loss=loss)
  chex.assert_tree_all_finite((new, state))


def state_dtype(x):
  return jnp.asarray(x).dtype


def test_inject_hyperparams_with_a_path_mask():
  params = helpers.quadratic_params()
  tx = optax.inject_hyperparams(sam_optax.sam)(
      optax.sgd(LR), rho=0.05,
      mask=sam_optax.path_mask(lambda path, leaf: path == "a"))
  _, state = run_steps(tx, params, 1)
  g = helpers.quadratic_grad(params)
  np.testing.assert_allclose(state.inner_state.ascent_norm,
                             jnp.linalg.norm(g["a"]), rtol=1e-6)


def test_state_is_stable_under_lax_cond():
  tx = sam_optax.sam(optax.sgd(LR, momentum=0.9), rho=0.05)
  params = helpers.quadratic_params()
  state = tx.init(params)
  g = helpers.quadratic_grad(params)

  def do_update(state):
    _, state = tx.update(g, state, params, grad_fn=helpers.quadratic_grad)
    return state

  step = jax.jit(lambda s, f: jax.lax.cond(f, do_update, lambda s: s, s))
  # The taken branch is the plain update, the other leaves the state as is.
  chex.assert_trees_all_close(step(state, True), do_update(state), rtol=1e-6)
  chex.assert_trees_all_equal(step(state, False), state)
  assert int(step(state, True).step_count) == 1
  assert float(step(state, True).radius) == pytest.approx(0.05)


def test_map_params_and_shape_dtype_struct_init():
  tx = sam_optax.sam(optax.adam(LR), rho=0.05)
  params = helpers.quadratic_params()
  state = tx.init(params)
  mapped = optax.tree.map_params(tx.init, lambda v: v, state)
  chex.assert_trees_all_equal(mapped, state)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        params)
  abstract = tx.init(shapes)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)


def test_sam_wraps_the_whole_base_pipeline():
  # sam(chain(clip, sgd)) clips the SAM gradient; chain(clip, sam(sgd))
  # only clips the ascent gradient.
  params = helpers.quadratic_params()
  g = helpers.quadratic_grad(params)
  inner = sam_optax.sam(optax.chain(optax.clip_by_global_norm(1e-3),
                                    optax.sgd(1.0)), rho=0.05)
  updates, _ = inner.update(g, inner.init(params), params,
                            grad_fn=helpers.quadratic_grad)
  np.testing.assert_allclose(optax.tree.norm(updates), 1e-3, rtol=1e-4)
  outer = optax.chain(optax.clip_by_global_norm(1e-3),
                      sam_optax.sam(optax.sgd(1.0), rho=0.05))
  updates, _ = outer.update(g, outer.init(params), params,
                            grad_fn=helpers.quadratic_grad)
  assert float(optax.tree.norm(updates)) > 1.0


# --- Gradient accumulation, micro-batches, aux outputs ----------------------


def batch_loss(params, x):
  """A least-squares loss on a batch of rows ``x`` (targets = 1)."""
  w = helpers.flat(params)
  return jnp.mean((x @ w - 1.0) ** 2)


def reference_sam_grad(params, x, rho):
  g = jax.grad(batch_loss)(params, x)
  norm = optax.tree.norm(g)
  perturbed = jax.tree.map(lambda w, gi: w + rho * gi / norm, params, g)
  return jax.grad(batch_loss)(perturbed, x)


def test_multisteps_runs_sam_per_micro_batch():
  k, rho = 3, 0.1
  x = jax.random.normal(jax.random.key(0), (2 * k, 4, 5))  # 2 outer steps.
  schedule = lambda step: 0.1 + 0.2 * step  # noqa: E731 (outer steps)
  tx = sam_optax.sam(optax.MultiSteps(optax.sgd(LR, momentum=0.5), k),
                     rho=schedule)
  params = helpers.quadratic_params()
  state = tx.init(params)
  step = jax.jit(lambda p, s, xb: tx.update(
      jax.grad(batch_loss)(p, xb), s, p,
      grad_fn=lambda q: jax.grad(batch_loss)(q, xb)))
  for xb in x:
    updates, state = step(params, state, xb)
    params = optax.apply_updates(params, updates)
  # Reference: per micro-batch SAM gradient, mean over k, then momentum SGD.
  ref, trace = helpers.quadratic_params(), None
  for outer in range(2):
    rho = schedule(outer)
    grads = [reference_sam_grad(ref, xb, rho)
             for xb in x[outer * k:(outer + 1) * k]]
    mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
    trace = mean if trace is None else jax.tree.map(
        lambda g, t: g + 0.5 * t, mean, trace)
    ref = jax.tree.map(lambda w, t: w - LR * t, ref, trace)
  chex.assert_trees_all_close(params, ref, rtol=1e-5, atol=1e-6)
  assert int(state.step_count) == 2 * k
  # The wrong composition, MultiSteps(sam(base)), computes something else.
  wrong_tx = optax.MultiSteps(
      sam_optax.sam(optax.sgd(LR, momentum=0.5), rho=schedule), k)
  wrong_step = jax.jit(lambda p, s, xb: wrong_tx.update(
      jax.grad(batch_loss)(p, xb), s, p,
      grad_fn=lambda q: jax.grad(batch_loss)(q, xb)))
  wrong, wrong_state = helpers.quadratic_params(), wrong_tx.init(params)
  for xb in x:
    updates, wrong_state = wrong_step(wrong, wrong_state, xb)
    wrong = optax.apply_updates(wrong, updates)
  assert float(optax.tree.norm(optax.tree.sub(wrong, ref))) > 1e-3


def test_microbatched_m_sharpness_matches_per_micro_batch_reference():
  rho, k = 0.2, 4
  x = jax.random.normal(jax.random.key(1), (8, 5))
  params = helpers.quadratic_params()
  micro = sam_optax.split_microbatches(x, k)
  per_micro_grad = jax.vmap(jax.grad(batch_loss), in_axes=(None, 0))
  grad_fn = lambda stacked: jax.vmap(jax.grad(batch_loss))(  # noqa: E731
      stacked, micro)
  tx = sam_optax.sam(optax.sgd(LR), rho=rho, microbatched=True)
  updates, state = jax.jit(lambda p, s: tx.update(
      per_micro_grad(p, micro), s, p, grad_fn=grad_fn))(params, tx.init(
          params))
  grads = [reference_sam_grad(params, xb, rho) for xb in micro]
  expected = jax.tree.map(lambda *g: -LR * sum(g) / k, *grads)
  chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(state.radius, rho, rtol=1e-5)
  # The logged ‖g‖ is the mean over the micro-batches (not the first one's).
  micro_norms = [float(optax.tree.norm(jax.grad(batch_loss)(params, xb)))
                 for xb in micro]
  np.testing.assert_allclose(state.ascent_norm, np.mean(micro_norms),
                             rtol=1e-5)
  assert abs(micro_norms[0] - np.mean(micro_norms)) > 1e-3
  # ... and differs from full-batch SAM (m = 8).
  full = jax.tree.map(lambda g: -LR * g, reference_sam_grad(params, x, rho))
  diff = optax.tree.norm(optax.tree.sub(updates, full))
  assert float(diff) > 1e-3


def test_split_microbatches_rejects_uneven_batches():
  with pytest.raises(ValueError, match="divisible"):
    sam_optax.split_microbatches(jnp.zeros((7, 2)), 2)
  with pytest.raises(ValueError, match="positive"):
    sam_optax.split_microbatches(jnp.zeros((8, 2)), 0)


def test_has_aux_drops_aux_and_sam_gradient_returns_it():
  params = helpers.quadratic_params()

  def grad_fn(p):
    return helpers.quadratic_grad(p), {"bn_stats": jnp.ones(2)}

  tx = sam_optax.sam(optax.sgd(LR), rho=0.05, has_aux=True)
  g = helpers.quadratic_grad(params)
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  plain = sam_optax.sam(optax.sgd(LR), rho=0.05)
  expected, _ = plain.update(g, plain.init(params), params,
                             grad_fn=helpers.quadratic_grad)
  chex.assert_trees_all_close(updates, expected)
  g_sam, info = sam_optax.sam_gradient(grad_fn, params, g, 0.05, has_aux=True)
  chex.assert_trees_all_close(info.aux, {"bn_stats": jnp.ones(2)})
  chex.assert_trees_all_close(g_sam, jax.tree.map(lambda u: -u / LR, updates),
                              rtol=1e-6)


@pytest.mark.parametrize("has_aux", [False, True])
def test_value_and_grad_records_perturbed_loss_and_sharpness(has_aux):
  params, rho = helpers.quadratic_params(), 0.3
  if has_aux:
    grad_fn = jax.value_and_grad(
        lambda p: (helpers.quadratic_loss(p), 0), has_aux=True)
  else:
    grad_fn = jax.value_and_grad(helpers.quadratic_loss)
  tx = sam_optax.sam(optax.sgd(LR), rho=rho, has_aux=has_aux,
                     value_and_grad=True)
  loss, g = jax.value_and_grad(helpers.quadratic_loss)(params)
  _, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn,
                       value=loss)
  w = helpers.flat(params)
  gw = helpers.A @ w
  w_eps = w + rho * gw / jnp.linalg.norm(gw)
  perturbed = 0.5 * w_eps @ helpers.A @ w_eps
  np.testing.assert_allclose(state.perturbed_loss, perturbed, rtol=1e-6)
  np.testing.assert_allclose(state.sharpness, perturbed - loss, rtol=1e-5)
  assert float(state.sharpness) > 0
  _, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  assert np.isnan(state.sharpness)  # No value= given: unknown, not 0.


def test_mark_varying_outside_any_map_is_a_no_op():
  params = helpers.quadratic_params()
  chex.assert_trees_all_equal(sam_optax.mark_varying(params, "batch"), params)


def test_axis_name_outside_a_map_is_a_clear_error():
  tx = sam_optax.sam(optax.sgd(LR), axis_name="batch")
  params = helpers.quadratic_params()
  with pytest.raises(ValueError, match="outside a jax.pmap"):
    tx.update(helpers.quadratic_grad(params), tx.init(params), params,
              grad_fn=helpers.quadratic_grad)
