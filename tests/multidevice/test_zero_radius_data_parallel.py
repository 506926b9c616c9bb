"""Late-phase SAM on 8 fake CPU devices: pmap and shard_map.

ρ comes from the replicated step count, so every device takes the same
branch of the zero-radius ``cond``: before the switch no device calls
``grad_fn`` and the step is the base step on the device-averaged gradient;
from the switch on it is per-device SAM, as with a constant ρ.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
)

LR, RHO, START = 0.1, 0.1, 2


class Counter:
  def __init__(self):
    self.n = 0

  def bump(self):
    self.n += 1


def body(tx, counter, mark):
  def grad_fn(p, x, y, m):
    jax.debug.callback(counter.bump)
    return jax.grad(loss_fn)(p, x, y, m)

  def step(params, state, x, y, m):
    local = sam_optax.mark_varying(params, "batch") if mark else params
    grads = jax.grad(loss_fn)(local, x, y, m)
    updates, state = tx.update(
        grads, state, params,
        grad_fn=functools.partial(grad_fn, x=x, y=y, m=m))
    return optax.apply_updates(params, updates), state

  return step


def reference(steps):
  """Base steps on the averaged gradient, then SAM with per-device ε."""
  w = jax.tree.map(jnp.asarray, PARAMS)
  for t in range(steps):
    gs = [jax.grad(loss_fn)(w, *(a[i] for a in DATA)) for i in range(N_DEV)]
    if t >= START:
      gs = [jax.grad(loss_fn)(
          jax.tree.map(lambda p, gi: p + RHO * gi / optax.tree.norm(g), w, g),
          *(a[i] for a in DATA)) for i, g in enumerate(gs)]
    mean = jax.tree.map(lambda *x: sum(x) / N_DEV, *gs)
    w = jax.tree.map(lambda p, g: p - LR * g, w, mean)
  return w


def late_sam():
  return sam_optax.sam(optax.sgd(LR), rho=sam_optax.late_phase(RHO, START),
                       axis_name="batch")


def run_and_check(step, params, state, data, counter):
  """START + 2 steps; grad_fn calls per step as late-phase SAM makes them;
  the final params (per device or replicated)."""
  calls = []
  for _ in range(START + 2):
    params, state = step(params, state, *data)
    jax.effects_barrier()
    calls.append(counter.n)
  assert calls[:START] == [0] * START  # No device called grad_fn.
  # From the switch on, all 8 devices call it once per step.
  assert calls[START:] == [N_DEV * (i + 1) for i in range(len(calls) - START)]
  return params, reference(START + 2)


def test_pmap_late_phase():
  tx, counter = late_sam(), Counter()
  step = jax.pmap(body(tx, counter, mark=False), axis_name="batch")
  sharding = NamedSharding(MESH, P("batch"))

  def rep(tree):
    return jax.tree.map(lambda a: jax.device_put(
        np.stack([np.asarray(a)] * N_DEV), sharding), tree)

  params, state = rep(PARAMS), rep(tx.init(PARAMS))
  data = tuple(jax.device_put(a, sharding) for a in DATA)
  params, want = run_and_check(step, params, state, data, counter)
  for k in want:
    for d in range(N_DEV):
      np.testing.assert_allclose(params[k][d], want[k], rtol=1e-5,
                                 atol=1e-6)


def test_shard_map_late_phase():
  tx, counter = late_sam(), Counter()
  step = jax.jit(jax.shard_map(
      body(tx, counter, mark=True), mesh=MESH,
      in_specs=(P(), P(), P("batch"), P("batch"), P("batch")),
      out_specs=(P(), P())))
  replicated = NamedSharding(MESH, P())
  params = jax.device_put(jax.tree.map(jnp.asarray, PARAMS), replicated)
  state = jax.device_put(tx.init(PARAMS), replicated)
  batch = NamedSharding(MESH, P("batch"))
  data = tuple(jax.device_put(a.reshape((N_DEV * PER_DEV,) + a.shape[2:]),
                              batch) for a in DATA)
  params, want = run_and_check(step, params, state, data, counter)
  for k in want:
    np.testing.assert_allclose(params[k], want[k], rtol=1e-5, atol=1e-6)
