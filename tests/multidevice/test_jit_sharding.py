"""SAM under ``jax.jit`` with a ``Mesh`` and ``NamedSharding``s (8 devices).

The modern single-process path: params and optimizer state live on
``NamedSharding``s, the batch is sharded over 'data', and SAM's per-shard
ascent comes from a ``jax.shard_map`` over 'data' inside the jitted step.
With a 2-D ('data', 'model') mesh the hidden units are sharded over 'model';
the shard_map is manual over 'data' only (``axis_names={'data'}``), so XLA
keeps the model-sharded leaves whole as far as SAM's global norm goes (it
inserts the sum of squared norms over 'model' itself).

The training tests compare with a per-shard reference written in plain JAX
on one device (``jax.vmap`` over the data shards) and check that params and
state keep their shardings and that the step compiles once. The collective
counts come from the optimised HLO: SAM all-reduces one gradient tree, like
the base optimizer's data-parallel step, plus two logged scalars
(``benchmarks/collectives.py`` prints the full table).
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

N_DEV = 8
ROWS = 32  # Global batch.
LR, MOMENTUM, RHO, ASAM_RHO, ETA = 0.1, 0.9, 0.1, 0.5, 0.01
STEPS = 3
MODEL_SPECS = {"w1": P(None, "model"), "b1": P("model"),
               "w2": P("model", None), "b2": P(None)}

# ------------------------------------------------------------------ problem


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "w1": (0.7 * rng.standard_normal((3, 8))).astype(np.float32),
      "b1": (0.1 * rng.standard_normal(8)).astype(np.float32),
      "w2": (0.5 * rng.standard_normal((8, 2))).astype(np.float32),
      "b2": np.array([0.2, -0.1], np.float32),
  }


def make_batch(seed=1):
  """Targets offset block by block: per-shard gradients clearly differ."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((ROWS, 3)).astype(np.float32)
  block = np.repeat(np.arange(8), ROWS // 8)
  y = (np.sin(2.0 * x[:, :1]) * np.cos(block)[:, None]
       + np.linspace(-1.5, 1.5, 8)[block][:, None] * np.array([1.0, -0.5])
       + 0.3 * rng.standard_normal((ROWS, 2))).astype(np.float32)
  return x, y


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  # A sum of products rather than h @ w2: with Explicit mesh axes a matmul
  # contracting a dimension sharded over 'model' needs an out_sharding=.
  pred = jnp.sum(h[..., None] * params["w2"], axis=-2) + params["b2"]
  return jnp.mean((pred - y) ** 2)


def make_tx(adaptive=False, **kwargs):
  return sam_optax.sam(optax.sgd(LR, momentum=MOMENTUM),
                       rho=ASAM_RHO if adaptive else RHO, adaptive=adaptive,
                       eta=ETA, axis_name="data", **kwargs)


def traced_once(tx):
  """The SAM step body for ``tx``; fails if traced a second time."""

  def body(params, state, x, y):
    return sam_body(tx, params, state, x, y)

  chex.clear_trace_counter()  # The counter is keyed by the code, not tx.
  return chex.assert_max_traces(body, n=1)


def sam_body(tx, params, state, x, y):
  local = sam_optax.mark_varying(params, "data")  # This shard's gradient.
  grads = jax.grad(loss_fn)(local, x, y)
  grad_fn = functools.partial(jax.grad(loss_fn), x=x, y=y)
  updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
  return optax.apply_updates(params, updates), state


def base_body(tx, params, state, x, y):
  local = sam_optax.mark_varying(params, "data")
  grads = jax.lax.pmean(jax.grad(loss_fn)(local, x, y), "data")
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


# ---------------------------------------------------------------- reference

_BASE = optax.sgd(LR, momentum=MOMENTUM)


@jax.jit
def _reference_step(params, state, xs, ys, groups, adaptive):
  """One step of data-parallel SAM, by hand on one device.

  ``xs``, ``ys``: the batch as 8 blocks ``(8, ROWS // 8, ...)``. ``groups``
  (8 x 8) averages the blocks' gradients over each data shard: row ``i``
  gives the shard of block ``i`` weight ``1 / blocks per shard``. The loss is
  a mean over equal blocks, so that is the shard's gradient; every block is
  then evaluated at its shard's ε and the SAM gradients averaged. (One
  compilation serves every shard count; ``adaptive`` is a traced bool.)
  """
  grad = jax.grad(loss_fn)
  grads = jax.vmap(grad, in_axes=(None, 0, 0))(params, xs, ys)
  grads = jax.tree.map(  # g of the shard of each block.
      lambda g: jnp.tensordot(groups, g, axes=1), grads)

  def epsilon(g):  # Over the whole tree, model-sharded leaves included.
    sam = jax.tree.map(lambda a: RHO * a / optax.tree.norm(g), g)
    t = jax.tree.map(lambda w: jnp.abs(w) + ETA, params)
    tg = jax.tree.map(jnp.multiply, t, g)
    asam = jax.tree.map(
        lambda s, a: ASAM_RHO * s * a / optax.tree.norm(tg), t, tg)
    return jax.tree.map(lambda a, b: jnp.where(adaptive, a, b), asam, sam)

  perturbed = jax.tree.map(jnp.add, params, jax.vmap(epsilon)(grads))
  sam_grads = jax.vmap(grad)(perturbed, xs, ys)
  g_sam = jax.tree.map(lambda g: jnp.mean(g, axis=0), sam_grads)
  updates, state = _BASE.update(g_sam, state, params)
  return optax.apply_updates(params, updates), state


@functools.cache
def reference(shards, ascent="local", adaptive=False):
  """Params after ``STEPS`` steps: per-shard ascent over ``shards`` data
  shards (``ascent='local'``) or the global one."""
  x, y = make_batch()
  xs, ys = (a.reshape((8, -1) + a.shape[1:]) for a in (x, y))
  shard_of_block = np.arange(8) // (8 // shards)
  if ascent == "global":
    shard_of_block[:] = 0
  same = shard_of_block[:, None] == shard_of_block[None, :]
  groups = (same / same.sum(axis=1, keepdims=True)).astype(np.float32)
  params = init_params()
  state = jax.jit(_BASE.init)(params)
  for _ in range(STEPS):
    params, state = _reference_step(params, state, xs, ys, groups, adaptive)
  return jax.tree.map(np.asarray, params)


def assert_close(actual, expected):
  chex.assert_trees_all_close(
      jax.tree.map(np.asarray, actual), expected, rtol=1e-5, atol=1e-6)


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(a[k]) - b[k]))) for k in b)


def shardings(tree):
  return jax.tree.map(lambda a: a.sharding, tree)


def run(step, params, state, x, y):
  """``STEPS`` steps; asserts the shardings never change and one compile."""
  expected = shardings((params, state))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
    assert shardings((params, state)) == expected
  assert step._cache_size() == 1  # pylint: disable=protected-access
  return params, state


# -------------------------------------------------------------------- tests


def test_reference_separates_local_from_global_ascent():
  # Guards the tests below: per-shard ascent (m = 4 or 8 examples) and the
  # global one (m = 32) end clearly apart on this problem.
  for shards in (8, 4):
    for adaptive in (False, True):
      local = reference(shards, adaptive=adaptive)
      assert max_abs_diff(local, reference(shards, "global", adaptive)) > 1e-3
  assert max_abs_diff(reference(8), reference(4)) > 1e-3


def test_data_parallel_jit_with_named_shardings():
  # Params and state replicated, batch sharded over 'data'; out_shardings
  # pins the step's outputs to the inputs' shardings and the old buffers are
  # donated, as in a real training loop.
  mesh = jax.make_mesh((N_DEV,), ("data",))
  tx = make_tx()
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
  x, y = jax.device_put(make_batch(), NamedSharding(mesh, P("data")))
  step = jax.jit(
      jax.shard_map(
          traced_once(tx), mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
          out_specs=(P(), P())),
      out_shardings=shardings((params, state)), donate_argnums=(0, 1))
  params, state = run(step, params, state, x, y)
  assert_close(params, reference(N_DEV))
  assert max_abs_diff(params, reference(N_DEV, "global")) > 1e-3
  assert int(state.step_count) == STEPS


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_data_and_model_parallel_jit(adaptive):
  # 4 x 2 mesh: per-data-shard ascent over the 4 data shards, with the
  # hidden layer's kernel, bias and the output kernel split over 'model'.
  # SAM's norm must still be over the whole tree: a norm over one model
  # shard's slices would give another ε and fail the comparison.
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  tx = make_tx(adaptive=adaptive)
  params = {k: jax.device_put(v, NamedSharding(mesh, MODEL_SPECS[k]))
            for k, v in init_params().items()}
  assert params["w1"].addressable_shards[0].data.shape == (3, 4)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
  # The momentum is sharded like the params (not replicated).
  assert shardings(state.base_state[0].trace) == shardings(params)
  x, y = jax.device_put(make_batch(), NamedSharding(mesh, P("data")))
  step = jax.jit(jax.shard_map(
      traced_once(tx), mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P()), axis_names={"data"}))
  params, state = run(step, params, state, x, y)
  assert_close(params, reference(4, adaptive=adaptive))
  assert max_abs_diff(params, reference(4, "global", adaptive)) > 1e-3
  # Collectives (the compilation is cached): one tree of this device's
  # elements (half of each model-sharded leaf) crosses the data axis; over
  # 'model' XLA adds the forward passes' partial sums and the sums of
  # squared norms (‖g‖² over the model shards).
  text = step.lower(params, state, x, y).compile().as_text()
  per_device = sum(a.size // (2 if "model" in MODEL_SPECS[k] else 1)
                   for k, a in init_params().items())
  assert count_collectives(text, 4) == (per_device, 2, 0)
  _, model_scalars, _ = count_collectives(text, 2)
  assert model_scalars > 0


# -------------------------------------------------------- collective counts

_INSTR = re.compile(r"=\s*(?P<type>.*?)\s(?P<op>all-reduce|all-gather|"
                    r"reduce-scatter|all-to-all|collective-permute)"
                    r"(?:-start)?\(")
_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
_GROUP = re.compile(r"replica_groups=(?:\{\{([0-9,]*)\}|\[[0-9]+,([0-9]+)\])")


def count_collectives(hlo_text, group_size):
  """Over the collectives with replica groups of ``group_size`` devices:
  ``(gradient-sized elements all-reduced, scalars all-reduced, other ops)``.
  """
  elements = scalars = other = 0
  for line in hlo_text.splitlines():
    m = _INSTR.search(line)
    if not m:
      continue
    g = _GROUP.search(line)
    size = N_DEV if g is None else (
        len(g.group(1).split(",")) if g.group(1) is not None
        else int(g.group(2)))
    if size != group_size:
      continue
    if m.group("op") != "all-reduce":
      other += 1
      continue
    for dims in _SHAPE.findall(m.group("type")):
      shape = [int(d) for d in dims.split(",") if d]
      if shape:
        elements += math.prod(shape)
      else:
        scalars += 1
  return elements, scalars, other


N_PARAMS = sum(a.size for a in init_params().values())  # 50, no 1-elem leaf.


def _compiled_pmap(body, tx):
  params = init_params()
  x, y = make_batch()

  def stack(tree):
    return jax.tree.map(lambda a: np.stack([a] * N_DEV), tree)

  step = jax.pmap(functools.partial(body, tx), axis_name="data")
  return step.lower(stack(params), stack(tx.init(params)),
                    x.reshape(N_DEV, -1, 3),
                    y.reshape(N_DEV, -1, 2)).compile().as_text()


def _compiled_shard_map(body, tx):
  mesh = jax.make_mesh((N_DEV,), ("data",))
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
  x, y = jax.device_put(make_batch(), NamedSharding(mesh, P("data")))
  step = jax.jit(jax.shard_map(
      functools.partial(body, tx), mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())))
  return step.lower(params, state, x, y).compile().as_text()


@pytest.mark.parametrize("mapped", ["pmap", "shard_map"])
def test_sam_all_reduces_one_gradient_tree(mapped):
  # The base optimizer's data-parallel step reduces the gradient tree once;
  # per-device SAM must too (its SAM gradients, after the local ascent),
  # plus the two logged scalars (‖g‖ and ‖ε‖). An extra pmean of the
  # gradients (e.g. of the ascent gradient) doubles the elements.
  compiled = {"pmap": _compiled_pmap, "shard_map": _compiled_shard_map}[
      mapped]
  base = count_collectives(
      compiled(base_body, optax.sgd(LR, momentum=MOMENTUM)), N_DEV)
  assert base == (N_PARAMS, 0, 0)
  sam = count_collectives(compiled(sam_body, make_tx()), N_DEV)
  assert sam == (N_PARAMS, 2, 0)
  if mapped == "pmap":  # The count sees an extra tree: sync_ascent's pmean.
    synced = count_collectives(
        compiled(sam_body, make_tx(sync_ascent=True)), N_DEV)
    assert synced == (2 * N_PARAMS, 2, 0)
