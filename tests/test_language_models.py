"""Tests for the language-model work (issue 24): ``obj_fn=``, per-leaf ρ,
preconditioned SAM and Functional-SAM.

Each rule is checked against a hand-written float64 formula, and each test
shows that a plausible bug (a dropped term, a flipped sign, a wrong
normalisation) gives a clearly different answer, so the oracle can see it.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import helpers

LR = 0.1
RHO = 0.3
A = np.asarray(helpers.A, np.float64)


def w0():
  return np.asarray(helpers.flat(helpers.quadratic_params()), np.float64)


assert_flat_close = helpers.assert_flat_close
assert_differs = helpers.assert_differs


def run(tx, params, num_steps, grad=helpers.quadratic_grad, **kwargs):
  """``num_steps`` jitted steps with ``kwargs`` (callables of the params
  are called at the params) passed to ``update``; the params and state."""

  @jax.jit
  def step(p, s):
    u, s = tx.update(grad(p), s, p, **kwargs)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for _ in range(num_steps):
    params, state = step(params, state)
  return params, state


# --- obj_fn -----------------------------------------------------------------

GRAD_FN_METHODS = {
    "sam": lambda base, **kw: sam_optax.sam(base, rho=RHO, **kw),
    "asam": lambda base, **kw: sam_optax.sam(base, rho=RHO, adaptive=True,
                                             **kw),
    "gsam": lambda base, **kw: sam_optax.gsam(base, rho=RHO, alpha=0.4,
                                              **kw),
    "looksam": lambda base, **kw: sam_optax.looksam(base, rho=RHO, every_k=2,
                                                    **kw),
    "friendly_sam": lambda base, **kw: sam_optax.friendly_sam(
        base, rho=RHO, **kw),
    "rst": lambda base, **kw: sam_optax.rst(base, rho=RHO, probability=0.5,
                                            **kw),
    "ae_sam": lambda base, **kw: sam_optax.ae_sam(base, rho=RHO, **kw),
    "preconditioned_sam": lambda base, **kw: sam_optax.preconditioned_sam(
        base, rho=RHO, **kw),
}


def nonlinear():
  params, grad = helpers.nonlinear_problem()

  coefs = helpers.random_tree(10, [(7, 5), (13,), (3, 3, 2)])

  def loss(p):
    return sum(jnp.sum(jnp.sin(w * c) ** 2)
               for w, c in zip(jax.tree.leaves(p), jax.tree.leaves(coefs)))

  np.testing.assert_allclose(  # The loss of helpers.nonlinear_problem.
      jax.grad(loss)(params)["leaf0"], grad(params)["leaf0"], rtol=1e-6)
  return params, jax.grad(loss), loss


@pytest.mark.parametrize("name", sorted(GRAD_FN_METHODS))
def test_obj_fn_equals_grad_fn_of_jax_grad_exactly(name):
  params, grad, loss = nonlinear()
  tx = GRAD_FN_METHODS[name](optax.adam(0.05))
  expected = run(tx, params, 3, grad=grad, grad_fn=jax.grad(loss))
  got = run(tx, params, 3, grad=grad, obj_fn=loss)
  chex.assert_trees_all_equal(got, expected)
  # value_and_grad: obj_fn gives the perturbed loss for free.
  tx = GRAD_FN_METHODS[name](optax.adam(0.05), value_and_grad=True)
  expected = run(tx, params, 2, grad=grad,
                 grad_fn=jax.value_and_grad(loss), value=1.0)
  got = run(tx, params, 2, grad=grad, obj_fn=loss, value=1.0)
  chex.assert_trees_all_equal(got, expected)
  if name not in ("looksam", "rst"):  # Their step 2 may skip the ascent.
    assert np.isfinite(got[1].perturbed_loss)


def test_obj_fn_has_aux_and_esam():
  params, grad, loss = nonlinear()
  with_aux = lambda p: (loss(p), {"logits": p["leaf1"]})  # noqa: E731
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO, has_aux=True)
  chex.assert_trees_all_equal(
      run(tx, params, 2, grad=grad, obj_fn=with_aux),
      run(tx, params, 2, grad=grad,
          grad_fn=jax.grad(with_aux, has_aux=True)))
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO, has_aux=True,
                     value_and_grad=True)
  got = run(tx, params, 2, grad=grad, obj_fn=with_aux)
  chex.assert_trees_all_equal(got, run(
      tx, params, 2, grad=grad,
      grad_fn=jax.value_and_grad(with_aux, has_aux=True)))
  # esam (gamma=1, SWP only): obj_fn is the per-example convention with
  # one "example", exactly.
  tx = sam_optax.esam(optax.sgd(LR), rho=RHO, beta=0.6)
  chex.assert_trees_all_equal(
      run(tx, params, 3, grad=grad, obj_fn=loss),
      run(tx, params, 3, grad=grad,
          example_loss_fn=lambda p, b: loss(p)[None] + 0 * b["i"],
          batch={"i": jnp.zeros(1)}))


def recording_sgd(received):
  sgd = optax.sgd(LR)

  def update_fn(updates, state, params=None, **extra_args):
    received.update(extra_args)
    return sgd.update(updates, state, params)

  return optax.GradientTransformationExtraArgs(sgd.init, update_fn)


def test_obj_fn_extra_args_reach_the_base_and_errors_are_clear():
  params = helpers.quadratic_params()
  received = {}
  tx = sam_optax.sam(recording_sgd(received), rho=RHO)
  # Levanter's call: obj_fn and loss= (both reach the base optimizer, as
  # optax.contrib.sophia needs obj_fn).
  got = run(tx, params, 1, obj_fn=helpers.quadratic_loss, loss=1.5)
  assert set(received) == {"obj_fn", "loss"}
  assert_flat_close(got[0], helpers.sam_step_reference(w0(), LR, RHO))
  g = helpers.quadratic_grad(params)
  for factory in [*GRAD_FN_METHODS.values(),
                  lambda b: sam_optax.esam(b, rho=RHO)]:
    tx = factory(optax.adam(LR))
    state = tx.init(params)
    with pytest.raises(ValueError, match="grad_fn|example_loss_fn"):
      tx.update(g, state, params)
    if factory is GRAD_FN_METHODS["sam"]:
      with pytest.raises(ValueError, match="both grad_fn= and obj_fn="):
        tx.update(g, state, params, grad_fn=helpers.quadratic_grad,
                  obj_fn=helpers.quadratic_loss)
  tx = sam_optax.esam(optax.sgd(LR), rho=RHO, gamma=0.5)
  with pytest.raises(ValueError, match="per-example"):
    tx.update(g, tx.init(params), params, obj_fn=helpers.quadratic_loss)
  with pytest.raises(TypeError, match="obj_fn must be a callable"):
    sam_optax.sam(optax.sgd(LR)).update(
        g, tx.init(params), params, obj_fn=1.0)


def test_obj_fn_drives_sophia_as_the_base():
  # optax.contrib.sophia reads obj_fn itself: sam passes it on.
  params = helpers.quadratic_params()
  base = optax.contrib.sophia(0.01)
  tx = sam_optax.sam(base, rho=RHO)
  got, _ = run(tx, params, 2, obj_fn=helpers.quadratic_loss)
  assert np.all(np.isfinite(helpers.flat(got)))
  assert np.max(np.abs(helpers.flat(got) - w0())) > 1e-3


# --- per-leaf rho -----------------------------------------------------------

MULT = {"a": 2.0, "b": 0.5}


def per_leaf_reference(w, multipliers, after_norm=True):
  g = A @ w
  m = np.concatenate([np.full(2, multipliers["a"]),
                      np.full(3, multipliers["b"])])
  if after_norm:
    eps = RHO * m * g / np.linalg.norm(g)
  else:  # bug: the norm of the scaled gradient
    eps = RHO * m * g / np.linalg.norm(m * g)
  return w - LR * A @ (w + eps), eps


@pytest.mark.parametrize("form", ["pytree", "callable"])
def test_per_leaf_rho_epsilon_is_hand_computed(form):
  multipliers = MULT if form == "pytree" else (
      lambda path, shape: MULT[path] * (1.0 if shape else 0.0))
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO, rho_multipliers=multipliers,
                     exact_norms=True)
  got, state = run(tx, helpers.quadratic_params(), 1,
                   grad_fn=helpers.quadratic_grad)
  expected, eps = per_leaf_reference(w0(), MULT)
  assert_flat_close(got, expected)
  np.testing.assert_allclose(state.perturbation_norm, np.linalg.norm(eps),
                             rtol=1e-6)
  assert_differs(got, per_leaf_reference(w0(), MULT, after_norm=False)[0])
  assert_differs(got, helpers.sam_step_reference(w0(), LR, RHO))
  # A scalar prefix applies to every leaf: all 1 is SAM exactly.
  ones = sam_optax.sam(optax.sgd(LR), rho=RHO, rho_multipliers=1.0)
  chex.assert_trees_all_equal(
      run(ones, helpers.quadratic_params(), 2,
          grad_fn=helpers.quadratic_grad),
      run(sam_optax.sam(optax.sgd(LR), rho=RHO), helpers.quadratic_params(),
          2, grad_fn=helpers.quadratic_grad))


def test_per_leaf_rho_reaches_the_variants_and_rejects_bad_values():
  tx = sam_optax.gsam(optax.sgd(LR), rho=RHO, alpha=0.0,
                      rho_multipliers=MULT)
  got, _ = run(tx, helpers.quadratic_params(), 1,
               grad_fn=helpers.quadratic_grad)
  assert_flat_close(got, per_leaf_reference(w0(), MULT)[0])
  with pytest.raises(ValueError, match="rho_multipliers"):
    sam_optax.sam(optax.sgd(LR), rho_multipliers={"a": -1.0, "b": 1.0})
  tx = sam_optax.sam(optax.sgd(LR), rho_multipliers={"a": 1.0})
  with pytest.raises(ValueError, match="rho_multipliers"):
    run(tx, helpers.quadratic_params(), 1, grad_fn=helpers.quadratic_grad)
  tx = sam_optax.sam(optax.sgd(LR),
                     rho_multipliers=lambda path, shape: float("nan"))
  with pytest.raises(ValueError, match="finite"):
    run(tx, helpers.quadratic_params(), 1, grad_fn=helpers.quadratic_grad)


# --- preconditioned SAM -----------------------------------------------------

B1, B2, ADAM_EPS = 0.9, 0.999, 1e-8


def precond_reference(w, num_steps, lr=LR, bug=None, preconditioner=None,
                      with_mu=False, adam_eps=ADAM_EPS):
  """Adam on ∇L(w + ε), ε = ρ P⁻¹g/‖P⁻¹g‖, P = √ν̂ + eps (ν of the
  previous step, bias-corrected), in float64; or a plausible bug."""
  m = np.zeros_like(w)
  v = np.zeros_like(w)
  for t in range(num_steps):
    g = A @ w
    if preconditioner is not None:
      p = preconditioner
    else:
      if bug == "no_bias_correction" or t == 0:
        nu_hat = v
      else:
        nu_hat = v / (1 - B2 ** t)
      p = (nu_hat if bug == "no_sqrt" else np.sqrt(nu_hat)) + adam_eps
    d = g if bug == "sam" else (g * p if bug == "times_p" else g / p)
    eps = RHO * d / np.linalg.norm(d)
    gs = A @ (w + eps)
    m = B1 * m + (1 - B1) * gs
    v = B2 * v + (1 - B2) * gs ** 2
    m_hat = m / (1 - B1 ** (t + 1))
    v_hat = v / (1 - B2 ** (t + 1))
    w = w - lr * m_hat / (np.sqrt(v_hat) + adam_eps)
  return (w, m) if with_mu else w


@pytest.mark.parametrize("adam_eps", [ADAM_EPS, 0.3])
def test_preconditioned_sam_matches_hand_formula_and_catches_bugs(adam_eps):
  # With the normalisation, the bias correction is a global scale that only
  # matters next to eps: eps = 0.3 (of the size of sqrt(nu)) shows it.
  tx = sam_optax.preconditioned_sam(optax.adam(LR, eps=adam_eps), rho=RHO,
                                    precond_eps=adam_eps)
  got, state = run(tx, helpers.quadratic_params(), 4,
                   grad_fn=helpers.quadratic_grad)
  assert_flat_close(got, precond_reference(w0(), 4, adam_eps=adam_eps),
                    rtol=2e-5)
  # Adam's step hides much of the gradient's size: Adam's first moment,
  # linear in the SAM gradients, is the sharper oracle.
  mu = optax.tree.get(state, "mu")
  _, expected_mu = precond_reference(w0(), 4, with_mu=True,
                                     adam_eps=adam_eps)
  assert_flat_close(mu, expected_mu, rtol=2e-5)
  bugs = ["sam", "times_p", "no_sqrt"]
  bugs += ["no_bias_correction"] if adam_eps > ADAM_EPS else []
  for bug in bugs:
    _, wrong_mu = precond_reference(w0(), 4, bug=bug, with_mu=True,
                                    adam_eps=adam_eps)
    assert_differs(mu, wrong_mu, at_least=1e-3)
  assert float(state.radius) == pytest.approx(RHO)
  # bias_correction=False is the un-corrected rule.
  tx = sam_optax.preconditioned_sam(optax.adam(LR, eps=adam_eps), rho=RHO,
                                    precond_eps=adam_eps,
                                    bias_correction=False)
  _, state = run(tx, helpers.quadratic_params(), 4,
                 grad_fn=helpers.quadratic_grad)
  _, expected_mu = precond_reference(w0(), 4, bug="no_bias_correction",
                                     with_mu=True, adam_eps=adam_eps)
  assert_flat_close(optax.tree.get(state, "mu"), expected_mu, rtol=2e-5)


def test_preconditioned_sam_reads_nu_through_wrappers():
  expected = run(sam_optax.preconditioned_sam(optax.adam(LR), rho=RHO),
                 helpers.quadratic_params(), 3,
                 grad_fn=helpers.quadratic_grad)[0]
  wrapped = optax.chain(optax.identity(), optax.inject_hyperparams(
      optax.adam)(learning_rate=LR))
  got = run(sam_optax.preconditioned_sam(wrapped, rho=RHO),
            helpers.quadratic_params(), 3,
            grad_fn=helpers.quadratic_grad)[0]
  chex.assert_trees_all_close(got, expected, rtol=1e-5)
  # inject_hyperparams sees rho, b2 and precond_eps.
  tx = optax.inject_hyperparams(sam_optax.preconditioned_sam)(
      optax.adam(LR), rho=RHO)
  assert {"rho", "b2", "precond_eps"} <= set(
      tx.init(helpers.quadratic_params()).hyperparams)
  chex.assert_trees_all_close(
      run(tx, helpers.quadratic_params(), 3,
          grad_fn=helpers.quadratic_grad)[0], expected, rtol=1e-5)
  # float16 params with eps injected (rounded to 0 in float16): finite.
  half = jax.tree.map(lambda x: x.astype(jnp.float16),
                      helpers.quadratic_params())
  got = run(tx, half, 2, grad=lambda p: jax.tree.map(
      lambda g: g.astype(jnp.float16), helpers.quadratic_grad(p)),
            grad_fn=lambda p: jax.tree.map(lambda g: g.astype(jnp.float16),
                                           helpers.quadratic_grad(p)))[0]
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
  # adamw with weight decay 0 is adam; its nu is found the same way.
  got = run(sam_optax.preconditioned_sam(
      optax.adamw(LR, weight_decay=0.0), rho=RHO),
            helpers.quadratic_params(), 3, grad_fn=helpers.quadratic_grad)[0]
  chex.assert_trees_all_close(got, expected, rtol=1e-5)


def test_preconditioned_sam_user_preconditioner_and_errors():
  p = {"a": jnp.array([1.0, 4.0]), "b": jnp.array([0.5, 2.0, 3.0])}
  tx = sam_optax.preconditioned_sam(optax.adam(LR), rho=RHO,
                                    preconditioner=lambda state: p)
  got, _ = run(tx, helpers.quadratic_params(), 2,
               grad_fn=helpers.quadratic_grad)
  assert_flat_close(got, precond_reference(
      w0(), 2, preconditioner=np.asarray(helpers.flat(p), np.float64)),
                    rtol=2e-5)
  # A base optimizer without a second moment: a clear error at init, unless
  # the preconditioner is given.
  with pytest.raises(ValueError, match="found no state with a `nu`"):
    sam_optax.preconditioned_sam(optax.sgd(LR)).init(
        helpers.quadratic_params())
  sam_optax.preconditioned_sam(
      optax.sgd(LR), preconditioner=lambda s: p).init(
          helpers.quadratic_params())
  with pytest.raises(ValueError, match="found 2"):
    sam_optax.preconditioned_sam(
        optax.chain(optax.adam(LR), optax.adam(LR))).init(
            helpers.quadratic_params())
  with pytest.raises(ValueError, match="adaptive"):
    sam_optax.preconditioned_sam(optax.adam(LR), adaptive=True)
  with pytest.raises(TypeError, match="preconditioner"):
    sam_optax.preconditioned_sam(optax.adam(LR), preconditioner=p)


def test_preconditioned_sam_under_multisteps_uses_the_inner_adam():
  # Under sam(MultiSteps(adam, 2)), nu changes every 2 micro-steps; with
  # the same gradient twice, 2 micro-steps are 1 step of the reference.
  tx = sam_optax.preconditioned_sam(
      optax.MultiSteps(optax.adam(LR), every_k_schedule=2), rho=RHO)
  got, _ = run(tx, helpers.quadratic_params(), 4,
               grad_fn=helpers.quadratic_grad)
  # Not the same as the reference over 2 steps (the micro-steps see w
  # unchanged within an outer step, as the reference does).
  assert_flat_close(got, precond_reference(w0(), 2), rtol=2e-5)


# --- Functional-SAM ---------------------------------------------------------

X = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)), jnp.float32)
Y = jnp.array([0, 1, 2, 1, 0, 2])


def mlp_params():
  rng = np.random.default_rng(2)
  return {"h": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          "o": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}


def outputs_fn(w):
  return jnp.tanh(X @ w["h"]) @ w["o"]


def loss_fn(logits):
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def full_loss(w):
  return loss_fn(outputs_fn(w))


def functional_reference(w, rho, lr, precond_p=None):
  """One SGD step: g_F = J(w+ε)ᵀ ∇_F ℓ(F(w)), by explicit Jacobians."""
  flat, unravel = jax.flatten_util.ravel_pytree(w)
  flat = np.asarray(flat, np.float64)
  g = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(full_loss)(w))[0],
                 np.float64)
  d = g if precond_p is None else g / precond_p
  eps = rho * d / np.linalg.norm(d)
  perturbed = unravel(jnp.asarray(flat + eps, jnp.float32))
  jac = jax.jacobian(lambda v: outputs_fn(unravel(v)).ravel())(
      jnp.asarray(flat + eps, jnp.float32))
  ct = jax.grad(loss_fn)(outputs_fn(w)).ravel()
  g_f = np.asarray(jac, np.float64).T @ np.asarray(ct, np.float64)
  g_sam = np.asarray(jax.flatten_util.ravel_pytree(
      jax.grad(full_loss)(perturbed))[0], np.float64)
  return flat - lr * g_f, flat - lr * g_sam


def flat_params(w):
  return np.asarray(jax.flatten_util.ravel_pytree(w)[0], np.float64)


def test_functional_sam_matches_explicit_jacobian_and_is_not_sam():
  w = mlp_params()
  expected, sam_step = functional_reference(w, RHO, LR)
  np.testing.assert_array_less(1e-3, np.max(np.abs(expected - sam_step)))
  tx = sam_optax.functional_sam(optax.sgd(LR), rho=RHO)
  _, g, ct = sam_optax.functional_value_and_grad(outputs_fn, loss_fn, w)
  chex.assert_trees_all_close(g, jax.grad(full_loss)(w), rtol=1e-6)
  for kwargs in ({"output_grads": ct}, {"loss_fn": loss_fn}):
    u, state = jax.jit(lambda w, s, kw=kwargs: tx.update(
        jax.grad(full_loss)(w), s, w, outputs_fn=outputs_fn, **kw))(
            w, tx.init(w))
    got = flat_params(optax.apply_updates(w, u))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(got - sam_step)) > 1e-3
  # A loss linear in the outputs has a constant ∇_F ℓ: Functional-SAM is
  # SAM exactly.
  c = jnp.asarray(np.random.default_rng(3).normal(size=(6, 3)), jnp.float32)
  linear = lambda f: jnp.sum(c * f)  # noqa: E731
  u_f, _ = tx.update(jax.grad(lambda w: linear(outputs_fn(w)))(w),
                     tx.init(w), w, outputs_fn=outputs_fn, loss_fn=linear)
  sam_tx = sam_optax.sam(optax.sgd(LR), rho=RHO)
  u_s, _ = sam_tx.update(jax.grad(lambda w: linear(outputs_fn(w)))(w),
                         sam_tx.init(w), w,
                         obj_fn=lambda w: linear(outputs_fn(w)))
  chex.assert_trees_all_close(u_f, u_s, rtol=1e-5, atol=1e-7)


def test_preconditioned_functional_sam_matches_hand_formula():
  w = mlp_params()
  tx = sam_optax.functional_sam(optax.adam(LR), rho=RHO,
                                preconditioned=True)

  @jax.jit
  def step(w, s):
    _, g, ct = sam_optax.functional_value_and_grad(outputs_fn, loss_fn, w)
    u, s = tx.update(g, s, w, outputs_fn=outputs_fn, output_grads=ct)
    return optax.apply_updates(w, u), s

  state = tx.init(w)
  w1, state = step(w, state)
  w2, state = step(w1, state)
  # The reference: Adam on g_F with the ascent preconditioned by the nu of
  # Adam's state before each step (the second step's uses step one's).
  base = optax.adam(LR)
  bstate = base.init(w)
  ref = w
  for t in range(2):
    adam_state = bstate[0]
    v = np.asarray(jax.flatten_util.ravel_pytree(adam_state.nu)[0],
                   np.float64)
    nu_hat = v / (1 - B2 ** t) if t else v
    p = np.sqrt(nu_hat) + ADAM_EPS
    g_f_step, _ = functional_reference(ref, RHO, 1.0, precond_p=p)
    g_f = flat_params(ref) - g_f_step  # lr 1: the gradient itself
    g_f = jax.flatten_util.ravel_pytree(ref)[1](jnp.asarray(g_f,
                                                            jnp.float32))
    u, bstate = base.update(g_f, bstate, ref)
    ref = optax.apply_updates(ref, u)
  np.testing.assert_allclose(flat_params(w2), flat_params(ref), rtol=1e-4,
                             atol=1e-6)
  unpreconditioned = sam_optax.functional_sam(optax.adam(LR), rho=RHO)
  s = unpreconditioned.init(w)
  v = w
  for _ in range(2):
    _, g, ct = sam_optax.functional_value_and_grad(outputs_fn, loss_fn, v)
    u, s = unpreconditioned.update(g, s, v, outputs_fn=outputs_fn,
                                   output_grads=ct)
    v = optax.apply_updates(v, u)
  assert np.max(np.abs(flat_params(v) - flat_params(w2))) > 1e-5


def count_dots(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)

  def count(j):
    n = 0
    for eqn in j.eqns:
      n += eqn.primitive.name == "dot_general"
      for sub in jax.core.jaxprs_in_params(eqn.params):
        n += count(sub)
    return n

  return count(jaxpr.jaxpr)


def test_functional_sam_costs_what_sam_costs():
  # Matrix products in the whole train step (clean pass + update): with
  # functional_value_and_grad and output_grads, Functional-SAM runs the
  # forward and backward passes SAM does, no more.
  w = mlp_params()
  f_tx = sam_optax.functional_sam(optax.adam(LR), rho=RHO)
  s_tx = sam_optax.sam(optax.adam(LR), rho=RHO)

  def functional_step(w, s):
    _, g, ct = sam_optax.functional_value_and_grad(outputs_fn, loss_fn, w)
    return f_tx.update(g, s, w, outputs_fn=outputs_fn, output_grads=ct)

  def sam_step(w, s):
    g = jax.grad(full_loss)(w)
    return s_tx.update(g, s, w, obj_fn=full_loss)

  n_f = count_dots(functional_step, w, f_tx.init(w))
  n_s = count_dots(sam_step, w, s_tx.init(w))
  assert n_f == n_s, (n_f, n_s)
  n_plain = count_dots(lambda w: jax.grad(full_loss)(w), w)
  assert n_s == 2 * n_plain


def test_functional_sam_logs_losses_and_rejects_bad_calls():
  w = mlp_params()
  tx = sam_optax.functional_sam(optax.sgd(LR), rho=RHO, value_and_grad=True)
  _, state = tx.update(jax.grad(full_loss)(w), tx.init(w), w,
                       outputs_fn=outputs_fn, loss_fn=loss_fn)
  assert float(state.sharpness) == pytest.approx(
      float(state.perturbed_loss) - float(full_loss(w)), rel=1e-5)
  assert float(state.sharpness) > 0
  g = jax.grad(full_loss)(w)
  with pytest.raises(ValueError, match="loss_fn"):
    tx.update(g, tx.init(w), w, outputs_fn=outputs_fn,
              output_grads=jax.grad(loss_fn)(outputs_fn(w)))
  tx = sam_optax.functional_sam(optax.sgd(LR), rho=RHO)
  with pytest.raises(ValueError, match="instead of grad_fn"):
    tx.update(g, tx.init(w), w, obj_fn=full_loss)
  with pytest.raises(ValueError, match="exactly one"):
    tx.update(g, tx.init(w), w, outputs_fn=outputs_fn)
  with pytest.raises(ValueError, match="exactly one"):
    tx.update(g, tx.init(w), w, outputs_fn=outputs_fn, loss_fn=loss_fn,
              output_grads=jax.grad(loss_fn)(outputs_fn(w)))
  with pytest.raises(TypeError, match="has_aux"):
    sam_optax.functional_sam(optax.sgd(LR), has_aux=True)
  with pytest.raises(ValueError, match="found no state"):
    sam_optax.functional_sam(optax.sgd(LR), preconditioned=True).init(w)
