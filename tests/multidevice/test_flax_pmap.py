"""Data-parallel SAM with a linen model on 8 fake CPU devices.

``SAMTrainState.train_step(..., axis_name='batch')`` under ``jax.pmap`` and
``jax.shard_map``, against a hand-written per-shard reference: for each shard
``i`` (its own batch and dropout key), the clean pass gives ``g_i``, the loss
and the new BatchNorm statistics; ``ε_i = ρ g_i / ‖g_i‖``; the perturbed
pass at ``w + ε_i`` (old statistics, same key) gives ``gs_i``. Then
``w ← w − lr · mean_i gs_i`` and the statistics are ``mean_i`` of the clean
ones. Runs in its own process (see ``conftest.py``).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
import sam_optax.flax as sam_flax

N_DEV = 8
PER_DEV = 4
LR = 0.1
RHO = 0.1
ATOL = 1e-6
RTOL = 1e-5
MESH = Mesh(np.array(jax.devices()), ("batch",))


class Net(nn.Module):
  """Dense → BatchNorm → ReLU → Dropout → Dense: 29 params."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(1)(x)[:, 0]


NET = Net()


def loss_fn(params, batch_stats, x, y, key):
  pred, updates = NET.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True,
      mutable=["batch_stats"], rngs={"dropout": key})
  return jnp.mean((pred - y) ** 2), updates["batch_stats"]


def make_data(seed=0):
  """Shards ``(N_DEV, PER_DEV, ...)`` with different targets per shard."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((N_DEV, PER_DEV, 3)).astype(np.float32)
  offsets = np.linspace(-1.5, 1.5, N_DEV)[:, None]
  y = (np.sin(2.0 * x[..., 0]) + offsets).astype(np.float32)
  keys = jax.random.split(jax.random.key(seed), N_DEV)
  return x, y, keys


def init_state():
  x = jnp.zeros((PER_DEV, 3))
  variables = jax.jit(NET.init, static_argnames="train")(
      jax.random.key(1), x, train=False)
  return sam_flax.SAMTrainState.create(
      apply_fn=NET.apply, params=variables["params"],
      tx=sam_optax.sam(optax.sgd(LR), rho=RHO, axis_name="batch"),
      batch_stats=variables["batch_stats"])


@functools.partial(jax.jit, static_argnames="global_ascent")
def reference_step(params, batch_stats, x, y, keys, global_ascent=False):
  """One hand-written data-parallel SAM step, shard by shard.

  With ``global_ascent``, every shard ascends along the mean gradient
  instead of its own (m = the global batch): what the test must tell apart.
  """

  def clean(x, y, key):
    return jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y, key)

  def perturbed_grad(g, x, y, key):
    norm = jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, a: w + RHO * a / norm, params, g)
    return jax.grad(loss_fn, has_aux=True)(
        perturbed, batch_stats, x, y, key)[0]

  def mean(t):
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), t)

  (losses, stats), g = jax.vmap(clean)(x, y, keys)
  if global_ascent:
    g = jax.tree.map(lambda a: jnp.broadcast_to(a.mean(0), a.shape), g)
  g_sam = jax.vmap(perturbed_grad)(g, x, y, keys)
  new_params = jax.tree.map(lambda w, g: w - LR * g, params, mean(g_sam))
  return new_params, mean(stats), jnp.mean(losses), stats


@functools.cache
def pmap_step():
  return jax.pmap(
      lambda state, x, y, key: state.train_step(
          loss_fn, x, y, key, axis_name="batch"),
      axis_name="batch")


@functools.cache
def shard_map_step():
  def step(state, x, y, keys):
    return state.train_step(loss_fn, x, y, keys[0], axis_name="batch")

  return jax.jit(jax.shard_map(
      step, mesh=MESH, in_specs=(P(), P("batch"), P("batch"), P("batch")),
      out_specs=(P(), P())))


def run(mapping, state, data):
  x, y, keys = data
  if mapping == "pmap":
    def replicate(a):
      return jax.device_put(np.stack([np.asarray(a)] * N_DEV),
                            NamedSharding(MESH, P("batch")))

    state = jax.tree.map(replicate, state)
    state, loss = pmap_step()(state, x, y, keys)
    for leaf in jax.tree.leaves((state, loss)):  # Replicated outputs.
      for i in range(1, N_DEV):
        np.testing.assert_array_equal(leaf[i], leaf[0])
    return jax.tree.map(lambda a: a[0], (state, loss))
  batch = NamedSharding(MESH, P("batch"))
  x, y = (jax.device_put(a.reshape((N_DEV * PER_DEV,) + a.shape[2:]), batch)
          for a in (x, y))
  state = jax.device_put(state, NamedSharding(MESH, P()))
  return shard_map_step()(state, x, y, jax.device_put(keys, batch))


def assert_close(actual, expected):
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(
          np.asarray(a), np.asarray(e), atol=ATOL, rtol=RTOL),
      actual, expected)


@pytest.mark.parametrize("mapping", ["pmap", "shard_map"])
def test_linen_train_step_matches_per_shard_reference(mapping):
  state, data = init_state(), make_data()
  params, stats, loss, per_shard_stats = reference_step(
      state.params, state.batch_stats, *data)
  new, new_loss = run(mapping, state, data)
  assert_close(new.params, params)
  # The clean passes' statistics, averaged over the devices.
  assert_close(new.batch_stats, stats)
  np.testing.assert_allclose(new_loss, loss, rtol=RTOL)
  assert int(new.step) == 1
  # The shards really differ: averaging is not a no-op.
  means = per_shard_stats["BatchNorm_0"]["mean"]
  assert float(jnp.max(jnp.abs(means - means[0]))) > 1e-3
  # Per-device ascent is not global ascent, and the test can tell.
  global_params = reference_step(state.params, state.batch_stats, *data,
                                 global_ascent=True)[0]
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(new.params), jax.tree.leaves(global_params)))
  assert diff > 1e-4
