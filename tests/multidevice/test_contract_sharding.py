"""The Optax contract's sharding part, for every method (8 fake devices).

optax's ``_src/sharding_test.py`` (``test_state_sharding_type_*``) ported to
each method of ``tests/contract.py``'s ``METHODS``, called through its own
convention: on an explicit 8-device mesh with the params sharded, ``init``
and one jitted train step give a state whose types (shape, dtype and
sharding) are the same, whose param-shaped leaves are sharded like the
params, compiled once, with no resharding of the params in the program
(no all-gather, all-to-all or collective-permute: only the all-reduces of
norms and sums over the sharded axis).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests import contract

RESHARDING = ("all-gather", "all-to-all", "collective-permute")


def sharded_problem(mesh):
  """sum((w - t)**2) on a (2, 8, 4) param sharded over its middle axis; the
  examples (ESAM) and outputs (SAF, MESA) sum over the sharded axes."""
  sharding = NamedSharding(mesh, P(None, "x", None))
  rng = np.random.default_rng(0)
  params = jax.device_put(
      rng.standard_normal((2, 8, 4)).astype(np.float32), sharding)
  target = jax.device_put(
      rng.standard_normal((2, 8, 4)).astype(np.float32), sharding)
  return contract.Problem(
      params, target,
      terms=lambda p: jnp.sum(jnp.square(p - target), axis=(1, 2)),
      outputs_fn=lambda p: jnp.sum(p, axis=(1, 2))[None])


@pytest.mark.parametrize("method_name", list(contract.METHODS))
def test_state_sharding_follows_the_params_in_one_jit(method_name):
  method = contract.METHODS[method_name]
  tx = method.build(contract.base_optimizer("adam"))
  mesh = jax.make_mesh((8,), ("x",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    problem = sharded_problem(mesh)
    params = problem.params

    @jax.jit
    def step(params, state):
      updates, state = method.step(tx, problem, params, state)
      return optax.apply_updates(params, updates), state

    state0 = tx.init(params)
    assert jax.tree.map(jax.typeof, jax.jit(tx.init)(params)) == \
        jax.tree.map(jax.typeof, state0)
    new_params, state1 = step(params, state0)
    new_params, state2 = step(new_params, state1)
    assert step._cache_size() == 1
    assert jax.typeof(new_params) == jax.typeof(params)
    assert jax.tree.map(jax.typeof, state1) == jax.tree.map(jax.typeof,
                                                            state0)
    for leaf in jax.tree.leaves(state2):
      if jnp.shape(leaf) == params.shape:
        assert leaf.sharding.is_equivalent_to(params.sharding, 3), (
            method_name, leaf.sharding)
    hlo = step.lower(params, state0).compile().as_text()
    for op in RESHARDING:
      assert op not in hlo, f"{method_name}: {op} in the compiled step"
