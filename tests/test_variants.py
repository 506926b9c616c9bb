"""Tests for the SAM variants: GSAM, LookSAM and Friendly-SAM.

Every variant is checked against its formula written out by hand in numpy
(float64) on the quadratic of ``tests/helpers.py``, and each test also shows
that a plausible sign or projection bug would give a clearly different
result, so the oracle can tell them apart.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import helpers

LR = 0.1
RHO = 0.3  # Large enough that the variants' corrections are visible.
A = np.asarray(helpers.A, np.float64)



@functools.cache
def sam_momentum_run(num_steps=3):
  """Plain SAM with momentum: what the variants reduce to."""
  return helpers.run_steps(sam_optax.sam(optax.sgd(LR, momentum=0.9), rho=RHO),
                   helpers.quadratic_params(), num_steps)


def w0():
  return np.asarray(helpers.flat(helpers.quadratic_params()), np.float64)


def unit(v):
  n = np.linalg.norm(v)
  return v / n if n > 0 else v


def sam_grad(w, rho, direction=None):
  """∇L(w + ρ d/‖d‖) on the quadratic, d = the gradient by default."""
  g = A @ w
  d = g if direction is None else direction
  return A @ (w + rho * unit(d))


assert_flat_close = helpers.assert_flat_close
assert_differs = helpers.assert_differs


# --- GSAM -------------------------------------------------------------------


def gsam_reference(w, rhos, lrs, alpha, bug=None):
  """SGD on g_sam − α(g − ⟨g, ĝ_sam⟩ĝ_sam), or a plausible bug of it."""
  for rho, lr in zip(rhos, lrs):
    g = A @ w
    gs = sam_grad(w, rho)
    parallel = (g @ unit(gs)) * unit(gs)
    if bug == "sign":  # + α g_⊥
      d = gs + alpha * (g - parallel)
    elif bug == "parallel":  # subtracts the parallel part instead
      d = gs - alpha * parallel
    elif bug == "project_onto_g":  # decomposes g_sam w.r.t. g instead
      d = gs - alpha * (gs - (gs @ unit(g)) * unit(g))
    else:
      d = gs - alpha * (g - parallel)
    w = w - lr * d
  return w


def test_gsam_rho_schedule_values():
  lr = optax.linear_schedule(0.2, 0.0, transition_steps=4)
  rho = sam_optax.gsam_rho_schedule(lr, lr_max=0.2, lr_min=0.0, rho_max=0.6,
                                    rho_min=0.1)
  np.testing.assert_allclose([rho(t) for t in range(5)],
                             [0.6, 0.475, 0.35, 0.225, 0.1], rtol=1e-6)
  # Clipped outside [lr_min, lr_max]; constant ρ_max when lr_max == lr_min.
  warmup = sam_optax.gsam_rho_schedule(lambda t: 0.1 * t, lr_max=0.2,
                                       lr_min=0.1, rho_max=0.6, rho_min=0.1)
  np.testing.assert_allclose([warmup(t) for t in (0, 1, 2, 5)],
                             [0.1, 0.1, 0.6, 0.6], rtol=1e-6)
  flat = sam_optax.gsam_rho_schedule(0.1, lr_max=0.1, lr_min=0.1,
                                     rho_max=0.6, rho_min=0.1)
  assert float(flat(3)) == pytest.approx(0.6)
  with pytest.raises(ValueError, match="lr_max"):
    sam_optax.gsam_rho_schedule(lr, lr_max=0.0, lr_min=0.2, rho_max=0.6,
                                rho_min=0.1)


def test_gsam_matches_hand_formula_and_catches_bugs():
  # ρ_t tied to a decaying learning rate, as in the paper.
  alpha, n = 0.5, 3
  lr = optax.linear_schedule(LR, 0.0, transition_steps=4)
  rho = sam_optax.gsam_rho_schedule(lr, lr_max=LR, lr_min=0.0, rho_max=0.6,
                                    rho_min=0.1)
  tx = sam_optax.gsam(optax.sgd(lr), rho=rho, alpha=alpha)
  params, states = helpers.run_steps(tx, helpers.quadratic_params(), n)
  rhos, lrs = [0.6, 0.475, 0.35], [LR, 0.75 * LR, 0.5 * LR]
  assert_flat_close(params, gsam_reference(w0(), rhos, lrs, alpha))
  for bug in ("sign", "parallel", "project_onto_g"):
    assert_differs(params, gsam_reference(w0(), rhos, lrs, alpha, bug=bug))
  assert_differs(params, gsam_reference(w0(), rhos, lrs, 0.0))  # = SAM
  assert_differs(params, gsam_reference(w0(), [0.6] * n, lrs, alpha))
  np.testing.assert_allclose(states[0].ascent_norm, np.linalg.norm(A @ w0()),
                             rtol=1e-6)
  np.testing.assert_allclose([s.radius for s in states], rhos,
                             rtol=1e-5)


def test_gsam_alpha_zero_is_sam_exactly():
  base = optax.sgd(LR, momentum=0.9)
  params = helpers.quadratic_params()
  via_gsam, g_states = helpers.run_steps(
      sam_optax.gsam(base, rho=RHO, alpha=0.0), params, 3)
  via_sam, s_states = sam_momentum_run()
  chex.assert_trees_all_equal(via_gsam, via_sam)
  chex.assert_trees_all_equal(g_states[-1], s_states[-1])


# --- LookSAM ----------------------------------------------------------------


def looksam_reference(w, rho, k, alpha, num_steps, bug=None, norms=None):
  """LookSAM with SGD, Algorithm 1 of Liu et al. (2022), or a bug of it.

  Appends ‖g‖ of each step to ``norms`` if given.
  """
  gv = np.zeros_like(w)
  for t in range(num_steps):
    g = A @ w
    if norms is not None:
      norms.append(np.linalg.norm(g))
    if t % k == 0:
      gs = sam_grad(w, rho)
      if bug == "difference":  # g_s − g instead of the orthogonal part
        gv = gs - g
      else:
        gv = gs - (gs @ unit(g)) * unit(g)
      d = gs
    else:
      sign = -1.0 if bug == "sign" else 1.0
      d = g + sign * alpha * np.linalg.norm(g) / np.linalg.norm(gv) * gv
    w = w - LR * d
  return w


def test_looksam_matches_hand_formula_and_catches_bugs():
  k, alpha, n = 3, 0.7, 7  # SAM at steps 0, 3, 6; reuse at the others.
  tx = sam_optax.looksam(optax.sgd(LR), rho=RHO, every_k=k, alpha=alpha)
  params, states = helpers.run_steps(tx, helpers.quadratic_params(), n)
  norms = []
  assert_flat_close(params, looksam_reference(w0(), RHO, k, alpha, n,
                                              norms=norms))
  for bug in ("sign", "difference"):
    assert_differs(params,
                   looksam_reference(w0(), RHO, k, alpha, n, bug=bug))
  assert_differs(params, looksam_reference(w0(), RHO, 1, alpha, n))  # SAM
  # ‖ε‖ = ρ on the SAM steps, 0 on the reuse steps; ‖g‖ on every step.
  np.testing.assert_allclose([s.radius for s in states],
                             [RHO, 0, 0, RHO, 0, 0, RHO], rtol=1e-5)
  np.testing.assert_allclose([s.ascent_norm for s in states], norms,
                             rtol=1e-5)
  assert [int(s.step_count) for s in states] == list(range(1, n + 1))


def test_looksam_k1_is_sam_exactly():
  base = optax.sgd(LR, momentum=0.9)
  params = helpers.quadratic_params()
  via_look, l_states = helpers.run_steps(
      sam_optax.looksam(base, rho=RHO, every_k=1, alpha=0.7), params, 3)
  via_sam, s_states = sam_momentum_run()
  chex.assert_trees_all_equal(via_look, via_sam)
  chex.assert_trees_all_equal(l_states[-1].base_state,
                              s_states[-1].base_state)


@functools.cache
def injected_looksam():
  """LookSAM with k and α injected: one compiled step for every k and α.

  ``grad_fn`` counts its executions at run time with a host callback.
  """
  tx = optax.inject_hyperparams(sam_optax.looksam)(optax.sgd(LR), rho=RHO,
                                                   every_k=1, alpha=0.0)
  calls = []

  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return helpers.quadratic_grad(p)

  @jax.jit
  @chex.assert_max_traces(n=1)  # One compilation for every k and α.
  def step(params, state):
    updates, state = tx.update(helpers.quadratic_grad(params), state, params,
                               grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  def run(k, alpha, num_steps):
    params = helpers.quadratic_params()
    state = tx.init(params)
    state.hyperparams["every_k"] = jnp.asarray(k)
    state.hyperparams["alpha"] = jnp.asarray(alpha, jnp.float32)
    calls.clear()
    for _ in range(num_steps):
      params, state = step(params, state)
    jax.effects_barrier()
    return params, state, len(calls)

  return run


def test_looksam_alpha_zero_is_sam_every_k_steps():
  k, n = 2, 4
  params, _, _ = injected_looksam()(k, 0.0, n)
  w = w0()
  for t in range(n):
    w = w - LR * (sam_grad(w, RHO) if t % k == 0 else A @ w)
  assert_flat_close(params, w)


@pytest.mark.parametrize("k,expected", [(1, 10), (5, 2), (4, 3)])
def test_looksam_skipped_steps_do_not_evaluate_grad_fn(k, expected):
  # Counts the executions of grad_fn at run time (a host callback inside the
  # jitted step): lax.cond runs only the taken branch. An implementation that
  # blends both branches with jnp.where would call grad_fn on every step.
  params, state, calls = injected_looksam()(k, 0.7, 10)
  assert calls == expected
  assert_flat_close(params, looksam_reference(w0(), RHO, k, 0.7, 10),
                    rtol=1e-4)
  assert int(state.hyperparams["every_k"]) == k


# --- Friendly-SAM -----------------------------------------------------------


def friendly_reference(w, rho, sigma, lmbda, num_steps, bug=None):
  """F-SAM with SGD, as nblt/F-SAM's ``FriendlySAM``, or a bug of it."""
  m = np.zeros_like(w)
  for t in range(num_steps):
    g = A @ w
    new_m = g if t == 0 else lmbda * m + (1 - lmbda) * g
    if bug == "updated_ema":  # ascends along g − σ m_t instead of m_{t−1}
      d = g - sigma * new_m
    elif bug == "sign":
      d = g + sigma * m
    else:
      d = g - sigma * m
    m = new_m
    w = w - LR * sam_grad(w, rho, direction=d)
  return w


def test_friendly_sam_matches_hand_formula_and_catches_bugs():
  sigma, lmbda, n = 1.0, 0.6, 4
  tx = sam_optax.friendly_sam(optax.sgd(LR), rho=RHO, sigma=sigma,
                              decay=lmbda)
  params, states = helpers.run_steps(tx, helpers.quadratic_params(), n)
  assert_flat_close(params, friendly_reference(w0(), RHO, sigma, lmbda, n))
  for bug in ("updated_ema", "sign"):
    assert_differs(params, friendly_reference(w0(), RHO, sigma, lmbda, n,
                                              bug=bug))
  assert_differs(params, friendly_reference(w0(), RHO, 0.0, lmbda, n))
  np.testing.assert_allclose(states[-1].radius, RHO, rtol=1e-5)


def test_friendly_sam_sigma_zero_is_sam_exactly():
  base = optax.sgd(LR, momentum=0.9)
  params = helpers.quadratic_params()
  via_fsam, _ = helpers.run_steps(
      sam_optax.friendly_sam(base, rho=RHO, sigma=0.0), params, 3)
  via_sam, _ = sam_momentum_run()
  chex.assert_trees_all_equal(via_fsam, via_sam)


# --- Common to all variants -------------------------------------------------

VARIANTS = {
    "gsam": lambda base, **kw: sam_optax.gsam(base, alpha=0.5, **kw),
    "looksam": lambda base, **kw: sam_optax.looksam(base, every_k=2, **kw),
    "friendly_sam": lambda base, **kw: sam_optax.friendly_sam(base, **kw),
}
variants = pytest.mark.parametrize("name", list(VARIANTS))
FACTORIES = {"gsam": sam_optax.gsam, "looksam": sam_optax.looksam,
             "friendly_sam": sam_optax.friendly_sam}
# The setting that turns each variant's correction off (then it is SAM).
NEUTRAL = {"gsam": dict(alpha=0.0), "looksam": dict(every_k=1),
           "friendly_sam": dict(sigma=0.0)}


@variants
def test_degenerate_directions_stay_finite(name):
  # eps = 0, and either a zero gradient everywhere, or a zero SAM gradient
  # with a non-zero clean one (GSAM then projects onto a zero vector; LookSAM
  # caches g_v = 0 and divides by ‖g_v‖ on the next step). The zeros are
  # data, so one compiled step serves both cases.
  tx = VARIANTS[name](optax.sgd(LR), rho=RHO, eps=0.0)

  @jax.jit
  def step(params, state, clean, perturbed):
    grad = lambda p, c: jax.tree.map(  # noqa: E731
        lambda x: c * x, helpers.quadratic_grad(p))
    updates, state = tx.update(grad(params, clean), state, params,
                               grad_fn=lambda p: grad(p, perturbed))
    return optax.apply_updates(params, updates), state

  for clean, perturbed in ((0.0, 0.0), (1.0, 0.0)):
    params = helpers.quadratic_params()
    state = tx.init(params)
    for t in range(3):
      new, state = step(params, state, clean, perturbed)
      chex.assert_tree_all_finite((new, state))
      # The limits: with g_s = 0, GSAM's g_∥ = 0 so it steps along +α·g;
      # LookSAM's reuse steps (g_v = 0) step along g; F-SAM does not move.
      g = helpers.flat(helpers.quadratic_grad(params)) * clean
      expected = {"gsam": 0.5 * g, "looksam": -g if t % 2 else 0 * g,
                  "friendly_sam": 0 * g}[name]
      np.testing.assert_allclose(helpers.flat(new),
                                 helpers.flat(params) + LR * expected,
                                 rtol=1e-6, atol=1e-7)
      params = new


MASK = {"a": True, "b": False}


@functools.cache
def masked_sam_run():
  return helpers.run_steps(
      sam_optax.sam(optax.sgd(LR), rho=RHO, mask=MASK),
      helpers.quadratic_params(), 2)


def recording_sgd(received):
  """SGD that records the extra arguments it is given."""
  sgd = optax.sgd(LR)

  def update_fn(updates, state, params=None, **extra_args):
    received.update(extra_args)
    return sgd.update(updates, state, params)

  return optax.GradientTransformationExtraArgs(sgd.init, update_fn)


@variants
def test_mask_has_aux_and_extra_args(name):
  # With the variant's correction off, a masked variant is masked SAM. On
  # the way: has_aux drops grad_fn's aux, and unknown extra arguments reach
  # the base optimizer.
  received = {}
  tx = FACTORIES[name](recording_sgd(received), rho=RHO, mask=MASK,
                       has_aux=True, **NEUTRAL[name])
  params, states = helpers.run_steps(
      tx, helpers.quadratic_params(), 2,
      grad_fn=lambda p: (helpers.quadratic_grad(p), {"aux": 1}), value=1.0)
  assert set(received) == {"value"}
  with pytest.raises(ValueError, match="has_aux"):
    helpers.run_steps(tx, helpers.quadratic_params(), 1)
  expected, sam_states = masked_sam_run()
  chex.assert_trees_all_close(params, expected, rtol=1e-6)
  np.testing.assert_allclose(states[-1].ascent_norm,
                             sam_states[-1].ascent_norm, rtol=1e-6)
  w = w0()
  for _ in range(2):
    w = w - LR * sam_grad(w, RHO)
  assert_differs(params, w)  # Unmasked SAM.


@variants
def test_init_on_shape_dtype_structs(name):
  tx = VARIANTS[name](optax.adam(LR), rho=0.05)
  params = helpers.quadratic_params()
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        params)
  abstract = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)),
                          tx.init(shapes))
  concrete = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)),
                          tx.init(params))
  assert abstract == concrete


@variants
def test_low_precision_params_follow_the_float32_run(name):
  # bf16 params give bf16 updates, float32 logs, and the same steps as the
  # float32 run up to bf16 rounding (a variant that dropped its correction
  # in low precision would land elsewhere: RHO is large here).
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                        helpers.quadratic_params())
  grad = jax.grad(lambda p: helpers.quadratic_loss(
      jax.tree.map(lambda x: x.astype(jnp.float32), p)).astype(jnp.bfloat16))
  tx = VARIANTS[name](optax.sgd(LR, momentum=0.9), rho=RHO)
  new, states = helpers.run_steps(tx, params, 3, grad=grad)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
  assert states[-1].ascent_norm.dtype == jnp.float32
  ref, ref_states = helpers.run_steps(tx, helpers.quadratic_params(), 3)
  np.testing.assert_allclose(states[-1].ascent_norm,
                             ref_states[-1].ascent_norm, rtol=3e-2)
  plain, _ = helpers.run_steps(
      FACTORIES[name](optax.sgd(LR, momentum=0.9), rho=RHO, **NEUTRAL[name]),
      helpers.quadratic_params(), 3)
  rounding = np.max(np.abs(helpers.flat(new).astype(np.float32)
                           - helpers.flat(ref)))
  correction = np.max(np.abs(helpers.flat(plain) - helpers.flat(ref)))
  assert rounding < 0.2 * correction, (rounding, correction)


def test_inject_hyperparams_exposes_and_uses_the_hyperparameters():
  # (LookSAM's k and α: see test_looksam_skipped_steps_do_not_...)
  params = helpers.quadratic_params()
  g = helpers.quadratic_grad(params)

  def one_step(tx, state):
    updates, _ = jax.jit(lambda s: tx.update(
        g, s, params, grad_fn=helpers.quadratic_grad))(state)
    return optax.apply_updates(params, updates)

  tx = optax.inject_hyperparams(sam_optax.gsam)(optax.sgd(LR), rho=0.05,
                                                alpha=0.1)
  state = tx.init(params)
  assert set(state.hyperparams) >= {"rho", "alpha"}
  state.hyperparams["rho"] = jnp.asarray(RHO)
  state.hyperparams["alpha"] = jnp.asarray(0.5)
  assert_flat_close(one_step(tx, state),
                    gsam_reference(w0(), [RHO], [LR], 0.5))
  assert float(optax.tree.get(state, "rho")) == pytest.approx(RHO)

  tx = optax.inject_hyperparams(sam_optax.friendly_sam)(
      optax.sgd(LR), rho=RHO, sigma=1.0, decay=0.6)
  state = tx.init(params)
  assert {"sigma", "decay"} <= set(state.hyperparams)
  assert_flat_close(one_step(tx, state),
                    friendly_reference(w0(), RHO, 1.0, 0.6, 1))


@variants
def test_missing_grad_fn_or_params_is_a_clear_error(name):
  tx = VARIANTS[name](optax.sgd(LR))
  params = helpers.quadratic_params()
  state = tx.init(params)
  g = helpers.quadratic_grad(params)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(g, state, params)
  with pytest.raises(ValueError, match="params"):
    tx.update(g, state, grad_fn=helpers.quadratic_grad)
  with pytest.raises(ValueError, match="gradient passed"):
    tx.update({"a": g["a"]}, state, params, grad_fn=helpers.quadratic_grad)
  with pytest.raises(ValueError, match="outside a jax.pmap"):
    with_axis = VARIANTS[name](optax.sgd(LR), axis_name="batch")
    with_axis.update(g, with_axis.init(params), params,
                     grad_fn=helpers.quadratic_grad)


@pytest.mark.parametrize("factory,kwargs,error", [
    (sam_optax.gsam, {"alpha": -0.1}, "alpha"),
    (sam_optax.gsam, {"rho": -1.0}, "rho"),
    (sam_optax.looksam, {"every_k": 0}, "every_k"),
    (sam_optax.looksam, {"every_k": 2.5}, "every_k"),
    (sam_optax.looksam, {"k": 2}, "unexpected keyword arguments"),
    (sam_optax.gsam, {"sync_ascent": True}, "unexpected keyword arguments"),
    (sam_optax.looksam, {"alpha": float("nan")}, "alpha"),
    (sam_optax.friendly_sam, {"decay": 1.5}, "decay"),
    (sam_optax.friendly_sam, {"sigma": -1.0}, "sigma"),
    (sam_optax.friendly_sam, {"adaptive": 1}, "adaptive"),
])
def test_bad_hyperparameters_fail_at_construction(factory, kwargs, error):
  with pytest.raises((ValueError, TypeError), match=error):
    factory(optax.sgd(LR), **kwargs)


def test_looksam_reuse_steps_log_the_masked_gradient_norm():
  # Step 1 reuses g_v: its ascent_norm is ‖g‖ over the perturbed leaves
  # only, as on the SAM steps (not over the whole gradient).
  tx = sam_optax.looksam(optax.sgd(LR), rho=RHO, every_k=2, mask=MASK)
  after_one, _ = helpers.run_steps(tx, helpers.quadratic_params(), 1)
  _, states = helpers.run_steps(tx, helpers.quadratic_params(), 2)
  g = helpers.quadratic_grad(after_one)
  assert float(states[1].radius) == 0.0  # A reuse step.
  np.testing.assert_allclose(states[1].ascent_norm, np.linalg.norm(g["a"]),
                             rtol=1e-6)
  assert abs(float(states[1].ascent_norm)
             - float(optax.tree.norm(g))) > 0.1


@variants
def test_value_and_grad_logs_perturbed_loss_and_sharpness(name):
  tx = VARIANTS[name](optax.sgd(LR), rho=RHO, value_and_grad=True)
  value_and_grad = jax.value_and_grad(helpers.quadratic_loss)

  @jax.jit
  def step(params, state):
    loss, grads = value_and_grad(params)
    updates, state = tx.update(grads, state, params, grad_fn=value_and_grad,
                               value=loss)
    return optax.apply_updates(params, updates), state

  params = helpers.quadratic_params()
  state = tx.init(params)
  w = w0()
  params, state = step(params, state)  # A SAM step for every variant.
  perturbed = w + RHO * unit(A @ w)
  np.testing.assert_allclose(state.perturbed_loss,
                             0.5 * perturbed @ A @ perturbed, rtol=1e-5)
  np.testing.assert_allclose(
      state.sharpness, 0.5 * perturbed @ A @ perturbed - 0.5 * w @ A @ w,
      rtol=1e-4)
  _, state = step(params, state)
  if name == "looksam":  # A reuse step: no perturbed pass, no loss.
    assert np.isnan(state.perturbed_loss) and np.isnan(state.sharpness)
  else:  # F-SAM's second ascent need not raise the loss: only finite.
    assert np.isfinite(state.perturbed_loss) and np.isfinite(state.sharpness)


@pytest.mark.parametrize("name", ["sam", "asam", *VARIANTS])
def test_rho_zero_is_the_base_optimizer_bit_for_bit(name):
  # LookSAM's cached g_v and GSAM's g_perp are rounding noise at ρ = 0; they
  # must not leak into the update (LookSAM rescales g_v to α‖g‖).
  factory = {"sam": sam_optax.sam,
             "asam": functools.partial(sam_optax.sam, adaptive=True),
             **VARIANTS}[name]
  base = optax.sgd(LR, momentum=0.9)
  params, grad = helpers.nonlinear_problem()
  via_method, _ = helpers.run_steps(factory(base, rho=0.0), params, 6,
                                    grad=grad)
  expected, _ = helpers.run_steps(base, params, 6, grad=grad)
  chex.assert_trees_all_equal(via_method, expected)
