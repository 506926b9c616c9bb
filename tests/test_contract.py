"""The Optax contract, for every method: optax's contrib battery
(``optax/contrib/_common_test.py``) ported to this package.

Every method of :data:`tests.contract.METHODS` (called through its own
documented convention) over optax's base optimizers
(:data:`tests.contract.BASES`): convergence on optax's targets with optax's
tolerances, unknown extra args, ``optax.tree.map_params`` over the state,
state stability under ``lax.cond`` (float16, bfloat16, float32), the
params' dtype kept (bfloat16, float32), ``inject_hyperparams`` equality and
``optax.MultiSteps`` inside the method (per micro-batch, DESIGN.md §8.1).
What a method cannot do by design (MSAM without a momentum in the base
state) is checked as the clear error it raises. The sharding part runs on 8
fake devices: tests/multidevice/test_contract_sharding.py.

Runtime: one compiled program per (method, base) holds every check on that
pair (the optimisation runs are ``lax.fori_loop``s); see docs/contract.md.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import contract

# optax's convergence check: 30 000 steps, rtol = atol = 3e-2.
NUM_STEPS = 30_000
TOL = 3e-2
CONVERGENCE_TARGETS = ("parabola", "rosenbrock", "matrix_parabola")
# The suite runs every (method, base) pair on one of the targets, in turn,
# and every target with the bases below; SAM_OPTAX_FULL_CONTRACT=1 runs
# every pair on every target, optax's fourth (mixed_tensors) included.
FULL = bool(os.environ.get("SAM_OPTAX_FULL_CONTRACT"))
ALL_TARGETS_BASES = ("adam", "lamb")
if FULL:
  CONVERGENCE_TARGETS += ("mixed_tensors",)


def convergence_targets(method_name, base_name):
  """The targets a (method, base) pair is run on."""
  if FULL or base_name in ALL_TARGETS_BASES:
    return CONVERGENCE_TARGETS
  turn = (list(contract.METHODS).index(method_name)
          + list(contract.BASES).index(base_name))
  return (CONVERGENCE_TARGETS[turn % len(CONVERGENCE_TARGETS)],)
EXTRA = {"unexpected_extra_args_your_optimizer_doesnt_expect": 1}
# XLA's cheapest CPU compilation: the battery is compile-bound.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(fn, *args):
  """``fn`` jitted and compiled once, quickly."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def optimise(method, tx, problem, num_steps, with_cond=False):
  """``num_steps`` train steps in one ``fori_loop``; the clean params.

  Every step passes an unknown extra arg; the state first goes through
  ``optax.tree.map_params`` (a no-op change, as in optax's battery); with
  ``with_cond`` the update runs under a ``lax.cond`` whose predicate XLA
  cannot fold (the state must keep its shapes and dtypes through both
  branches).
  """
  state = optax.tree.map_params(tx, lambda v: v, tx.init(problem.params))

  def body(i, carry):
    params, state = carry

    def update():
      return method.step(tx, problem, params, state, **EXTRA)

    if with_cond:
      updates, state = jax.lax.cond(
          i >= 0, update, lambda: (optax.tree.zeros_like(params), state))
    else:
      updates, state = update()
    return optax.apply_updates(params, updates), state

  params, state = jax.lax.fori_loop(0, num_steps, body,
                                    (problem.params, state))
  return sam_optax.eval_params(state, params)


# SAM's radius drifts it along Rosenbrock's curved valley towards flatter
# points (docs/contract.md: 0.05 off at a constant rho = 1e-3 with sgd):
# there the radius starts at RHO / 10 and decays to 0 over the first tenth
# of the run.
DECAYING = {"rosenbrock": optax.linear_schedule(
    contract.RHO / 10, 0.0, NUM_STEPS // 10)}

methods = pytest.mark.parametrize("method_name", list(contract.METHODS))
# The structural checks run over one base (as optax runs them once per
# optimizer); the convergence runs, which also pass extra args, map the
# params and update under lax.cond, go over all of optax's list.
STRUCTURAL_BASES = ("adam",)
structural_bases = pytest.mark.parametrize("base_name", STRUCTURAL_BASES)


def rejects(method, base_name):
  return method.rejects(contract.base_optimizer(base_name),
                        contract.parabola().params)


@pytest.mark.parametrize("base_name", list(contract.BASES))
@methods
def test_converges_on_optax_targets(method_name, base_name):
  # optax's test_optimizers: every target within rtol = atol = 3e-2 of its
  # minimiser after 30 000 steps, with an unknown extra arg on every step,
  # tree.map_params over the state and the update under lax.cond (the
  # float32 state stability check, for every base).
  method = contract.METHODS[method_name]

  def build(radius=None):
    return method.build(contract.base_optimizer(base_name, NUM_STEPS),
                        radius=radius)

  if rejects(method, base_name):
    error, match = method.needs_error
    with pytest.raises(error, match=match):
      build().init(contract.parabola().params)
    return

  targets = convergence_targets(method_name, base_name)

  def run():
    return {name: optimise(method, build(DECAYING.get(name)),
                           contract.TARGETS[name](), NUM_STEPS,
                           with_cond=True)
            for name in targets}

  out = compiled(run)()
  for name in targets:
    target = contract.TARGETS[name]().target
    for got, want in zip(jax.tree.leaves(out[name]),
                         jax.tree.leaves(target)):
      np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL,
                                 err_msg=f"{method_name} {base_name} {name}")


@structural_bases
@methods
def test_extra_args_accepted_without_recompiling(method_name, base_name):
  # optax's test_optimizers_accept_extra_args on Rosenbrock, value= too.
  method = contract.METHODS[method_name]
  tx = method.build(contract.base_optimizer(base_name))
  problem = contract.rosenbrock()

  @jax.jit
  def step(params, state):
    updates, state = method.step(tx, problem, params, state,
                                 value=problem.loss(params), **EXTRA)
    return optax.apply_updates(params, updates), state

  params, state = problem.params, tx.init(problem.params)
  params, state = step(params, state)
  params, state = step(params, state)
  assert step._cache_size() == 1
  assert all(bool(jnp.all(jnp.isfinite(x)))
             for x in jax.tree.leaves((params, state)))


def _inject_problem():
  # optax's test_optimizers_can_be_wrapped_in_inject_hyperparams: these
  # params, and the gradient [ones, -ones] at them.
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  return contract.squared_distance(
      params, jax.tree.map(lambda p, g: p - g / 2, params, grads))


@structural_bases
@methods
def test_inject_hyperparams_gives_the_same_step(method_name, base_name):
  method = contract.METHODS[method_name]
  base = contract.base_optimizer(base_name)
  tx = method.build(base)
  injected = optax.inject_hyperparams(
      method.factory, static_args=method.static_args)(base, **method.kwargs)
  problem = _inject_problem()

  @jax.jit
  def two_steps(params):
    out = []
    for opt in (tx, injected):
      state = opt.init(params)
      updates, state = method.step(opt, problem, params, state)
      out.append((updates, state))
    return out

  (updates, state), (updates_inj, state_inj) = two_steps(problem.params)
  assert set(state_inj.hyperparams) >= set(method.kwargs) - set(
      method.static_args)
  np.testing.assert_equal(
      jax.tree.structure(state_inj.inner_state), jax.tree.structure(state))
  for a, b in zip(jax.tree.leaves((updates_inj, state_inj.inner_state)),
                  jax.tree.leaves((updates, state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@structural_bases
@methods
def test_multisteps_inside_accumulates_per_micro_batch(method_name,
                                                       base_name, dtype):
  # optax's test_gradient_accumulation, with the method outside MultiSteps
  # (DESIGN.md 8.1): the method runs per micro-batch, the base optimizer
  # steps once every k micro-batches. The clean params do not move on the
  # first k - 1 micro-batches and do on the k-th, in their dtype.
  k = 4
  method = contract.METHODS[method_name]
  tx = method.build(optax.MultiSteps(contract.base_optimizer(base_name), k))
  problem = contract.squared_distance(jnp.array([1.0, 2.0], dtype),
                                      jnp.zeros(2, dtype))

  @jax.jit
  def micro_steps(params):
    state, clean = tx.init(params), []
    for _ in range(k):
      updates, state = method.step(tx, problem, params, state)
      params = optax.apply_updates(params, updates)
      clean.append(sam_optax.eval_params(state, params))
    return clean, state

  clean, state = micro_steps(problem.params)
  # Exactly, up to the rounding of (w + ε) - ε for the methods that hold
  # perturbed params (RWP's noise is redrawn every micro-step).
  ulp = 2 * float(jnp.finfo(jnp.dtype(dtype)).eps)
  for c in clean[:-1]:
    np.testing.assert_allclose(np.asarray(c, np.float32),
                               np.asarray(problem.params, np.float32),
                               rtol=ulp, atol=0)
  assert clean[-1].dtype == jnp.dtype(dtype)
  assert bool(jnp.any(clean[-1] != problem.params))
  assert int(optax.tree.get(state, "gradient_step")) == 1
  count = state.step_count if hasattr(state, "step_count") else state.count
  assert int(count) == k


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@structural_bases
@methods
def test_state_is_stable_under_lax_cond(method_name, base_name, dtype):
  # optax's test_state_shape_dtype_shard_stability: two steps, each update
  # under a lax.cond XLA cannot fold, the state chosen by another; the
  # clean loss value passed in another dtype on purpose. The cond's other
  # branch returns the params as the updates, so this is also optax's
  # test_preserve_dtype: updates in the params' dtype (lax.cond rejects
  # branches whose outputs differ in dtype).
  method = contract.METHODS[method_name]
  tx = method.build(contract.base_optimizer(base_name))
  problem = contract.parabola(jnp.dtype(dtype))
  other = jnp.float16 if dtype != "float16" else jnp.bfloat16

  @jax.jit
  def step(params, state):
    cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    updates, state = jax.lax.cond(
        cond, lambda: method.step(tx, problem, params, state,
                                  value=problem.loss(params).astype(other)),
        lambda: (params, state))
    return optax.apply_updates(params, updates), state

  params, state = problem.params, tx.init(problem.params)
  for _ in range(2):
    params, new_state = step(params, state)
    assert params.dtype == jnp.dtype(dtype)
    cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    state = jax.lax.cond(cond, lambda s=state: s, lambda s=new_state: s)
  assert jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)),
                      state) == jax.tree.map(
                          lambda x: (jnp.shape(x), jnp.result_type(x)),
                          tx.init(problem.params))


@methods
def test_init_on_abstract_params(method_name):
  # optax's sharding_test.test_init_with_abstract_input.
  method = contract.METHODS[method_name]
  tx = method.build(contract.base_optimizer("adam"))
  params = jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)
  state = jax.eval_shape(tx.init, params)
  assert jax.tree.leaves(state)


def test_every_public_method_is_in_the_battery():
  # A new method joins with one entry in tests/contract.py's METHODS.
  factories = {m.factory.func if hasattr(m.factory, "func") else m.factory
               for m in contract.METHODS.values()}
  public = {getattr(sam_optax, name) for name in sam_optax.__all__}
  methods_module = "sam_optax._methods."
  for fn in public:
    if (callable(fn) and getattr(fn, "__module__", "").startswith(
        methods_module) and fn.__name__ == fn.__module__.rsplit(".")[-1]):
      assert fn in factories, f"{fn.__name__} is not in METHODS"
