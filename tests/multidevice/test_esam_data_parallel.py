"""ESAM on 8 fake CPU devices: pmap and shard_map against a per-shard oracle.

Runs in its own process with the other tests of ``tests/multidevice``. Each
device perturbs with its own gradient g_i (the SWP draws are the same on all
devices: one replicated key), selects the γ·B_i examples of *its* shard whose
loss rose most, takes the gradient on them, and the gradients are averaged.
The oracle writes that out per shard (numpy, ``jax.grad`` of the tiny model
as the gradient); the global reading (ascent from the averaged gradient,
selection over the whole batch) must differ from it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

N_DEV, PER_DEV = 8, 4
LR, RHO, BETA, GAMMA, SEED, STEPS = 0.1, 0.2, 0.5, 0.5, 3, 3
MESH = Mesh(np.array(jax.devices()), ("batch",))


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w1": (0.7 * rng.standard_normal((3, 4))).astype(np.float32),
          "b1": (0.1 * rng.standard_normal(4)).astype(np.float32),
          "w2": (0.7 * rng.standard_normal(4)).astype(np.float32)}


def make_data(seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((N_DEV, PER_DEV, 3)).astype(np.float32)
  y = (np.sin(2.0 * x[..., 0]) * np.cos(np.arange(N_DEV))[:, None]
       + np.linspace(-1.5, 1.5, N_DEV)[:, None]).astype(np.float32)
  return x, y


def example_loss(params, batch):
  x, y = batch
  return (jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] - y) ** 2


PARAMS, DATA = init_params(), make_data()
NAMES = sorted(PARAMS)


def make_tx():
  return sam_optax.esam(optax.sgd(LR), rho=RHO, beta=BETA, gamma=GAMMA,
                        seed=SEED, axis_name="batch")


# ---------------------------------------------------------------- reference

_loss = jax.jit(example_loss)
_grad = jax.jit(jax.grad(lambda p, b: jnp.mean(example_loss(p, b))))


def f64(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def f32(tree):
  return {k: np.asarray(v, np.float32) for k, v in tree.items()}


def reference(variant=None):
  """Per-shard ESAM by hand; ``variant='global'`` is the global reading."""
  w, key = f64(PARAMS), jax.random.PRNGKey(SEED)
  x, y = DATA
  k = int(GAMMA * PER_DEV)
  for _ in range(STEPS):
    key, sub = jax.random.split(key)
    keep = np.asarray(jax.random.bernoulli(sub, BETA, (len(NAMES),)))
    g = [f64(_grad(f32(w), (x[i], y[i]))) for i in range(N_DEV)]
    if variant == "global":
      g = [{n: np.mean([gi[n] for gi in g], 0) for n in NAMES}] * N_DEV
    grads = []
    for i in range(N_DEV):
      norm = np.sqrt(sum(np.sum(g[i][n] ** 2) for n in NAMES))
      we = {n: w[n] + keep[j] * RHO / BETA * g[i][n] / norm
            for j, n in enumerate(NAMES)}
      rise = (np.asarray(_loss(f32(we), (x[i], y[i])), np.float64)
              - np.asarray(_loss(f32(w), (x[i], y[i])), np.float64))
      grads.append((we, rise))
    if variant == "global":  # Top k·N_DEV over the whole batch.
      we = grads[0][0]
      rise = np.concatenate([r for _, r in grads])
      idx = np.argsort(-rise, kind="stable")[:k * N_DEV]
      update = f64(_grad(f32(we), (x.reshape(-1, 3)[idx],
                                   y.reshape(-1)[idx])))
    else:
      per = []
      for i, (we, rise) in enumerate(grads):
        idx = np.argsort(-rise, kind="stable")[:k]
        per.append(f64(_grad(f32(we), (x[i][idx], y[i][idx]))))
      update = {n: np.mean([p[n] for p in per], 0) for n in NAMES}
    w = {n: w[n] - LR * update[n] for n in NAMES}
  return w


# ------------------------------------------------------------------ runners


def step_body(tx, mark):
  def step(params, state, x, y):
    local = sam_optax.mark_varying(params, "batch") if mark else params
    losses, vjp = jax.vjp(lambda p: example_loss(p, (x, y)), local)
    (grads,) = vjp(jnp.full_like(losses, 1.0 / losses.shape[0]))
    updates, state = tx.update(grads, state, params,
                               example_loss_fn=example_loss, batch=(x, y),
                               example_losses=losses)
    return optax.apply_updates(params, updates), state

  return step


def replicate(tree):
  sharding = NamedSharding(MESH, P("batch"))
  return jax.tree.map(
      lambda a: jax.device_put(np.stack([np.asarray(a)] * N_DEV), sharding),
      tree)


@functools.cache
def run_pmap():
  tx = make_tx()
  step = jax.pmap(step_body(tx, mark=False), axis_name="batch")
  params, state = replicate(PARAMS), replicate(tx.init(PARAMS))
  x, y = (jax.device_put(a, NamedSharding(MESH, P("batch"))) for a in DATA)
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return params, state


def run_shard_map():
  tx = make_tx()
  step = jax.jit(jax.shard_map(
      step_body(tx, mark=True), mesh=MESH,
      in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P(), P())))
  replicated = NamedSharding(MESH, P())
  params = jax.device_put(jax.tree.map(jnp.asarray, PARAMS), replicated)
  state = jax.device_put(tx.init(PARAMS), replicated)
  sharded = NamedSharding(MESH, P("batch"))
  x, y = (jax.device_put(a.reshape((N_DEV * PER_DEV,) + a.shape[2:]),
                         sharded) for a in DATA)
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return params, state


def vec(tree):
  return np.concatenate([np.asarray(tree[n], np.float64).ravel()
                         for n in NAMES])


def test_pmap_matches_per_shard_reference_not_global():
  params, state = run_pmap()
  for leaf in jax.tree.leaves((params, state)):
    leaf = np.asarray(leaf)
    for i in range(1, N_DEV):
      np.testing.assert_array_equal(leaf[i], leaf[0])
  got = vec(jax.tree.map(lambda a: np.asarray(a)[0], params))
  np.testing.assert_allclose(got, vec(reference()), rtol=2e-5, atol=2e-6)
  assert np.max(np.abs(got - vec(reference("global")))) > 1e-4
  assert np.isfinite(np.asarray(state.sharpness)).all()


def test_shard_map_matches_pmap():
  params, _ = run_shard_map()
  want, _ = run_pmap()
  np.testing.assert_allclose(
      vec(params), vec(jax.tree.map(lambda a: np.asarray(a)[0], want)),
      rtol=2e-5, atol=2e-6)
