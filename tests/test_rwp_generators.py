"""RWP's generators and stored-noise mode (issue 22)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._methods import rwp as _rwp
from tests import helpers

LR, STD, STEPS = 0.1, 0.2, 5


def params0():
  return {"a": jnp.array([[1.0, -2.0], [0.5, 3.0]], jnp.float32),
          "b": jnp.array([-1.0], jnp.float32)}


def loss(p):
  w = jnp.concatenate([p["a"].ravel(), p["b"]])
  return 0.5 * w @ helpers.A @ w


def run(tx, steps=STEPS):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, state = params0(), tx.init(params0())
  held, clean = [], []
  for _ in range(steps):
    params, state = step(params, state)
    held.append(params)
    clean.append(sam_optax.eval_params(state, params))
  return held, clean, state


def mix32_numpy(x):
  x = x.astype(np.uint64)
  m = np.uint64(0xFFFFFFFF)
  x ^= x >> np.uint64(16)
  x = (x * np.uint64(0x7FEB352D)) & m
  x ^= x >> np.uint64(15)
  x = (x * np.uint64(0x846CA68B)) & m
  x ^= x >> np.uint64(16)
  return x


def test_hash_normal_is_the_documented_formula():
  """u = (top 24 bits of mix(mix(mix(i ^ k0) ^ k1) ^ k2) + 0.5) / 2^24,
  z = sqrt(2) erfinv(2u - 1), checked with numpy integer arithmetic."""
  from scipy.special import erfinv
  keys = np.array([0x12345678, 0x9ABCDEF0, 0x0F1E2D3C], np.uint32)
  z = np.asarray(sam_optax.hash_normal(jnp.asarray(keys), (4, 5)))
  x = np.arange(20, dtype=np.uint64)
  for k in keys:
    x = mix32_numpy(x ^ np.uint64(k))
  u = ((x >> np.uint64(8)).astype(np.float64) + 0.5) / 2.0 ** 24
  np.testing.assert_allclose(z.ravel(), np.sqrt(2) * erfinv(2 * u - 1),
                             rtol=1e-4, atol=1e-5)


def test_hash_normal_distribution_and_independence():
  """Standard normal moments and quantiles; streams of different keys and
  neighbouring elements uncorrelated."""
  n = 200_000
  a = np.asarray(sam_optax.hash_normal(jnp.array([1, 2, 3], jnp.uint32),
                                       (n,)))
  b = np.asarray(sam_optax.hash_normal(jnp.array([1, 2, 4], jnp.uint32),
                                       (n,)))
  se = 1 / np.sqrt(n)
  assert abs(a.mean()) < 5 * se and abs(a.std() - 1) < 5 * se
  assert abs(np.mean(a ** 3)) < 10 * se
  assert abs(np.mean(a ** 4) - 3) < 20 * se
  np.testing.assert_allclose(np.quantile(a, [0.025, 0.5, 0.975]),
                             [-1.96, 0.0, 1.96], atol=0.03)
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 * se
  assert abs(np.corrcoef(a[1:], a[:-1])[0, 1]) < 5 * se


@pytest.mark.parametrize("generator", ["threefry", "hash", "rbg",
                                       "unsafe_rbg"])
def test_noise_is_filter_wise_gaussian_for_every_generator(generator):
  params = {"k": jnp.ones((4000, 2), jnp.float32) * jnp.array([1.0, 2.0]),
            "b": jnp.ones(4000, jnp.float32)}
  stds = jax.tree.map(lambda n: 0.01 * n, _rwp.filter_norms(params))
  tx = sam_optax.rwp(optax.sgd(LR), generator=generator)
  key = tx.init(params).method_state.key
  eps = jax.jit(_rwp.noise, static_argnums=4)(key, 7, stds, params,
                                              generator)
  want = 0.01 * np.sqrt(4000) * np.array([1.0, 2.0])
  np.testing.assert_allclose(np.std(eps["k"], axis=0), want, rtol=0.05)
  np.testing.assert_allclose(np.mean(eps["k"], axis=0), 0.0,
                             atol=0.1 * want.max())
  np.testing.assert_allclose(np.std(eps["b"]), 0.01 * np.sqrt(4000),
                             rtol=0.05)
  # Another step: fresh noise.
  other = _rwp.noise(key, 8, stds, params, generator)
  assert abs(np.corrcoef(np.ravel(eps["k"]), np.ravel(other["k"]))[0, 1]) \
      < 0.05


@pytest.mark.parametrize("generator", ["threefry", "hash"])
def test_stored_noise_gives_the_regenerating_trajectory(generator):
  """store_noise=True: the same held and clean params as regenerating ε,
  one param-sized buffer more in the state (equal up to float32 rounding:
  XLA fuses the two programs differently)."""
  regen = run(sam_optax.rwp(optax.sgd(LR), std=STD, seed=3,
                            generator=generator))
  stored = run(sam_optax.rwp(optax.sgd(LR), std=STD, seed=3,
                             generator=generator, store_noise=True))
  for a, b in zip(regen[0] + regen[1], stored[0] + stored[1]):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6,
                                                         atol=1e-7), a, b)
  state = stored[2].method_state
  assert regen[2].method_state.noise is None
  # The stored noise is exactly held - clean.
  diff = jax.tree.map(jnp.subtract, stored[0][-1], stored[1][-1])
  jax.tree.map(lambda d, e: np.testing.assert_allclose(d, e, atol=1e-6),
               diff, state.noise)


def test_store_noise_draws_once_per_step():
  """Regenerating draws twice per step, the stored mode once: count the
  normal draws in the step's jaxpr (erf_inv for "hash")."""
  params = params0()

  def count(**kw):
    tx = sam_optax.rwp(optax.sgd(LR), std=STD, generator="hash", **kw)
    jaxpr = jax.make_jaxpr(lambda p, s: tx.update(jax.grad(loss)(p), s, p))(
        params, tx.init(params))
    return str(jaxpr).count("erf_inv")

  leaves = len(jax.tree.leaves(params))
  assert count() == 2 * leaves
  assert count(store_noise=True) == leaves


@pytest.mark.parametrize("generator", ["hash", "rbg", "unsafe_rbg"])
def test_generators_reproducible_for_a_seed(generator):
  a = run(sam_optax.rwp(optax.sgd(LR), std=STD, seed=1, generator=generator))
  b = run(sam_optax.rwp(optax.sgd(LR), std=STD, seed=1, generator=generator))
  c = run(sam_optax.rwp(optax.sgd(LR), std=STD, seed=2, generator=generator))
  jax.tree.map(np.testing.assert_array_equal, a[0], b[0])
  assert not np.allclose(a[0][-1]["a"], c[0][-1]["a"])
  # The clean trajectory is SGD on the noisy gradients: w_1 = w_0 - lr g(w_0).
  w1 = optax.apply_updates(params0(), jax.tree.map(
      lambda g: -LR * g, jax.grad(loss)(params0())))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
               a[1][0], w1)
  assert type(a[2].method_state).generator == generator


def test_rejects_unknown_generator_and_bad_store_noise():
  with pytest.raises(ValueError, match="generator"):
    sam_optax.rwp(optax.sgd(LR), generator="philox")
  with pytest.raises((TypeError, ValueError), match="store_noise"):
    sam_optax.rwp(optax.sgd(LR), store_noise="yes")
