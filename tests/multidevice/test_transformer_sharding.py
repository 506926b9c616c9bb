"""SAM, preconditioned SAM and Functional-SAM on a sharded transformer.

A tiny decoder-only transformer (``tests/transformer.py``: float32 master
params, bf16 compute) is trained for a few steps under ``jax.jit`` on 8
fake CPU devices, with params and optimizer state sharded on a
``('fsdp', 'tp')`` = 4 x 2 mesh (FSDP over one axis, tensor parallel over the
other; ``NamedSharding``s, Auto axes) and gradient accumulation
(``sam(optax.MultiSteps(adamw, 2))``: SAM per micro-batch, the SAM gradients
accumulated). Each method must give the unsharded run's params and
optimizer state to 5e-3 absolute in bf16 compute (params of size ~1 that two
lr 3e-2 AdamW steps moved by > 0.05; bf16 activations round differently when
XLA splits the products, and Adam divides by small second moments), and to
2e-5 with float32 compute (Functional-SAM with the preconditioned ascent,
the most involved step); keep the params' and the state's shardings (the
state's built from the params' with ``optax.tree_map_params``) and compile
once. Measured: max |sharded - unsharded| 1.6e-3 to 2.1e-3 in bf16, 2.4e-7
in float32 (the one-layer model; ``pytest -s`` prints them).
"""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from tests import transformer as T

MICRO_BATCH = 8
MICRO_STEPS = 4  # Two outer steps of MultiSteps(k=2).
TOL = {"bfloat16": 5e-3, "float32": 2e-5}


def base():
  # eps = 1e-3: Adam's first steps move every entry by ±lr whatever the
  # gradient's size, so bf16 noise on a near-zero gradient would flip a
  # whole step; a larger eps keeps the step continuous in the gradient.
  return optax.MultiSteps(optax.adamw(3e-2, eps=1e-3, weight_decay=0.1),
                          every_k_schedule=2)


METHODS = {
    "sam": lambda: sam_optax.sam(base(), rho=0.05),
    "preconditioned_sam": lambda: sam_optax.preconditioned_sam(
        base(), rho=0.05, precond_eps=1e-3),
    "functional_sam": lambda: sam_optax.functional_sam(
        base(), rho=0.05, preconditioned=True, precond_eps=1e-3),
}


def make_step(name, tx, config):
  def step(params, state, batch):
    if name == "functional_sam":
      outputs_fn = lambda p: T.logits_fn(config, p, batch["tokens"])  # noqa: E731
      loss_fn = lambda z: T.loss_from_logits(z, batch["targets"])  # noqa: E731
      loss, grads, dlogits = sam_optax.functional_value_and_grad(
          outputs_fn, loss_fn, params)
      updates, state = tx.update(grads, state, params,
                                 outputs_fn=outputs_fn, output_grads=dlogits)
    else:
      obj_fn = lambda p: T.loss_fn(config, p, batch)  # noqa: E731
      loss, grads = jax.value_and_grad(obj_fn)(params)
      updates, state = tx.update(grads, state, params, obj_fn=obj_fn)
    return optax.apply_updates(params, updates), state, loss

  return step


def mesh():
  return jax.make_mesh((4, 2), ("fsdp", "tp"),
                       axis_types=(AxisType.Auto, AxisType.Auto))


def state_shardings(tx, params, param_shardings, m):
  """The state's shardings: the params' for param-shaped leaves
  (``optax.tree_map_params``), replicated for the rest."""
  shapes = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(m, P())
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, shapes, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def train(name, config, sharded):
  tx = METHODS[name]()
  params = T.init_params(config)
  batches = T.make_batches(config, MICRO_STEPS, MICRO_BATCH)
  step = make_step(name, tx, config)
  if not sharded:
    jitted = jax.jit(step)
    state = tx.init(params)
    for batch in batches:
      params, state, _ = jitted(params, state, batch)
    return params, state, None
  m = mesh()
  param_sh = jax.tree.map(lambda s: NamedSharding(m, s),
                          T.param_specs(config),
                          is_leaf=lambda x: isinstance(x, P))
  state_sh = state_shardings(tx, params, param_sh, m)
  batch_sh = NamedSharding(m, P("fsdp", None))
  params = jax.device_put(params, param_sh)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  chex.clear_trace_counter()
  jitted = jax.jit(chex.assert_max_traces(step, n=1),
                   out_shardings=(param_sh, state_sh, None),
                   donate_argnums=(0, 1))
  for batch in batches:
    params, state, _ = jitted(params, state,
                              jax.device_put(batch, batch_sh))
  return params, state, (param_sh, state_sh)


@pytest.mark.parametrize("name,dtype", [
    *[(name, "bfloat16") for name in sorted(METHODS)],
    ("functional_sam", "float32")])
def test_sharded_transformer_matches_unsharded(name, dtype):
  config = T.Config(compute_dtype=dtype, layers=1)
  tol = TOL[dtype]
  expected, expected_state, _ = train(name, config, sharded=False)
  got, state, (param_sh, state_sh) = train(name, config, sharded=True)
  start = T.init_params(config)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(expected), jax.tree.leaves(start)))
  assert moved > 10 * TOL["bfloat16"]  # The steps moved the params.
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(expected)))
  print(f"{name} {dtype}: max |sharded - unsharded| = {diff:.2e}, "
        f"moved {moved:.3f}")
  chex.assert_trees_all_close(jax.device_get(got), expected, atol=tol,
                              rtol=0)
  chex.assert_trees_all_close(jax.device_get(state.base_state),
                              expected_state.base_state, atol=tol, rtol=0)
  assert int(state.base_state.gradient_step) == MICRO_STEPS // 2
  # The params and the Adam moments keep the params' shardings.
  for leaf, sharding in zip(jax.tree.leaves(got), jax.tree.leaves(param_sh)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  nu = optax.tree.get(state, "nu")
  for leaf, sharding in zip(jax.tree.leaves(nu), jax.tree.leaves(param_sh)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  assert jax.tree.structure(state) == jax.tree.structure(
      state_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
  wq = got["blocks"][0]["wq"]
  assert len(wq.addressable_shards) == 8
  assert wq.addressable_shards[0].data.shape == (4, 8)  # 16/4 x 16/2
