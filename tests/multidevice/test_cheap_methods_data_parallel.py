"""MSAM, RWP, RST and AE-SAM on 8 fake CPU devices under pmap.

Each method is compared with a hand-written per-shard reference (numpy
float64, ``jax.grad`` of a tiny tanh model per shard) and the state must
come out identical on every device:

* MSAM and RWP (one gradient): the gradients at the held params are averaged
  (one ``pmean``); the momentum, the noise key and the held params stay
  replicated, so every device perturbs alike.
* RST and AE-SAM: the same choice on every device (RST: the replicated key;
  AE-SAM: the device-average of ‖g_i‖²); the SAM steps ascend per device and
  average the SAM gradients (as ``sam``), the base steps average g.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from tests.multidevice.problem import (
    DATA,
    MESH,
    N_DEV,
    PARAMS,
    loss_fn,
    make_data,
    shard_grad,
    unit,
    unvec,
    vec,
)

LR, RHO, MOMENTUM, STD, SEED = 0.1, 0.2, 0.9, 0.1, 2


TXS = {
    "msam": lambda: sam_optax.msam(optax.sgd(LR, momentum=MOMENTUM),
                                   rho=RHO, axis_name="batch"),
    "rwp": lambda: sam_optax.rwp(optax.sgd(LR), std=STD, seed=SEED,
                                 axis_name="batch"),
    # The fast generator and the stored noise: the same noise on every
    # device (replicated key), the state replicated.
    "rwp_hash": lambda: sam_optax.rwp(optax.sgd(LR), std=STD, seed=SEED,
                                      axis_name="batch", generator="hash",
                                      store_noise=True),
    "rst": lambda: sam_optax.rst(optax.sgd(LR), rho=RHO, probability=0.5,
                                 seed=SEED, axis_name="batch"),
    "ae_sam": lambda: sam_optax.ae_sam(optax.sgd(LR), rho=RHO,
                                       threshold=0.3, decay=0.5,
                                       axis_name="batch"),
}
STEPS = 5


def rwp_noise(t, stds, generator="threefry"):
  """The documented draws: split(fold_in(key, t), 3), leaves b1, w1, w2
  (``"hash"``: three round keys per leaf from bits(fold_in(key, t)))."""
  step_key = jax.random.fold_in(jax.random.PRNGKey(SEED), t)
  keys = jax.random.split(step_key, 3)
  round_keys = jax.random.bits(step_key, (3, 3), jnp.uint32)
  out = {}
  for i, (k, name) in enumerate(zip(keys, sorted(PARAMS))):
    shape = PARAMS[name].shape
    z = (sam_optax.hash_normal(round_keys[i], shape) if generator == "hash"
         else jax.random.normal(k, shape))
    out[name] = np.asarray(z, np.float64) * stds[name]
  return vec(out)


def rwp_stds(w):
  p = unvec(w)
  return {"w1": STD * np.sqrt(np.sum(p["w1"] ** 2, axis=0)),
          "b1": STD * np.linalg.norm(p["b1"]),
          "w2": STD * np.linalg.norm(p["w2"])}


def reference(name, data=DATA, variant=None):
  """Per-shard reference; returns (held params, clean params, SAM steps).

  ``variant='one_shard'`` uses device 0's gradient only (a missing pmean);
  ``variant='global'`` ascends along the averaged gradient on SAM steps.
  """
  w = vec(PARAMS)
  v, s = np.zeros_like(w), 0.0  # MSAM
  eps = np.zeros_like(w)  # RWP: ε_0 = 0
  mean = var = 0.0  # AE-SAM
  used = []
  for t in range(STEPS):
    if name == "msam":
      held = w - RHO * s * v
      g = [shard_grad(held, i, data) for i in range(N_DEV)]
      g_mean = g[0] if variant == "one_shard" else np.mean(g, axis=0)
      v = MOMENTUM * v + g_mean
      w = w - LR * v
      s = 1.0 / (np.linalg.norm(v) + 1e-12)
      continue
    if name.startswith("rwp"):
      g = [shard_grad(w + eps, i, data) for i in range(N_DEV)]
      g_mean = g[0] if variant == "one_shard" else np.mean(g, axis=0)
      w = w - LR * g_mean
      eps = rwp_noise(t + 1, rwp_stds(w),
                      "hash" if name == "rwp_hash" else "threefry")
      continue
    g = [shard_grad(w, i, data) for i in range(N_DEV)]
    g_mean = np.mean(g, axis=0)
    if name == "rst":
      coin = bool(jax.random.bernoulli(
          jax.random.fold_in(jax.random.PRNGKey(SEED), t), 0.5))
    else:
      sq = float(np.mean([gi @ gi for gi in g]))
      mean = 0.5 * mean + 0.5 * sq
      var = 0.5 * var + 0.5 * (sq - mean) ** 2
      coin = sq >= mean + 0.3 * np.sqrt(var)
    used.append(coin)
    if coin:
      d = [g_mean if variant == "global" else gi for gi in g]
      update = np.mean([shard_grad(w + RHO * unit(di), i, data)
                        for i, di in enumerate(d)], axis=0)
    else:
      update = g_mean
    w = w - LR * update
  if name == "msam":
    return w - RHO * s * v, w, used
  if name.startswith("rwp"):
    return w + eps, w, used
  return w, w, used


@functools.cache
def pmap_step(name):
  tx = TXS[name]()

  def step(params, state, x, y, m):
    grads = jax.grad(loss_fn)(params, x, y, m)
    updates, state = tx.update(
        grads, state, params,
        grad_fn=functools.partial(jax.grad(loss_fn), x=x, y=y, m=m))
    return optax.apply_updates(params, updates), state

  return tx, jax.pmap(step, axis_name="batch")


def _replicate(tree):
  sharding = NamedSharding(MESH, P("batch"))
  return jax.tree.map(
      lambda a: jax.device_put(np.stack([np.asarray(a)] * N_DEV), sharding),
      tree)


def run_pmap(name, data=DATA):
  tx, step = pmap_step(name)
  params, state = _replicate(PARAMS), _replicate(tx.init(PARAMS))
  data = tuple(jax.device_put(a, NamedSharding(MESH, P("batch")))
               for a in data)
  used = []
  for _ in range(STEPS):
    params, state = step(params, state, *data)
    used.append(bool(np.asarray(state.radius)[0] > 0))
  return params, state, used


def assert_replicated(tree):
  for leaf in jax.tree.leaves(tree):
    leaf = np.asarray(leaf)
    for i in range(1, N_DEV):
      np.testing.assert_array_equal(leaf[i], leaf[0])


@pytest.mark.parametrize("name", list(TXS))
def test_pmap_matches_per_shard_reference(name):
  params, state, used = run_pmap(name)
  assert_replicated((params, state))
  held = vec(jax.tree.map(lambda a: np.asarray(a)[0], params))
  clean = vec(sam_optax.eval_params(
      jax.tree.map(lambda a: np.asarray(a)[0], state),
      jax.tree.map(lambda a: np.asarray(a)[0], params)))
  ref_held, ref_clean, ref_used = reference(name)
  np.testing.assert_allclose(held, ref_held, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(clean, ref_clean, rtol=2e-5, atol=2e-6)
  if name in ("rst", "ae_sam"):
    assert used == ref_used
    assert 0 < sum(used) < STEPS  # Both branches ran.
    wrong = reference(name, variant="global")[0]
  else:
    wrong = reference(name, variant="one_shard")[0]
  assert np.max(np.abs(held - wrong)) > 1e-4


@pytest.mark.parametrize("name", list(TXS))
def test_zero_gradient_shard_stays_finite(name):
  params, state, _ = run_pmap(name, data=make_data(zero_shards=(3,)))
  assert_replicated((params, state))
  for leaf in jax.tree.leaves((params, state)):
    if np.issubdtype(np.asarray(leaf).dtype, np.floating):
      assert np.all(np.isfinite(leaf))
