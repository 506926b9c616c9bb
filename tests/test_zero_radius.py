"""A zero radius skips the second gradient, for every method with grad_fn.

A step whose ρ is exactly 0 (a schedule such as ``late_phase``, or ρ set to
0 under ``inject_hyperparams``) must call no ``grad_fn`` and equal the base
optimizer's step bit for bit. ``grad_fn`` calls are counted with a
``jax.debug.callback`` inside it, which runs only when the branch that holds
it runs.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

N = 3  # late_phase's start step in these tests.
RHO = 0.1
X = jax.random.normal(jax.random.key(0), (8, 3))
Y = jnp.sin(jnp.arange(8.0))


def example_losses(w, batch):
  x, y = batch
  return (jnp.tanh(x @ w["a"] + w["b"]) @ w["c"] - y) ** 2


def loss(w, batch=(X, Y)):
  return jnp.mean(example_losses(w, batch))


PARAMS = {"a": 0.5 * jax.random.normal(jax.random.key(1), (3, 4)),
          "b": jnp.zeros(4), "c": jnp.ones(4) * 0.3}


class Counter:
  """Counts grad_fn calls made at run time (in jitted code too)."""

  def __init__(self):
    self.n = 0

  def bump(self):
    self.n += 1

  def grad_fn(self, p):
    jax.debug.callback(self.bump)
    return jax.grad(loss)(p)

  def example_loss_fn(self, p, batch):
    jax.debug.callback(self.bump)
    return example_losses(p, batch)


def base_tx():
  return optax.sgd(0.05, momentum=0.9)


METHODS = {
    "sam": lambda rho: sam_optax.sam(base_tx(), rho=rho),
    "asam": lambda rho: sam_optax.sam(base_tx(), rho=rho, adaptive=True),
    "gsam": lambda rho: sam_optax.gsam(base_tx(), rho=rho, alpha=0.5),
    "friendly_sam": lambda rho: sam_optax.friendly_sam(base_tx(), rho=rho),
    "looksam": lambda rho: sam_optax.looksam(base_tx(), rho=rho, every_k=N),
    "rst": lambda rho: sam_optax.rst(base_tx(), rho=rho, probability=1.0),
    "ae_sam": lambda rho: sam_optax.ae_sam(base_tx(), rho=rho,
                                           threshold=-10.0),
    "esam": lambda rho: sam_optax.esam(base_tx(), rho=rho, beta=0.5,
                                       gamma=0.5),
}


def make_step(tx, counter, name):
  def step(p, s):
    g = jax.grad(loss)(p)
    if name == "esam":
      return tx.update(g, s, p, example_loss_fn=counter.example_loss_fn,
                       batch=(X, Y), example_losses=example_losses(p, (X, Y)))
    return tx.update(g, s, p, grad_fn=counter.grad_fn)
  return jax.jit(step)


def base_updates(steps):
  """The base optimizer's updates and params over ``steps`` steps."""
  tx = base_tx()
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  p, s, out = PARAMS, tx.init(PARAMS), []
  for _ in range(steps):
    u, s = step(p, s)
    out.append(u)
    p = optax.apply_updates(p, u)
  return out


def equal(a, b):
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_late_phase_skips_grad_fn_then_switches_at_n(name):
  """Steps < N: no grad_fn call, the base step bit for bit; step N: the
  method's own step (its grad_fn called), as with a constant ρ."""
  counter = Counter()
  tx = METHODS[name](sam_optax.late_phase(RHO, N))
  step = make_step(tx, counter, name)
  p, s = PARAMS, tx.init(PARAMS)
  for t, expected in enumerate(base_updates(N)):
    u, s = step(p, s)
    jax.effects_barrier()
    assert counter.n == 0, (name, t)
    assert equal(u, expected), (name, t)
    assert float(s.radius) == 0.0
    p = optax.apply_updates(p, u)
  # Step N from the same point and state: the constant-ρ method's step.
  const = METHODS[name](RHO)
  u_const, s_const = make_step(const, Counter(), name)(p, s)
  u, s_next = step(p, s)
  jax.effects_barrier()
  assert counter.n == 1 or (name == "esam" and counter.n > 1)
  chex.assert_trees_all_close(u, u_const, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(s_next, s_const, rtol=1e-6, atol=1e-7)
  assert float(s_next.radius) > 0


@pytest.mark.parametrize("name", ["sam", "gsam", "looksam"])
def test_python_zero_radius_has_no_cond_and_no_grad_fn(name):
  """rho=0 (a Python number): the base step, with no cond in the program."""
  counter = Counter()
  tx = METHODS[name](0.0)
  state = tx.init(PARAMS)
  jaxpr = jax.make_jaxpr(
      lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                             grad_fn=counter.grad_fn))(PARAMS, state)
  names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert "debug_callback" not in names
  if name != "looksam":  # LookSAM's own period is a cond.
    assert "cond" not in names
  u, _ = make_step(tx, counter, name)(PARAMS, state)
  jax.effects_barrier()
  assert counter.n == 0
  assert equal(u, base_updates(1)[0])


def test_grad_fn_is_only_inside_the_cond_branch():
  """With a schedule, the perturbed pass lives in one branch of a cond."""
  tx = sam_optax.sam(base_tx(), rho=sam_optax.late_phase(RHO, N))
  counter = Counter()
  jaxpr = jax.make_jaxpr(
      lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                             grad_fn=counter.grad_fn))(PARAMS,
                                                       tx.init(PARAMS))
  top = [e for e in jaxpr.jaxpr.eqns]
  assert "debug_callback" not in {e.primitive.name for e in top}
  (cond,) = [e for e in top if e.primitive.name == "cond"]
  with_callback = [
      any(e.primitive.name == "debug_callback" for e in b.jaxpr.eqns)
      for b in cond.params["branches"]]
  assert sorted(with_callback) == [False, True]


def test_zero_radius_state_per_method():
  """What a zero-radius step does to each method's state."""
  steps = 2
  grads, p = [], PARAMS
  for u in base_updates(steps):
    grads.append(jax.grad(loss)(p))
    p = optax.apply_updates(p, u)
  late = sam_optax.late_phase(RHO, 10)

  def run(name):
    tx = METHODS[name](late)
    step = make_step(tx, Counter(), name)
    p, s = PARAMS, tx.init(PARAMS)
    for _ in range(steps):
      u, s = step(p, s)
      p = optax.apply_updates(p, u)
    return s.method_state

  # Friendly-SAM: the EMA of the clean gradients keeps updating.
  decay = 0.9
  ema = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, *grads)
  chex.assert_trees_all_close(run("friendly_sam").grad_ema, ema, rtol=1e-6)
  # LookSAM: no direction cached.
  assert not any(jnp.any(x) for x in jax.tree.leaves(
      run("looksam").orthogonal_grad))
  # AE-SAM: the moments of ‖g‖² keep updating (δ = 0.9).
  sq = [float(optax.tree.norm(g)) ** 2 for g in grads]
  mean = var = 0.0
  for v in sq:
    mean = decay * mean + (1 - decay) * v
    var = decay * var + (1 - decay) * (v - mean) ** 2
  ae = run("ae_sam")
  np.testing.assert_allclose([ae.sq_norm_mean, ae.sq_norm_var], [mean, var],
                             rtol=1e-5)
  # ESAM: the SWP key is not advanced; RST: the key never changes.
  tx = METHODS["esam"](late)
  chex.assert_trees_all_equal(run("esam").key, tx.init(PARAMS).method_state
                              .key)


def test_inject_hyperparams_rho_zero_then_positive():
  counter = Counter()
  tx = optax.inject_hyperparams(sam_optax.sam)(base_tx(), rho=0.0)
  step = make_step(tx, counter, "sam")
  s = tx.init(PARAMS)
  u, s = step(PARAMS, s)
  jax.effects_barrier()
  assert counter.n == 0 and equal(u, base_updates(1)[0])
  s.hyperparams["rho"] = jnp.asarray(RHO)
  u, s = step(PARAMS, s)
  jax.effects_barrier()
  assert counter.n == 1
  assert float(s.inner_state.radius) == pytest.approx(RHO)


def test_multisteps_switches_on_outer_steps():
  """sam(MultiSteps(base, k)): ρ = 0 for the first N outer steps, i.e. the
  first N * k micro-steps call no grad_fn."""
  k = 2
  counter = Counter()
  tx = sam_optax.sam(optax.MultiSteps(base_tx(), k),
                     rho=sam_optax.late_phase(RHO, N))
  step = make_step(tx, counter, "sam")
  p, s, calls = PARAMS, tx.init(PARAMS), []
  for _ in range((N + 1) * k):
    u, s = step(p, s)
    jax.effects_barrier()
    calls.append(counter.n)
    p = optax.apply_updates(p, u)
  assert calls == [0] * (N * k) + [1, 2]


def test_vmap_over_batched_rho_is_still_right():
  """Under vmap with a batched ρ the cond is a select: both branches run,
  and each lane gets its own branch's result."""
  tx = optax.inject_hyperparams(sam_optax.sam)(base_tx(), rho=0.0)
  s0 = tx.init(PARAMS)

  def one(rho):
    s = s0._replace(hyperparams={**s0.hyperparams, "rho": rho})
    u, _ = tx.update(jax.grad(loss)(PARAMS), s, PARAMS,
                     grad_fn=jax.grad(loss))
    return u

  batched = jax.jit(jax.vmap(one))(jnp.array([0.0, RHO]))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], batched),
                              base_updates(1)[0], rtol=1e-6,
                              atol=1e-8)
  sam_u, _ = sam_optax.sam(base_tx(), rho=RHO).update(
      jax.grad(loss)(PARAMS), s0.inner_state, PARAMS, grad_fn=jax.grad(loss))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], batched), sam_u,
                              rtol=1e-6)


def test_checkpoint_resumes_the_schedule():
  """A state saved as numpy arrays and restored resumes at the same step:
  the same updates as an uninterrupted run, the switch still at N."""
  tx = sam_optax.sam(base_tx(), rho=sam_optax.late_phase(RHO, N))
  step = make_step(tx, Counter(), "sam")

  def run(p, s, steps):
    out = []
    for _ in range(steps):
      u, s = step(p, s)
      out.append(u)
      p = optax.apply_updates(p, u)
    return p, s, out

  p, s, first = run(PARAMS, tx.init(PARAMS), N - 1)
  saved = jax.tree.map(np.asarray, (p, s))
  _, _, rest = run(*jax.tree.map(jnp.asarray, saved), 2)
  _, _, whole = run(PARAMS, tx.init(PARAMS), N + 1)
  assert equal(first + rest, whole)
  assert equal(whole[N - 1], base_updates(N)[N - 1])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_microbatched_and_low_precision_zero_step_is_the_base_step(dtype):
  """microbatched: the zero-radius step applies the mean of the micro-batch
  gradients; bf16 params: both branches have the params' dtypes."""
  params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
  tx = sam_optax.gsam(base_tx(), rho=sam_optax.late_phase(RHO, 1))
  u, _ = jax.jit(lambda p, s: tx.update(
      jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss)))(params,
                                                        tx.init(params))
  base = jax.jit(lambda g, p: base_tx().update(g, base_tx().init(p), p)[0])
  assert equal(u, jax.jit(lambda p: base(jax.grad(loss)(p), p))(params))
  micro = sam_optax.sam(base_tx(), rho=sam_optax.late_phase(RHO, 1),
                        microbatched=True)
  xs, ys = X.reshape(2, 4, 3), Y.reshape(2, 4)
  per = jax.vmap(lambda x, y: jax.grad(loss)(params, (x, y)))(xs, ys)
  u, s = jax.jit(lambda p, s: micro.update(per, s, p, grad_fn=(
      lambda q: jax.vmap(lambda qq, x, y: jax.grad(loss)(qq, (x, y)))(
          q, xs, ys))))(params, micro.init(params))
  mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), per)
  chex.assert_trees_all_close(u, base(mean, params), rtol=1e-6)
  assert float(s.ascent_norm) == 0 and float(s.radius) == 0


def test_looksam_cache_cleared_when_rho_drops_to_zero():
  """A SAM step caches g_v; a later zero-radius step clears it (and its
  norm), so the reuse steps that follow are base steps."""
  tx = sam_optax.looksam(base_tx(), every_k=3,
                         rho=lambda t: jnp.where(t == 0, RHO, 0.0))
  step = make_step(tx, Counter(), "looksam")
  p, s = PARAMS, tx.init(PARAMS)
  u, s = step(p, s)
  assert float(s.method_state.orthogonal_norm) > 0
  chex.assert_trees_all_close(s.method_state.orthogonal_norm,
                              optax.tree.norm(s.method_state.orthogonal_grad),
                              rtol=1e-6)
  p = optax.apply_updates(p, u)
  _, s = step(p, s)
  assert float(s.method_state.orthogonal_norm) == 0
  assert not any(jnp.any(x) for x in jax.tree.leaves(
      s.method_state.orthogonal_grad))


@pytest.mark.parametrize("name", ["sam", "gsam"])
def test_skip_zero_radius_false_is_straight_line(name):
  """skip_zero_radius=False: no cond with a schedule; a zero ρ pays the
  second gradient (ε = 0) and gives the base step's update."""
  make = {"sam": sam_optax.sam, "gsam": sam_optax.gsam}[name]
  tx = make(base_tx(), rho=sam_optax.late_phase(RHO, N),
            skip_zero_radius=False)
  counter = Counter()
  state = tx.init(PARAMS)
  jaxpr = jax.make_jaxpr(
      lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                             grad_fn=counter.grad_fn))(PARAMS, state)
  names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert "cond" not in names and "debug_callback" in names
  u, _ = make_step(tx, counter, name)(PARAMS, state)
  jax.effects_barrier()
  assert counter.n == 1
  chex.assert_trees_all_close(u, base_updates(1)[0], rtol=1e-6, atol=1e-7)


def test_skip_zero_radius_must_be_a_bool():
  with pytest.raises(TypeError, match="skip_zero_radius"):
    sam_optax.sam(base_tx(), skip_zero_radius=None)
