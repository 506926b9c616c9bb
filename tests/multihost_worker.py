"""One process of the multi-host SAM test (``tests/test_multihost.py``).

Run as ``python tests/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES
OUT_DIR``: joins a ``jax.distributed`` cluster of CPU processes on localhost,
each with ``LOCAL_DEVICES`` CPU devices, runs a few data-parallel SAM steps
over a global mesh spanning every process, and writes what it ends with to
``OUT_DIR/process<i>.npz``.

Importing this module has no side effects: the test imports the problem
(``init_params``, ``global_batch``, ``loss_fn``) from here to compute its
single-device reference.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

LOCAL_DEVICES = 4
PER_DEVICE = 4
STEPS = 3
LR = 0.1
MOMENTUM = 0.9
RHO = 0.1

# name -> (how the step is mapped, sync_ascent).
CONFIGS = {
    "shard_map": ("shard_map", False),
    "shard_map_sync": ("shard_map", True),
    "pmap": ("pmap", False),
}


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "w1": (0.7 * rng.standard_normal((3, 4))).astype(np.float32),
      "b1": (0.1 * rng.standard_normal(4)).astype(np.float32),
      "w2": (0.7 * rng.standard_normal(4)).astype(np.float32),
      "b2": np.full(1, 0.2, np.float32),
  }


def global_batch(num_devices, seed=1):
  """The global batch ``(x, y)``, ``PER_DEVICE`` rows per device.

  Every process builds the whole batch deterministically and keeps its own
  rows. The targets are offset block by block so that the per-device
  gradients, hence the per-device ascent directions, clearly differ.
  """
  rng = np.random.default_rng(seed)
  n = num_devices * PER_DEVICE
  x = rng.standard_normal((n, 3)).astype(np.float32)
  offsets = np.repeat(np.linspace(-1.5, 1.5, num_devices), PER_DEVICE)
  shard = np.repeat(np.arange(num_devices), PER_DEVICE)
  y = (np.sin(2.0 * x[:, 0]) * np.cos(shard) + offsets
       + 0.3 * rng.standard_normal(n)).astype(np.float32)
  return x, y


def loss_fn(params, x, y):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  h = jnp.tanh(x @ params["w1"] + params["b1"])
  pred = h @ params["w2"] + params["b2"]
  return jnp.mean((pred - y) ** 2)


def _run(port, process_id, num_processes, out_dir):
  import jax  # pylint: disable=import-outside-toplevel

  # All of this must happen before JAX initialises its backends.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.distributed.initialize(
      coordinator_address=f"localhost:{port}", num_processes=num_processes,
      process_id=process_id, initialization_timeout=60,
      # A crashed peer then fails this process in seconds, not minutes.
      heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)

  # pylint: disable=import-outside-toplevel
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import sam_optax

  n_dev = jax.device_count()
  assert n_dev == num_processes * LOCAL_DEVICES, jax.devices()
  assert jax.local_device_count() == LOCAL_DEVICES
  mesh = jax.make_mesh((n_dev,), ("data",))  # Spans every process.
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  # Per-process data: each process hands over only its own rows.
  x_all, y_all = global_batch(n_dev)
  rows = slice(process_id * LOCAL_DEVICES * PER_DEVICE,
               (process_id + 1) * LOCAL_DEVICES * PER_DEVICE)
  x = jax.make_array_from_process_local_data(batch_sharding, x_all[rows])
  y = jax.make_array_from_process_local_data(batch_sharding, y_all[rows])
  assert x.shape == x_all.shape, x.shape
  for shard in x.addressable_shards:  # This process's rows, where expected.
    np.testing.assert_array_equal(np.asarray(shard.data), x_all[shard.index])

  def body(tx, params, state, x, y):
    local = sam_optax.mark_varying(params, "data")  # No-op under pmap.
    grads = jax.grad(loss_fn)(local, x, y)  # This device's gradient.
    grad_fn = functools.partial(jax.grad(loss_fn), x=x, y=y)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  results = {}
  for name, (how, sync) in CONFIGS.items():
    tx = sam_optax.sam(optax.sgd(LR, momentum=MOMENTUM), rho=RHO,
                       axis_name="data", sync_ascent=sync)
    if how == "shard_map":
      step = jax.jit(jax.shard_map(
          functools.partial(body, tx), mesh=mesh,
          in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())))
      params = jax.device_put(init_params(), replicated)
      with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(params)
      inputs = (x, y)
    else:  # pmap: process-local inputs with a leading local-device axis.
      step = jax.pmap(functools.partial(body, tx), axis_name="data")
      params = jax.tree.map(lambda a: np.stack([a] * LOCAL_DEVICES),
                            init_params())
      state = jax.tree.map(lambda a: np.stack([a] * LOCAL_DEVICES),
                           tx.init(init_params()))
      inputs = tuple(a[rows].reshape(LOCAL_DEVICES, PER_DEVICE, *a.shape[1:])
                     for a in (x_all, y_all))
    for _ in range(STEPS):
      params, state = step(params, state, *inputs)
    # One copy per local device: the test checks they all agree.
    shapes = dict(jax.tree.map(np.shape, init_params()), grad_norm=())
    for key, leaf in dict(params, grad_norm=state.ascent_norm).items():
      results[f"{name}/{key}"] = np.stack(
          [np.asarray(s.data).reshape(shapes[key])
           for s in leaf.addressable_shards])

  np.savez(f"{out_dir}/process{process_id}.npz", **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _port, _pid, _nproc, _out = sys.argv[1:]
  _run(int(_port), int(_pid), int(_nproc), _out)
