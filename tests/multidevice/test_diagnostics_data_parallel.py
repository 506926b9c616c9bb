"""Hessian diagnostics on 8 fake CPU devices: ``axis_name`` averaging.

Runs in its own process with the other tests of ``tests/multidevice`` (see
its ``conftest.py``). Every device holds its own batch; with ``axis_name``
the Hessian-vector products are averaged over the devices, so the spectrum
is that of the Hessian of the mean loss over all the data, computed here
densely (``jax.hessian`` of the full-batch loss, ``numpy.linalg.eigh``).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sam_optax import diagnostics

N_DEV = 8
PER_DEV = 3
MESH = Mesh(np.array(jax.devices()), ("batch",))


def make_problem(seed=0):
  """A tanh network (2 leaves, 16 params) and shards with different targets.

  Per device, 3 examples give a Hessian of rank at most 6: only the average
  over devices has the full-batch spectrum.
  """
  rng = np.random.default_rng(seed)
  params = {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=4), jnp.float32)}
  x = rng.normal(size=(N_DEV, PER_DEV, 3)).astype(np.float32)
  y = (np.sin(2 * x[..., 0]) + np.arange(N_DEV)[:, None] / 4).astype(
      np.float32)
  return params, jnp.asarray(x), jnp.asarray(y)


def loss_fn(params, x, y):
  return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def dense_eigenvalues(params, x, y):
  """Descending eigenvalues of the Hessian of the loss on all the data."""
  flat, unravel = ravel_pytree(params)
  full = lambda v: loss_fn(unravel(v), x.reshape(-1, 3), y.reshape(-1))  # noqa: E731
  h = np.asarray(jax.hessian(full)(flat), np.float64)
  return np.linalg.eigvalsh((h + h.T) / 2)[::-1]


PARAMS, X, Y = make_problem()
LAM = dense_eigenvalues(PARAMS, X, Y)
SCALE = np.abs(LAM).max()
KEY = jax.random.key(0)


def replicate(tree):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV,) + a.shape), tree)


def test_pmap_top_eigenvalues_are_those_of_the_mean_loss():
  def spectrum(params, x, y, axis_name):
    local = lambda p: loss_fn(p, x, y)  # noqa: E731
    return diagnostics.top_hessian_eigenvalues(
        local, params, k=16, key=KEY, axis_name=axis_name).eigenvalues

  averaged = jax.pmap(lambda p, x, y: spectrum(p, x, y, "batch"),
                      axis_name="batch")(replicate(PARAMS), X, Y)
  for row in np.asarray(averaged):  # Identical on every device.
    np.testing.assert_allclose(row, LAM, atol=2e-5 * SCALE)
  # Without axis_name, each device sees only its own 3 examples.
  local = jax.pmap(lambda p, x, y: spectrum(p, x, y, None),
                   axis_name="batch")(replicate(PARAMS), X, Y)
  assert np.abs(np.asarray(local) - LAM).max() > 0.1 * SCALE


def test_pmap_power_iteration_and_density_average_the_hessian():
  def both(params, x, y):
    local = lambda p: loss_fn(p, x, y)  # noqa: E731
    top = diagnostics.top_hessian_eigenvalue(
        local, params, num_iters=300, key=KEY, axis_name="batch")
    density = diagnostics.hessian_spectral_density(
        local, params, key=KEY, num_probes=2, num_iters=16, num_points=64,
        axis_name="batch")
    return top.eigenvalue, density.nodes

  top, nodes = jax.pmap(both, axis_name="batch")(replicate(PARAMS), X, Y)
  dominant = LAM[np.argmax(np.abs(LAM))]
  np.testing.assert_allclose(top, np.full(N_DEV, dominant), rtol=1e-3)
  np.testing.assert_allclose(
      nodes, np.broadcast_to(np.sort(LAM), nodes.shape), atol=2e-5 * SCALE)


def test_shard_map_with_replicated_params_averages_the_hessian():
  # check_vma=True: the params are invariant; the diagnostics mark them
  # varying so each shard differentiates its own loss, then average.
  def spectrum(params, x, y):
    local = lambda p: loss_fn(p, x[0], y[0])  # noqa: E731
    return diagnostics.top_hessian_eigenvalues(
        local, params, k=16, key=KEY, axis_name="batch").eigenvalues

  f = jax.jit(jax.shard_map(spectrum, mesh=MESH,
                            in_specs=(P(), P("batch"), P("batch")),
                            out_specs=P()))
  np.testing.assert_allclose(f(PARAMS, X, Y), LAM, atol=2e-5 * SCALE)
