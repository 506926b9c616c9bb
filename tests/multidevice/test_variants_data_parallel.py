"""GSAM, LookSAM and Friendly-SAM on 8 fake CPU devices: pmap and shard_map.

Runs in its own process with the other tests of ``tests/multidevice`` (see
its ``conftest.py``). Each variant is compared with a hand-written per-shard
reference (numpy float64 arithmetic, ``jax.grad`` of a tiny tanh model per
shard): every device ascends with its own gradient ``g_i``, forms the
variant's gradient from its local quantities and the replicated state, the
results are averaged, and cached directions are built from device averages.
The state must come out identical on every device.
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
    PER_DEV,
    loss_fn,
    make_data,
    shard_grad,
    unit,
    unvec,
    vec,
)

LR = 0.1
RHO = 0.1
ALPHA = 0.5
K = 2
MOMENTUM = 0.9
SIGMA, DECAY = 1.0, 0.6


TXS = {
    "gsam": lambda: sam_optax.gsam(optax.sgd(LR), rho=RHO, alpha=ALPHA,
                                   axis_name="batch"),
    "looksam": lambda: sam_optax.looksam(
        optax.sgd(LR, momentum=MOMENTUM), rho=RHO, every_k=K, alpha=ALPHA,
        axis_name="batch"),
    "friendly_sam": lambda: sam_optax.friendly_sam(
        optax.sgd(LR), rho=RHO, sigma=SIGMA, decay=DECAY, axis_name="batch"),
}
STEPS = {"gsam": 2, "looksam": 4, "friendly_sam": 3}

# ---------------------------------------------------------------- reference


def reference(name, data=DATA, steps=None, variant=None):
  """The variant on 8 shards, written out by hand.

  ``variant='global'`` is what the per-shard semantics must differ from:
  GSAM decomposes the *averaged* gradients, LookSAM's reuse steps use the
  averaged gradient and its norm, Friendly-SAM ascends along the averaged
  gradient (all shards alike).
  """
  steps = STEPS[name] if steps is None else steps
  w = vec(PARAMS)
  trace, g_v, ema = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
  for t in range(steps):
    g = [shard_grad(w, i, data) for i in range(N_DEV)]
    g_mean = np.mean(g, axis=0)
    if name == "friendly_sam":
      d = [(g_mean if variant == "global" else gi) - SIGMA * ema for gi in g]
      ema = g_mean if t == 0 else DECAY * ema + (1 - DECAY) * g_mean
    else:
      d = g
    if name != "looksam" or t % K == 0:
      gs = [shard_grad(w + RHO * unit(di), i, data)
            for i, di in enumerate(d)]
    if name == "gsam":
      if variant == "global":
        gs_mean = np.mean(gs, axis=0)
        g_perp = g_mean - (g_mean @ unit(gs_mean)) * unit(gs_mean)
        update = gs_mean - ALPHA * g_perp
      else:
        update = np.mean([gsi - ALPHA * (gi - (gi @ unit(gsi)) * unit(gsi))
                          for gi, gsi in zip(g, gs)], axis=0)
    elif name == "looksam":
      if t % K == 0:
        update = np.mean(gs, axis=0)
        g_v = update - (update @ unit(g_mean)) * unit(g_mean)
      elif variant == "global":
        update = g_mean + ALPHA * np.linalg.norm(g_mean) * unit(g_v)
      else:
        update = np.mean([gi + ALPHA * np.linalg.norm(gi) * unit(g_v)
                          for gi in g], axis=0)
      trace = update + MOMENTUM * trace
      update = trace
    else:
      update = np.mean(gs, axis=0)
    w = w - LR * update
  return unvec(w), {"orthogonal_grad": g_v, "grad_ema": ema}


# ------------------------------------------------------------------ runners


def _step_body(tx, mark):
  def step(params, state, x, y, m):
    local = sam_optax.mark_varying(params, "batch") if mark else params
    grads = jax.grad(loss_fn)(local, x, y, m)
    updates, state = tx.update(
        grads, state, params,
        grad_fn=functools.partial(jax.grad(loss_fn), x=x, y=y, m=m))
    return optax.apply_updates(params, updates), state

  return step


@functools.cache
def pmap_step(name):
  tx = TXS[name]()
  return tx, jax.pmap(_step_body(tx, mark=False), axis_name="batch")


def _replicate(tree):
  # Laid out as pmap returns its outputs: no second compilation.
  sharding = NamedSharding(MESH, P("batch"))
  return jax.tree.map(
      lambda a: jax.device_put(np.stack([np.asarray(a)] * N_DEV), sharding),
      tree)


def run_pmap(name, data=DATA):
  tx, step = pmap_step(name)
  params, state = _replicate(PARAMS), _replicate(tx.init(PARAMS))
  data = tuple(jax.device_put(a, NamedSharding(MESH, P("batch")))
               for a in data)
  for _ in range(STEPS[name]):
    params, state = step(params, state, *data)
  return params, state


@functools.cache
def shard_map_step(name):
  tx = TXS[name]()
  step = jax.shard_map(
      _step_body(tx, mark=True), mesh=MESH,
      in_specs=(P(), P(), P("batch"), P("batch"), P("batch")),
      out_specs=(P(), P()))  # check_vma=True: the state must be invariant.
  return tx, jax.jit(step)


def run_shard_map(name):
  tx, step = shard_map_step(name)
  replicated = NamedSharding(MESH, P())
  params = jax.device_put(jax.tree.map(jnp.asarray, PARAMS), replicated)
  state = jax.device_put(tx.init(PARAMS), replicated)
  batch = NamedSharding(MESH, P("batch"))
  data = (jax.device_put(a.reshape((N_DEV * PER_DEV,) + a.shape[2:]), batch)
          for a in DATA)
  data = tuple(data)
  for _ in range(STEPS[name]):
    params, state = step(params, state, *data)
  return params, state


def assert_replicated(tree):
  for leaf in jax.tree.leaves(tree):
    leaf = np.asarray(leaf)
    for i in range(1, N_DEV):
      np.testing.assert_array_equal(leaf[i], leaf[0])


def first(tree):
  return jax.tree.map(lambda a: np.asarray(a)[0], tree)


def assert_close(actual, expected, atol=1e-6, rtol=1e-5):
  for k in expected:
    np.testing.assert_allclose(np.asarray(actual[k]), expected[k], atol=atol,
                               rtol=rtol, err_msg=k)


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k])))
             for k in b)


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(TXS))
def test_pmap_matches_per_shard_reference_with_replicated_state(name):
  params, state = run_pmap(name)
  assert_replicated((params, state))
  expected, cache = reference(name)
  assert_close(first(params), expected)
  s = first(state)
  assert int(s.step_count) == STEPS[name]
  if name == "looksam":  # g_v from the device-averaged g and g_s.
    np.testing.assert_allclose(vec(s.method_state.orthogonal_grad),
                               cache["orthogonal_grad"], rtol=1e-4,
                               atol=1e-6)
    assert float(s.radius) == 0.0  # Last step reused g_v.
  if name == "friendly_sam":  # The EMA of the device-averaged gradients.
    np.testing.assert_allclose(vec(s.method_state.grad_ema), cache["grad_ema"],
                               rtol=1e-5, atol=1e-6)
  # The problem tells the per-shard semantics from the global ones.
  glob, _ = reference(name, variant="global")
  assert max_diff(first(params), glob) > 1e-4


@pytest.mark.parametrize("name", ["gsam", "looksam"])
def test_shard_map_matches_pmap_and_reference(name):
  # check_vma=True with out_specs=P() for the state only compiles if every
  # state leaf is invariant over the axis: the state is replicated.
  params, state = run_shard_map(name)
  expected, _ = reference(name)
  assert_close(params, expected)
  _, pmap_state = run_pmap(name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), b, rtol=1e-5, atol=1e-6), state, first(pmap_state))


@pytest.mark.parametrize("name", list(TXS))
def test_zero_gradient_on_one_shard_stays_finite(name):
  data = make_data(zero_shards=(5,))
  params, state = run_pmap(name, data=data)  # Same compiled step as above.
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves((params,
                                                               state)))
  assert_replicated((params, state))
  expected, _ = reference(name, data=data)
  assert_close(first(params), expected)
