"""Tests for ESAM (Du et al., ICLR 2022): SWP and SDS.

The oracle is Algorithm 1 of the paper written out in numpy (float64), with
the network's gradient back-propagated by hand: clean gradient g,
SWP draws (the documented recipe on a fixed PRNG key), ε = m ⊙ ρ g/‖g‖ / β,
per-example losses before and after, the ⌊γB⌋ examples whose loss rose
most, the mean gradient over them at w + ε, one SGD step. Each plausible bug
of that recipe is shown to give a clearly different result.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._methods import esam as _esam

LR, RHO = 0.2, 0.3
B, D, H = 12, 3, 4


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w1": (0.8 * rng.standard_normal((D, H))).astype(np.float32),
          "b1": (0.1 * rng.standard_normal(H)).astype(np.float32),
          "w2": (0.8 * rng.standard_normal(H)).astype(np.float32)}


def make_batch(seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, D)).astype(np.float32)
  y = (np.sin(2 * x[:, 0]) + 0.5 * x[:, 1]
       + 0.3 * rng.standard_normal(B)).astype(np.float32)
  return {"x": x, "y": y}


def example_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return (h @ params["w2"] - batch["y"]) ** 2


def mean_loss(params, batch):
  return jnp.mean(example_loss(params, batch))


# --------------------------------------------------------------- reference


def np_losses(p, x, y):
  h = np.tanh(x @ p["w1"] + p["b1"])
  return (h @ p["w2"] - y) ** 2


def np_grad(p, x, y, reduce="mean"):
  """∇ of the mean (or sum) of the per-example losses, by hand."""
  h = np.tanh(x @ p["w1"] + p["b1"])
  r = h @ p["w2"] - y
  dpred = 2 * r / (len(y) if reduce == "mean" else 1)
  dz = dpred[:, None] * p["w2"][None, :] * (1 - h ** 2)
  return {"w1": x.T @ dz, "b1": dz.sum(0), "w2": h.T @ dpred}


def swp_draws(key, beta, num_leaves):
  """The documented draws: split the key, one Bernoulli(β) per leaf."""
  key, sub = jax.random.split(key)
  return np.asarray(jax.random.bernoulli(sub, beta, (num_leaves,))), key


def esam_reference(params, batch, beta, gamma, num_steps, seed=0, bug=None):
  """SGD with ESAM (Algorithm 1), or a plausible bug of it."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x, y = (np.asarray(batch[k], np.float64) for k in ("x", "y"))
  key = jax.random.PRNGKey(seed)
  names = sorted(p)  # jax.tree.leaves order of a dict.
  for _ in range(num_steps):
    g = np_grad(p, x, y)
    keep, key = swp_draws(key, beta, len(names))
    if bug == "perturb_all":
      keep = np.ones_like(keep)
    kept = [n for n, k in zip(names, keep) if k]
    norm_of = kept if bug == "norm_of_kept" else names
    gnorm = np.sqrt(sum(np.sum(g[n] ** 2) for n in norm_of))
    scale = RHO / (gnorm + 1e-12) / (1.0 if bug == "no_inv_beta" else beta)
    sign = -1.0 if bug == "sign" else 1.0
    pe = {n: p[n] + sign * scale * g[n] * (n in kept) for n in names}
    before, after = np_losses(p, x, y), np_losses(pe, x, y)
    score = {"largest_after": after, "smallest": before - after}.get(
        bug, after - before)
    k = max(1, int(np.floor(gamma * len(y))))
    if bug == "full_batch":
      k = len(y)
    idx = np.argsort(-score, kind="stable")[:k]
    gs = np_grad(pe, x[idx], y[idx], "sum" if bug == "sum" else "mean")
    p = {n: p[n] - LR * gs[n] for n in names}
  return p


def run_esam(tx, params, batch, num_steps, pass_losses=True):
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    (_, losses), grads = jax.value_and_grad(
        lambda q: (lambda ls: (ls.mean(), ls))(example_loss(q, batch)),
        has_aux=True)(params)
    updates, state = tx.update(
        grads, state, params, example_loss_fn=example_loss, batch=batch,
        example_losses=losses if pass_losses else None)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  states = []
  for _ in range(num_steps):
    params, state = step(params, state)
    states.append(state)
  return params, states


def vec(p):
  return np.concatenate([np.asarray(p[k], np.float64).ravel()
                         for k in sorted(p)])


def assert_differs(params, wrong, at_least=1e-4):
  diff = np.max(np.abs(vec(params) - vec(wrong)))
  assert diff > at_least, f"the oracle cannot see this bug ({diff:.1e})"


# ------------------------------------------------------------------- tests

SEED = 3  # Its draws over 3 steps mix kept and skipped leaves (checked).


def test_seed_draws_are_mixed():
  key, kept = jax.random.PRNGKey(SEED), []
  for _ in range(3):
    k, key = swp_draws(key, 0.5, 3)
    kept.append(k)
  kept = np.array(kept)
  assert kept.any() and not kept.all(), kept
  assert any(0 < row.sum() < 3 for row in kept), kept


@pytest.mark.parametrize("pass_losses", [True, False])
def test_esam_matches_algorithm_1_and_catches_bugs(pass_losses):
  beta, gamma, n = 0.5, 0.5, 3
  params, batch = init_params(), make_batch()
  tx = sam_optax.esam(optax.sgd(LR), rho=RHO, beta=beta, gamma=gamma,
                      seed=SEED)
  out, states = run_esam(tx, params, batch, n, pass_losses)
  want = esam_reference(params, batch, beta, gamma, n, seed=SEED)
  np.testing.assert_allclose(vec(out), vec(want), rtol=2e-5, atol=2e-6)
  for bug in ("sign", "no_inv_beta", "norm_of_kept", "perturb_all",
              "largest_after", "smallest", "full_batch", "sum"):
    assert_differs(out, esam_reference(params, batch, beta, gamma, n,
                                       seed=SEED, bug=bug))
  # The logged scalars: sharpness of the whole batch at the ε applied.
  s = states[0]
  p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
  g = np_grad(p64, *(np.asarray(batch[k], np.float64) for k in "xy"))
  np.testing.assert_allclose(s.ascent_norm, np.sqrt(sum(
      np.sum(v ** 2) for v in g.values())), rtol=1e-5)
  keep, _ = swp_draws(jax.random.PRNGKey(SEED), beta, 3)
  np.testing.assert_allclose(s.method_state.perturbed_fraction, keep.mean())
  gnorm = float(s.ascent_norm)
  kept_norm = np.sqrt(sum(np.sum(g[k] ** 2) for k, m in
                          zip(sorted(g), keep) if m))
  np.testing.assert_allclose(s.radius, RHO / beta * kept_norm / gnorm,
                             rtol=1e-5)
  assert np.isfinite(float(s.sharpness))
  np.testing.assert_allclose(
      s.sharpness, float(s.perturbed_loss) - float(mean_loss(params, batch)),
      rtol=1e-5)


def test_beta_and_gamma_one_is_sam_exactly():
  params, batch = init_params(), make_batch()
  base = optax.sgd(LR, momentum=0.9)
  out, e_states = run_esam(sam_optax.esam(base, rho=RHO), params, batch, 3)
  sam = sam_optax.sam(base, rho=RHO, value_and_grad=True)
  state, p = sam.init(params), params
  for _ in range(3):
    grads = jax.grad(mean_loss)(p, batch)
    updates, state = sam.update(
        grads, state, p, value=mean_loss(p, batch),
        grad_fn=lambda q: jax.value_and_grad(mean_loss)(q, batch))
    p = optax.apply_updates(p, updates)
  chex.assert_trees_all_close(out, p, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(e_states[-1].base_state, state.base_state,
                              rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(e_states[-1].sharpness, state.sharpness,
                             rtol=1e-5)


def test_sds_shrinks_the_compiled_backward_pass():
  params, batch = init_params(), make_batch()
  grads = jax.grad(mean_loss)(params, batch)

  def flops(gamma):
    tx = sam_optax.esam(optax.sgd(LR), rho=RHO, gamma=gamma)

    def step(params, state, losses):
      return tx.update(grads, state, params, example_loss_fn=example_loss,
                       batch=batch, example_losses=losses)

    compiled = jax.jit(step).lower(
        params, tx.init(params), example_loss(params, batch)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]

  # The flops of the sub-batch gradient scale with k: smaller at γ = 1/4
  # than at γ = 3/4.
  assert flops(0.25) < flops(0.75)


def test_inject_hyperparams_with_static_gamma_and_seed():
  params, batch = init_params(), make_batch()
  tx = optax.inject_hyperparams(sam_optax.esam, static_args=("gamma", "seed"))(
      optax.sgd(LR), rho=RHO, beta=0.5, gamma=0.5, seed=SEED)
  out, states = run_esam(tx, params, batch, 3)
  want = esam_reference(params, batch, 0.5, 0.5, 3, seed=SEED)
  np.testing.assert_allclose(vec(out), vec(want), rtol=2e-5, atol=2e-6)
  assert float(states[-1].hyperparams["beta"]) == 0.5


def test_call_and_argument_errors():
  params, batch = init_params(), make_batch()
  tx = sam_optax.esam(optax.sgd(LR), gamma=0.5)
  state = tx.init(params)
  grads = jax.grad(mean_loss)(params, batch)
  with pytest.raises(ValueError, match="not grad_fn"):
    tx.update(grads, state, params, grad_fn=lambda p: grads)
  with pytest.raises(ValueError, match="per-example loss and the batch"):
    tx.update(grads, state, params, example_loss_fn=example_loss)
  with pytest.raises(ValueError, match=r"shape \(B,\)"):
    tx.update(grads, state, params, example_loss_fn=mean_loss, batch=batch)
  for gamma in (0.0, 1.5, jnp.float32(0.5)):
    with pytest.raises(ValueError, match="gamma"):
      sam_optax.esam(optax.sgd(LR), gamma=gamma)
  with pytest.raises(ValueError, match="beta"):
    sam_optax.esam(optax.sgd(LR), beta=0.0)
  with pytest.raises(TypeError, match="value_and_grad"):
    sam_optax.esam(optax.sgd(LR), value_and_grad=True)
  # Unknown extra args are accepted and passed on (the Optax contract).
  tx.update(grads, state, params, example_loss_fn=example_loss, batch=batch,
            unused=1)


def test_num_selected():
  assert [_esam.num_selected(10, g) for g in (0.01, 0.5, 0.55, 1.0)] == [
      1, 5, 5, 10]
