"""Tests for the cheap methods: MSAM, RWP (one gradient), RST and AE-SAM.

MSAM is checked step for step against the authors' PyTorch optimizers
(MarlonBecker/MSAM ``MSAM`` and ``AdamW_MSAM``), their update rules ported
by hand to numpy float64 below. RWP, RST and AE-SAM are checked against
their formulas written out in numpy float64 on a quadratic, with plausible
bug variants shown to differ.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._methods import rwp as _rwp
from tests import helpers

A = np.asarray(helpers.A, np.float64)
LR, RHO = 0.1, 0.3
STEPS = 6


def w0():
  return np.asarray(helpers.flat(helpers.quadratic_params()), np.float64)


def grad(w):
  return A @ w


_eval_params = jax.jit(sam_optax.eval_params)


def held_run(tx, num_steps, params=None, flat=True):
  """Plain Optax steps (no grad_fn) on the quadratic, the gradient at the
  held params; returns per step the held and the eval_params params."""
  params = helpers.quadratic_params() if params is None else params

  @jax.jit
  def step(params, state):
    updates, state = tx.update(helpers.quadratic_grad(params), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  held, clean, states = [], [], []
  for _ in range(num_steps):
    params, state = step(params, state)
    held.append(params)
    clean.append(_eval_params(state, params))
    states.append(state)
  if flat:
    held = [np.asarray(helpers.flat(p), np.float64) for p in held]
    clean = [np.asarray(helpers.flat(p), np.float64) for p in clean]
  return held, clean, states


def assert_close_all(actual, expected, rtol=2e-5, atol=2e-6):
  for a, e in zip(actual, expected, strict=True):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def assert_differs(actual, wrong, at_least=1e-4):
  diff = max(np.max(np.abs(a - w)) for a, w in zip(actual, wrong))
  assert diff > at_least, f"the oracle cannot see this bug ({diff:.1e})"


# --- MSAM: the authors' optimizers, ported by hand ---------------------------


def authors_msam_sgd(lr, momentum, wd, rho, num_steps, bug=None):
  """MarlonBecker/MSAM ``optimizer/msam.py``, ``MSAM.step``, in numpy.

  The params ``p`` the loop holds are the perturbed ones; the momentum
  buffer and the inverse norm start at 0. Each step, with g the gradient at
  ``p``: ``d = g + wd p`` (decay of the *held* params); ``p += rho s v``
  (back to w); ``v = momentum v + d``; ``p -= lr v``; ``s = 1/(|v| +
  1e-12)``; ``p -= rho s v``. Returns per step (held p, clean p + rho s v).
  """
  p, v, s = w0(), np.zeros(5), 0.0
  held, clean = [], []
  for _ in range(num_steps):
    d = grad(p) + wd * (p if bug != "decay_clean" else p + rho * s * v)
    p = p + rho * s * v if bug != "no_undo" else p
    v = momentum * v + d
    p = p - lr * v
    s = 1.0 / (np.linalg.norm(v) + 1e-12)
    p = p - rho * s * v if bug != "sign" else p + rho * s * v
    held.append(p)
    clean.append(p + rho * s * v if bug != "sign" else p - rho * s * v)
  return held, clean


def authors_adamw_msam(lr, b1, b2, eps, wd, rho, num_steps, bug=None):
  """MarlonBecker/MSAM ``optimizer/adamW_msam.py``, ``adamW_msam``, in numpy.

  ``nf`` (starts at 0) is ``rho / (|m| + 1e-12)``. Each step, g at the held
  ``p``: ``p += nf m`` (back to w); ``m = b1 m + (1-b1) g``; ``v = b2 v +
  (1-b2) g²``; ``p -= lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps)``;
  ``p *= 1 - lr wd`` (decay of the clean weights, after the step); ``nf =
  rho/(|m| + 1e-12)``; ``p -= nf m``.
  """
  p, m, v, nf = w0(), np.zeros(5), np.zeros(5), 0.0
  held, clean = [], []
  for t in range(1, num_steps + 1):
    g = grad(p)
    if bug == "decay_held":
      p = p * (1 - lr * wd)
    p = p + nf * m
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
    p = p - lr / (1 - b1**t) * m / denom
    if bug != "decay_held":
      p = p * (1 - lr * wd)
    nf = rho / (np.linalg.norm(m) + 1e-12)
    p = p - nf * m
    held.append(p)
    clean.append(p + nf * m)
  return held, clean


def test_msam_sgd_equals_authors_msam():
  momentum, wd = 0.9, 0.05
  tx = sam_optax.msam(optax.chain(optax.add_decayed_weights(wd),
                                  optax.sgd(LR, momentum=momentum)), rho=RHO)
  held, clean, states = held_run(tx, STEPS)
  ref_held, ref_clean = authors_msam_sgd(LR, momentum, wd, RHO, STEPS)
  assert_close_all(held, ref_held)
  assert_close_all(clean, ref_clean)
  for bug in ("sign", "no_undo", "decay_clean"):
    assert_differs(held, authors_msam_sgd(LR, momentum, wd, RHO, STEPS,
                                          bug)[0])
  # The first gradient is taken at w0 (v = 0): radius 0, then ρ.
  radii = [float(s.radius) for s in states]
  np.testing.assert_allclose(radii, [0.0] + [RHO] * (STEPS - 1), rtol=1e-5)
  # The held params sit exactly ρ from the clean ones.
  for h, c in zip(held, clean):
    np.testing.assert_allclose(np.linalg.norm(h - c), RHO, rtol=1e-5)


def test_msam_adamw_equals_authors_adamw_msam():
  lr, b1, b2, eps, wd, rho = 0.05, 0.9, 0.99, 1e-8, 0.1, 0.5
  tx = sam_optax.msam(optax.adam(lr, b1=b1, b2=b2, eps=eps), rho=rho,
                      weight_decay=wd, learning_rate=lr)
  held, clean, _ = held_run(tx, STEPS)
  ref_held, ref_clean = authors_adamw_msam(lr, b1, b2, eps, wd, rho, STEPS)
  assert_close_all(held, ref_held)
  assert_close_all(clean, ref_clean)
  assert_differs(held, authors_adamw_msam(lr, b1, b2, eps, wd, rho, STEPS,
                                          "decay_held")[0])
  # Without weight decay it is the same with the decay dropped.
  tx = sam_optax.msam(optax.adam(lr, b1=b1, b2=b2, eps=eps), rho=rho)
  held0, _, _ = held_run(tx, STEPS)
  assert_close_all(held0, authors_adamw_msam(lr, b1, b2, eps, 0.0, rho,
                                             STEPS)[0])
  assert_differs(held0, ref_held)


def test_msam_learning_rate_schedule_scales_the_decay():
  lr = optax.linear_schedule(0.05, 0.01, STEPS)
  tx = sam_optax.msam(optax.adam(lr), rho=0.5, weight_decay=0.1,
                      learning_rate=lr)
  held, clean, _ = held_run(tx, STEPS)
  # By hand: one step of the reference per step, with lr(t).
  p, m, v, nf = w0(), np.zeros(5), np.zeros(5), 0.0
  for t in range(1, STEPS + 1):
    lr_t = float(lr(t - 1))
    g = grad(p)
    p = p + nf * m
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    p = p - lr_t / (1 - 0.9**t) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**t)
                                        + 1e-8)
    p = p * (1 - lr_t * 0.1)
    nf = 0.5 / (np.linalg.norm(m) + 1e-12)
    p = p - nf * m
  np.testing.assert_allclose(held[-1], p, rtol=2e-5, atol=2e-6)


def test_msam_rho_zero_is_the_base_optimizer():
  # Equal to float32 rounding, not bit for bit: XLA fuses the extra (zero)
  # terms with the update differently (measured: 1 ulp).
  base = optax.sgd(LR, momentum=0.9)
  held, clean, _ = held_run(sam_optax.msam(base, rho=0.0), STEPS)
  ref, _, _ = held_run(optax.with_extra_args_support(base), STEPS)
  assert_close_all(held, ref, rtol=1e-6, atol=1e-7)
  assert_close_all(clean, ref, rtol=1e-6, atol=1e-7)


def test_msam_needs_exactly_one_momentum():
  params = helpers.quadratic_params()
  tx = sam_optax.msam(optax.sgd(LR))  # No momentum: no `trace`.
  with pytest.raises(ValueError, match="exactly one"):
    tx.update(helpers.quadratic_grad(params), tx.init(params), params)
  tx = sam_optax.msam(optax.chain(optax.trace(0.9), optax.trace(0.5)))
  with pytest.raises(ValueError, match="several"):
    tx.update(helpers.quadratic_grad(params), tx.init(params), params)
  with pytest.raises(ValueError, match="learning_rate"):
    sam_optax.msam(optax.adam(0.1), weight_decay=0.1)


# --- RWP ---------------------------------------------------------------------


def rwp_params():
  """A 2x2 kernel (2 filters = columns) and a bias of 1: 5 entries."""
  return {"a": jnp.array([[1.0, -2.0], [0.5, 3.0]], jnp.float32),
          "b": jnp.array([-1.0], jnp.float32)}


def rwp_flat(p):
  return np.concatenate([np.asarray(p["a"], np.float64).ravel(),
                         np.asarray(p["b"], np.float64)])


def rwp_unflat(v):
  return {"a": v[:4].reshape(2, 2), "b": v[4:]}


def rwp_loss(p):
  w = jnp.concatenate([p["a"].ravel(), p["b"]])
  return 0.5 * w @ helpers.A @ w


@jax.jit
def _draws(key, t):
  ka, kb = jax.random.split(jax.random.fold_in(key, t), 2)
  return jax.random.normal(ka, (2, 2)), jax.random.normal(kb, (1,))


def rwp_reference(sigma, seed, num_steps, lr=LR, bug=None):
  """See below; ``sigma`` may be a function of the step."""
  return _rwp_reference(sigma if callable(sigma) else lambda t: sigma,
                        seed, num_steps, lr, bug)


def _rwp_reference(sigma, seed, num_steps, lr=LR, bug=None):
  """SGD on ∇L(w + ε_t); ε_t[:, j] ~ N(0, σ²|w_t[:, j]|²), bias: σ|b_t|.

  The normals are the documented draws: ``split(fold_in(PRNGKey(seed), t),
  num_leaves)``, one standard normal per leaf (leaves in tree order, "a"
  then "b"); ε_0 = 0 (no noise before the first step).
  """
  key = jax.random.PRNGKey(seed)
  w = rwp_flat(rwp_params())
  held, clean = [], []
  std = None
  for t in range(num_steps + 1):
    za, zb = (np.asarray(z, np.float64) for z in _draws(key, t))
    if std is None:
      eps = np.zeros(5)
    else:
      eps = np.concatenate([(za * std[0]).ravel(), zb * std[1]])
    if t > 0:
      held.append(w + eps)
      clean.append(w)
    if t == num_steps:
      break
    w = w - lr * A @ (w + eps)
    a = rwp_unflat(w)["a"]
    axis = 1 if bug == "row_filters" else 0
    filters = np.sqrt(np.sum(a * a, axis=axis))
    if bug == "row_filters":
      filters = filters[:, None]
    s = sigma(t + 1)  # ε_{t+1} is drawn with σ at the step it serves.
    std = (s * filters, s * np.abs(w[4:]))
  return held, clean


@pytest.mark.parametrize("schedule", [False, True])
def test_rwp_exact_formula(schedule):
  sigma = (lambda t: 0.1 * (1.0 + t)) if schedule else 0.2
  tx = sam_optax.rwp(optax.sgd(LR), std=sigma, seed=3)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(rwp_loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, state = rwp_params(), tx.init(rwp_params())
  held, clean = [], []
  for _ in range(STEPS):
    params, state = step(params, state)
    held.append(rwp_flat(params))
    clean.append(rwp_flat(_eval_params(state, params)))
  ref_held, ref_clean = rwp_reference(sigma, 3, STEPS)
  assert_close_all(held, ref_held)
  assert_close_all(clean, ref_clean)
  assert_differs(held, rwp_reference(sigma, 3, STEPS, bug="row_filters")[0])
  assert_differs(held, rwp_reference(sigma, 4, STEPS)[0])  # Another seed.


def test_rwp_noise_is_filter_wise_gaussian():
  """The empirical std of each filter's noise is σ |w[:, j]| (biases σ|b|)."""
  params = {"k": jnp.asarray(np.tile([1.0, 3.0], (4000, 1)) *
                             np.array([[1.0, 2.0]]), jnp.float32),
            "b": jnp.ones(4000, jnp.float32) * 0.5}
  norms = _rwp.filter_norms(params)
  np.testing.assert_allclose(norms["k"], np.sqrt(4000) * np.array([1., 6.]),
                             rtol=1e-5)
  np.testing.assert_allclose(norms["b"], 0.5 * np.sqrt(4000), rtol=1e-5)
  stds = jax.tree.map(lambda n: 0.01 * n, norms)
  eps = jax.jit(_rwp.noise)(jax.random.PRNGKey(0), 7, stds, params)
  np.testing.assert_allclose(np.std(eps["k"], axis=0),
                             0.01 * np.sqrt(4000) * np.array([1., 6.]),
                             rtol=0.05)
  np.testing.assert_allclose(np.mean(eps["k"], axis=0), 0.0,
                             atol=0.1 * 0.01 * np.sqrt(4000))
  np.testing.assert_allclose(np.std(eps["b"]), 0.01 * 0.5 * np.sqrt(4000),
                             rtol=0.05)


# --- RST and AE-SAM ----------------------------------------------------------


def sam_grad(w, rho):
  g = A @ w
  n = np.linalg.norm(g)
  return A @ (w + (rho * g / n if n > 0 else 0.0))


def counting_run(tx, num_steps, params=None):
  """Jitted SAM-convention steps; counts ``grad_fn``'s executions."""
  params = helpers.quadratic_params() if params is None else params
  calls = []

  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return helpers.quadratic_grad(p)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    updates, state = tx.update(helpers.quadratic_grad(params), state, params,
                               grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  chex.clear_trace_counter()
  state = tx.init(params)
  out, states = [], []
  for _ in range(num_steps):
    params, state = step(params, state)
    out.append(np.asarray(helpers.flat(params), np.float64))
    states.append(state)
  jax.effects_barrier()
  return out, states, len(calls)


def rst_reference(p, seed, num_steps, bug=None):
  key = jax.random.PRNGKey(seed)
  w, out, used = w0(), [], []
  for t in range(num_steps):
    coin = bool(jax.random.bernoulli(jax.random.fold_in(key, t), p))
    if bug == "flip":
      coin = not coin
    used.append(coin)
    w = w - LR * (sam_grad(w, RHO) if coin else A @ w)
    out.append(w)
  return out, used


def test_rst_exact_formula_and_cost():
  n, p = 12, 0.4
  out, states, calls = counting_run(
      sam_optax.rst(optax.sgd(LR), rho=RHO, probability=p, seed=5), n)
  ref, used = rst_reference(p, 5, n)
  assert_close_all(out, ref)
  assert [float(s.radius) > 0 for s in states] == used
  assert calls == sum(used)  # The base steps never call grad_fn.
  assert 0 < sum(used) < n
  assert_differs(out, rst_reference(p, 5, n, bug="flip")[0])


def test_rst_p_zero_is_base_p_one_is_sam():
  base = optax.sgd(LR, momentum=0.9)
  out, _, calls = counting_run(sam_optax.rst(base, rho=RHO, probability=0.0),
                               STEPS)
  ref, _, _ = counting_run(optax.with_extra_args_support(base), STEPS)
  assert calls == 0
  for a, b in zip(out, ref):
    np.testing.assert_array_equal(a, b)
  out, _, calls = counting_run(sam_optax.rst(base, rho=RHO, probability=1.0),
                               STEPS)
  ref, _, _ = counting_run(sam_optax.sam(base, rho=RHO), STEPS)
  assert calls == STEPS
  for a, b in zip(out, ref):
    np.testing.assert_array_equal(a, b)


def test_rst_probability_schedule_and_inject():
  tx = optax.inject_hyperparams(sam_optax.rst)(optax.sgd(LR), rho=RHO,
                                               probability=0.0)
  _, states, calls = counting_run(tx, 4)
  assert calls == 0
  assert float(states[-1].hyperparams["probability"]) == 0.0
  sched = lambda t: jnp.where(t < 3, 0.0, 1.0)  # noqa: E731
  _, states, calls = counting_run(
      sam_optax.rst(optax.sgd(LR), rho=RHO, probability=sched), 6)
  assert calls == 3
  assert [float(s.radius) > 0 for s in states] == [False] * 3 + [True] * 3


def ae_sam_reference(threshold, decay, num_steps, bug=None):
  w, mean, var, out, used = w0(), 0.0, 0.0, [], []
  for t in range(num_steps):
    g = A @ w
    sq = float(g @ g)
    mean = decay * mean + (1 - decay) * sq
    var = decay * var + (1 - decay) * (sq - mean)**2
    c = threshold(t)
    coin = sq >= mean + c * np.sqrt(var)
    if bug == "flip":
      coin = not coin
    used.append(bool(coin))
    w = w - LR * (sam_grad(w, RHO) if coin else g)
    out.append(w)
  return out, used


def test_ae_sam_exact_formula_and_cost():
  n, decay = 14, 0.6
  threshold = optax.linear_schedule(-0.5, 0.8, n)
  out, states, calls = counting_run(
      sam_optax.ae_sam(optax.sgd(LR), rho=RHO, threshold=threshold,
                       decay=decay), n)
  thr = lambda t: float(threshold(t))  # noqa: E731
  ref, used = ae_sam_reference(thr, decay, n)
  assert 0 < sum(used) < n  # Both branches are exercised.
  assert [float(s.radius) > 0 for s in states] == used
  assert calls == sum(used)
  assert_close_all(out, ref)
  assert_differs(out, ae_sam_reference(thr, decay, n, bug="flip")[0])
  # The moments, by hand, from the reference's iterates.
  mean, var = 0.0, 0.0
  for s, w_prev in zip(states, [w0()] + ref[:-1], strict=True):
    sq = float(np.sum((A @ w_prev) ** 2))
    mean = decay * mean + (1 - decay) * sq
    var = decay * var + (1 - decay) * (sq - mean) ** 2
    np.testing.assert_allclose(float(s.method_state.sq_norm_mean), mean,
                               rtol=1e-5)
    np.testing.assert_allclose(float(s.method_state.sq_norm_var), var,
                               rtol=1e-4)


def test_ae_sam_threshold_schedule_is_read_at_the_step():
  # c = -10 on even steps (always SAM), +10 on odd ones (never, here).
  n, decay = 6, 0.6
  parity = lambda t: jnp.where(t % 2 == 0, -10.0, 10.0)  # noqa: E731
  out, states, calls = counting_run(
      sam_optax.ae_sam(optax.sgd(LR), rho=RHO, threshold=parity,
                       decay=decay), n)
  ref, used = ae_sam_reference(lambda t: float(parity(t)), decay, n)
  assert used == [True, False] * (n // 2)
  assert [float(s.radius) > 0 for s in states] == used
  assert calls == n // 2
  assert_close_all(out, ref)


def test_ae_sam_huge_threshold_is_base_bit_for_bit():
  base = optax.sgd(LR, momentum=0.9)
  out, _, calls = counting_run(
      sam_optax.ae_sam(base, rho=RHO, threshold=1e9), STEPS)
  ref, _, _ = counting_run(optax.with_extra_args_support(base), STEPS)
  assert calls == 0
  for a, b in zip(out, ref):
    np.testing.assert_array_equal(a, b)


# --- Every method: zero gradient, eval_params, wrappers -----------------------


NEW_METHODS = {
    "msam": lambda: sam_optax.msam(optax.sgd(LR, momentum=0.9), rho=RHO),
    "msam_adam": lambda: sam_optax.msam(optax.adam(0.05), rho=RHO),
    "rwp": lambda: sam_optax.rwp(optax.sgd(LR, momentum=0.9), std=0.1),
    "rst": lambda: sam_optax.rst(optax.sgd(LR), rho=RHO, probability=0.5),
    "ae_sam": lambda: sam_optax.ae_sam(optax.sgd(LR), rho=RHO),
}


@pytest.mark.parametrize("name", list(NEW_METHODS))
def test_zero_gradient_stays_finite(name):
  zero = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
  params, states = helpers.run_steps(NEW_METHODS[name](),
                                     helpers.quadratic_params(), 3,
                                     grad=zero, grad_fn=zero)
  chex.assert_tree_all_finite((params, states))
  # Nothing moves the clean weights (the held ones of RWP carry noise).
  chex.assert_trees_all_close(sam_optax.eval_params(states[-1], params),
                              helpers.quadratic_params(), atol=1e-7)


@functools.cache
def unwrapped_run(name):
  held, clean, _ = held_run(NEW_METHODS[name](), 4)
  return held, clean


@pytest.mark.parametrize("name", ["msam", "rwp"])
@pytest.mark.parametrize("wrap", ["chain", "inject"])
def test_eval_params_of_held_param_methods(name, wrap):
  """Under each wrapper, eval_params(held) is the clean w of the unwrapped
  run (the wrappers here change nothing; the unwrapped one is checked
  against the references above)."""
  tx = {"chain": lambda: optax.chain(optax.identity(), NEW_METHODS[name]()),
        "inject": lambda: optax.inject_hyperparams(
            lambda learning_rate: optax.chain(
                optax.scale(learning_rate), NEW_METHODS[name]()))(1.0),
        }[wrap]()
  held, clean, _ = held_run(tx, 4)
  ref_held, ref_clean = unwrapped_run(name)
  assert_close_all(held, ref_held, rtol=1e-6, atol=1e-7)
  assert_close_all(clean, ref_clean, rtol=1e-6, atol=1e-7)
  assert_differs(held, clean, at_least=1e-3)  # The held params differ.


@pytest.mark.parametrize("name", ["rst", "ae_sam"])
def test_eval_params_of_clean_param_methods(name):
  params, states = helpers.run_steps(
      optax.chain(optax.identity(), NEW_METHODS[name]()),
      helpers.quadratic_params(), 2)
  assert sam_optax.eval_params(states[-1], params) is params


def test_injected_hyperparameters_msam_and_rwp():
  tx = optax.inject_hyperparams(sam_optax.msam)(optax.sgd(LR, momentum=0.9),
                                                rho=RHO)
  held, clean, states = held_run(tx, 3)
  ref_held, _, _ = held_run(NEW_METHODS["msam"](), 3)
  assert_close_all(held, ref_held, rtol=1e-6, atol=1e-7)
  assert float(states[-1].hyperparams["rho"]) == pytest.approx(RHO)
  # RWP at std 0 is the base optimizer (to 1 ulp, as MSAM at ρ = 0: the
  # zero noise terms change XLA's fusion), here with std injected.
  base = optax.sgd(LR, momentum=0.9)
  tx = optax.inject_hyperparams(sam_optax.rwp, static_args=("seed",))(
      base, std=0.0)
  held, clean, _ = held_run(tx, STEPS)
  ref, _, _ = held_run(optax.with_extra_args_support(base), STEPS)
  assert_close_all(held, ref, rtol=1e-6, atol=1e-7)
  assert_close_all(clean, ref, rtol=1e-6, atol=1e-7)
  tx = optax.inject_hyperparams(sam_optax.msam)(
      optax.adam(0.05), rho=0.5, weight_decay=0.1, learning_rate=0.05)
  held, _, states = held_run(tx, 3)
  ref, _ = authors_adamw_msam(0.05, 0.9, 0.999, 1e-8, 0.1, 0.5, 3)
  assert_close_all(held, ref)
  assert float(states[-1].hyperparams["weight_decay"]) == pytest.approx(0.1)
