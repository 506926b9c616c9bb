"""Data-parallel SAM on 8 fake CPU devices: pmap and shard_map.

Runs in its own process with the other tests of ``tests/multidevice`` (see
its ``conftest.py``, which sets up the 8 devices).

Every test compares against a hand-written reference computed on one device
(numpy for the ascent arithmetic, ``jax.grad`` of a tiny two-layer tanh model
for the per-shard gradients): for each shard ``i``, ``g_i = ∇L_i(w)``,
``ε_i`` from the ascent gradient (``g_i``, or a group/global mean of them),
``gs_i = ∇L_i(w + ε_i)``, ``g_sam = mean_i gs_i``, then the base optimizer.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

N_DEV = 8
PER_DEV = 4
LR = 0.1
SAM_RHO = 0.1
ASAM_RHO = 0.5
ETA = 0.01
ATOL = 1e-6
RTOL = 1e-5
MESH = Mesh(np.array(jax.devices()), ("batch",))

# ------------------------------------------------------------------ problem


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "w1": (0.7 * rng.standard_normal((3, 4))).astype(np.float32),
      "b1": (0.1 * rng.standard_normal(4)).astype(np.float32),
      "w2": (0.7 * rng.standard_normal(4)).astype(np.float32),
      "b2": np.float32(0.2),
  }


def make_data(seed=1, zero_shards=()):
  """Per-device shards ``(N_DEV, PER_DEV, ...)``: x, y and example weights.

  The targets differ from shard to shard so that the local gradients, hence
  the per-shard ascent directions, point in clearly different directions.
  Shards in ``zero_shards`` get weight 0: zero loss and zero gradient.
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((N_DEV, PER_DEV, 3)).astype(np.float32)
  offsets = np.linspace(-1.5, 1.5, N_DEV)[:, None]
  y = (np.sin(2.0 * x[..., 0]) * np.cos(np.arange(N_DEV))[:, None] + offsets
       + 0.3 * rng.standard_normal((N_DEV, PER_DEV))).astype(np.float32)
  m = np.ones((N_DEV, PER_DEV), np.float32)
  for i in zero_shards:
    m[i] = 0.0
  return x, y, m


def loss_fn(params, x, y, m):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  pred = h @ params["w2"] + params["b2"]
  return jnp.sum(m * (pred - y) ** 2) / y.shape[0]


_ref_grad = jax.jit(jax.grad(loss_fn))
_ref_loss = jax.jit(loss_fn)

BASES = {
    "sgd": lambda: optax.sgd(LR),
    "momentum": lambda: optax.sgd(LR, momentum=0.9),
    "adam": lambda: optax.adam(0.05),
}


@functools.cache
def _ref_base_update(base):
  tx = BASES[base]()
  return tx, jax.jit(tx.update)


# ---------------------------------------------------------------- reference


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(a))
                           for a in jax.tree.leaves(tree))))


def ref_scale(w, adaptive, eta=ETA):
  """ASAM's T = |w| + η (ones for SAM), in float64 numpy."""
  return jax.tree.map(lambda a: np.abs(a) + eta if adaptive else
                      np.ones_like(a), _np(w))


def ref_epsilon(g, w, rho, adaptive, eta=ETA, eps=1e-12):
  """The SAM / ASAM perturbation, written out in float64 numpy."""
  g, w = _np(g), _np(w)
  if adaptive:
    t = jax.tree.map(lambda a: np.abs(a) + eta, w)
    tg = jax.tree.map(np.multiply, t, g)
    n = _norm(tg)
    direction = jax.tree.map(np.multiply, t, tg)
  else:
    n = _norm(g)
    direction = g
  if n == 0.0:
    return jax.tree.map(np.zeros_like, g)
  return jax.tree.map(lambda d: rho * d / (n + eps), direction)


def _tree_mean(trees):
  return jax.tree.map(lambda *a: np.mean(np.stack(a), axis=0), *trees)


def ref_run(params, data, *, adaptive=False, rho=None, ascent="local",
            base="sgd", steps=2, eps=1e-12, m_split=1):
  """Hand-written data-parallel SAM.

  Args:
    ascent: ``'local'`` (ε_i from g_i), ``'global'`` (ε from mean_i g_i) or
      a list of device groups (ε_i from the mean over i's group).
    m_split: split every device's batch into this many micro-batches, each
      with its own ε (in-device m-sharpness).

  Returns:
    ``(params, info)`` with the last step's mean ‖g_i‖, mean ‖ε_i‖, mean
    clean and perturbed losses.
  """
  if rho is None:
    rho = ASAM_RHO if adaptive else SAM_RHO
  x, y, m = data
  n_chunks = N_DEV * m_split
  shards = [(x.reshape(n_chunks, -1, 3)[i], y.reshape(n_chunks, -1)[i],
             m.reshape(n_chunks, -1)[i]) for i in range(n_chunks)]
  if ascent == "local":
    groups = [[i] for i in range(N_DEV)]
  elif ascent == "global":
    groups = [list(range(N_DEV))]
  else:
    groups = [list(grp) for grp in ascent]
  tx, base_update = _ref_base_update(base)
  base_state = tx.init(params)
  w = jax.tree.map(jnp.asarray, params)
  for _ in range(steps):
    grads = [_np(_ref_grad(w, *s)) for s in shards]
    ascent_grads = []
    for i in range(n_chunks):
      if m_split > 1:  # Micro-batches: always their own gradient.
        ascent_grads.append(grads[i])
      else:
        grp = next(grp for grp in groups if i in grp)
        ascent_grads.append(_tree_mean([grads[j] for j in grp]))
    epsilons = [ref_epsilon(g, w, rho, adaptive, eps=eps)
                for g in ascent_grads]
    perturbed = [jax.tree.map(lambda a, e: (np.asarray(a, np.float64) + e)
                              .astype(np.float32), w, e) for e in epsilons]
    sam_grads = [_np(_ref_grad(p, *s)) for p, s in zip(perturbed, shards)]
    g_sam = jax.tree.map(lambda a: a.astype(np.float32),
                         _tree_mean(sam_grads))
    scales = [ref_scale(w, adaptive) for _ in ascent_grads]
    info = {
        "grad_norm": np.mean([_norm(g) for g in ascent_grads]),
        "perturbation_norm": np.mean([_norm(e) for e in epsilons]),
        # What the state logs by default: ‖Tg‖ and ‖T⁻¹ε‖ (ρ, or 0).
        "ascent_norm": np.mean([_norm(jax.tree.map(np.multiply, t, g))
                                for t, g in zip(scales, ascent_grads)]),
        "radius": np.mean([_norm(jax.tree.map(np.divide, e, t))
                           for t, e in zip(scales, epsilons)]),
        "loss": np.mean([float(_ref_loss(w, *s)) for s in shards]),
        "perturbed_loss": np.mean(
            [float(_ref_loss(p, *s)) for p, s in zip(perturbed, shards)]),
    }
    updates, base_state = base_update(g_sam, base_state, w)
    w = optax.apply_updates(w, updates)
  return jax.tree.map(np.asarray, w), info


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(
          np.asarray(a), np.asarray(e), atol=atol, rtol=rtol),
      actual, expected)


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_differs(a, b, at_least=1e-3):
  diff = max_abs_diff(a, b)
  assert diff > at_least, (
      f"the test problem cannot tell these apart (max |diff| = {diff:.2e})")


# ------------------------------------------------------------------ runners


def make_tx(base="sgd", adaptive=False, rho=None, **kwargs):
  if rho is None:
    rho = ASAM_RHO if adaptive else SAM_RHO
  return sam_optax.sam(BASES[base](), rho=rho, adaptive=adaptive, eta=ETA,
                       **kwargs)


def _freeze(kwargs):
  """A hashable cache key; equal configurations share one compiled step."""
  def hashable(v):
    if isinstance(v, list):
      return tuple(hashable(x) for x in v)
    return v
  kwargs = {"axis_name": "batch", "base": "sgd", "adaptive": False,
            "eps": 1e-12, **kwargs}
  return tuple(sorted((k, hashable(v)) for k, v in kwargs.items()))


def _step_body(tx, value_and_grad=False, microbatches=1, mark=None):
  """The per-device training step: local gradient, then ``tx.update``."""

  def step(params, state, x, y, m):
    local = params if mark is None else sam_optax.mark_varying(params, mark)
    extra = {}
    if microbatches > 1:
      batch = sam_optax.split_microbatches((x, y, m), microbatches)
      per_microbatch = jax.vmap(jax.grad(loss_fn))
      grads = per_microbatch(
          jax.tree.map(lambda a: jnp.stack([a] * microbatches), local),
          *batch)
      grad_fn = functools.partial(per_microbatch, x=batch[0], y=batch[1],
                                  m=batch[2])
    elif value_and_grad:
      extra["value"], grads = jax.value_and_grad(loss_fn)(local, x, y, m)
      grad_fn = functools.partial(jax.value_and_grad(loss_fn), x=x, y=y, m=m)
    else:
      grads = jax.grad(loss_fn)(local, x, y, m)
      grad_fn = functools.partial(jax.grad(loss_fn), x=x, y=y, m=m)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn,
                               **extra)
    return optax.apply_updates(params, updates), state

  return step


@functools.cache
def _pmap_step(bound_axis, microbatches, frozen):
  kwargs = dict(frozen)
  tx = make_tx(**kwargs)
  step = jax.pmap(
      _step_body(tx, kwargs.get("value_and_grad", False), microbatches),
      axis_name=bound_axis)
  return tx, step


def _replicate(tree):
  """Stacks a copy per device, laid out as pmap lays out its outputs.

  Feeding pmap the layout it returns avoids a second compilation of the step
  when its outputs come back in as the next step's inputs.
  """
  sharding = NamedSharding(MESH, P("batch"))
  return jax.tree.map(
      lambda a: jax.device_put(np.stack([np.asarray(a)] * N_DEV), sharding),
      tree)


def _per_device(data):
  sharding = NamedSharding(MESH, P("batch"))
  return tuple(jax.device_put(a, sharding) for a in data)


def run_pmap(params, data, steps=2, bound_axis="batch", microbatches=1,
             **kwargs):
  """Runs ``steps`` pmapped steps; returns the per-device params and state."""
  tx, step = _pmap_step(bound_axis, microbatches, _freeze(kwargs))
  p, state = _replicate(params), _replicate(tx.init(params))
  data = _per_device(data)
  for _ in range(steps):
    p, state = step(p, state, *data)
  return p, state


@functools.cache
def _shmap_step(check_vma, mark, frozen):
  tx = make_tx(**dict(frozen))
  step = jax.shard_map(
      _step_body(tx, mark="batch" if mark else None), mesh=MESH,
      in_specs=(P(), P(), P("batch"), P("batch"), P("batch")),
      out_specs=(P(), P()), check_vma=check_vma)
  return tx, jax.jit(step)


def run_shard_map(params, data, steps=2, check_vma=True, mark=True,
                  **kwargs):
  tx, step = _shmap_step(check_vma, mark, _freeze(kwargs))
  replicated = NamedSharding(MESH, P())
  batch = NamedSharding(MESH, P("batch"))
  p = jax.device_put(jax.tree.map(jnp.asarray, params), replicated)
  state = jax.device_put(tx.init(params), replicated)
  x, y, m = (jax.device_put(a.reshape((N_DEV * PER_DEV,) + a.shape[2:]),
                            batch) for a in data)
  for _ in range(steps):
    p, state = step(p, state, x, y, m)
  return p, state


def assert_replicated(tree):
  """Every leaf of a pmap output is identical on all devices."""
  for leaf in jax.tree.leaves(tree):
    leaf = np.asarray(leaf)
    for i in range(1, N_DEV):
      np.testing.assert_array_equal(leaf[i], leaf[0])


def first(tree):
  return jax.tree.map(lambda a: np.asarray(a)[0], tree)


PARAMS = init_params()
DATA = make_data()

# -------------------------------------------------------------------- tests
#
# Compiling one pmap/shard_map step takes about a second on CPU, so the
# parametrisations below pick a few configurations and reuse them (the steps
# are cached by configuration) rather than taking full cross products.

SAM_SGD = dict(adaptive=False, base="sgd")
ASAM_SGD = dict(adaptive=True, base="sgd")
SAM_MOMENTUM = dict(adaptive=False, base="momentum")
ASAM_ADAM = dict(adaptive=True, base="adam")


def _ids(cfg):
  return f"{'asam' if cfg['adaptive'] else 'sam'}-{cfg['base']}"


def test_eight_devices():
  assert jax.device_count() == N_DEV


@pytest.mark.parametrize("cfg", [SAM_SGD, ASAM_SGD, SAM_MOMENTUM, ASAM_ADAM],
                         ids=_ids)
def test_reference_separates_local_from_global_ascent(cfg):
  # Guards the other tests: on this problem the per-shard (m = per-device
  # batch) ascent, the global (m = global batch) ascent and no ascent at all
  # give clearly different params, so an implementation that syncs the
  # ascent by mistake, or skips it, fails.
  local, _ = ref_run(PARAMS, DATA, **cfg)
  glob, _ = ref_run(PARAMS, DATA, ascent="global", **cfg)
  no_sam, _ = ref_run(PARAMS, DATA, rho=0.0, **cfg)
  assert_differs(local, glob)
  assert_differs(local, no_sam)
  assert_differs(glob, no_sam)


@pytest.mark.parametrize("cfg", [SAM_SGD, ASAM_SGD, SAM_MOMENTUM, ASAM_ADAM],
                         ids=_ids)
def test_pmap_matches_per_shard_reference(cfg):
  params, state = run_pmap(PARAMS, DATA, **cfg)
  assert_replicated((params, state))
  expected, _ = ref_run(PARAMS, DATA, **cfg)
  assert_close(first(params), expected)
  glob, _ = ref_run(PARAMS, DATA, ascent="global", **cfg)
  assert_differs(first(params), glob)


@pytest.mark.parametrize("adaptive,check_vma", [
    (False, True), (True, True), (False, False)],
    ids=["sam-check_vma", "asam-check_vma", "sam-no_check_vma"])
def test_shard_map_matches_per_shard_reference(adaptive, check_vma):
  # check_vma=True: local gradients need mark_varying; check_vma=False: plain
  # jax.grad w.r.t. the replicated params is already local.
  params, _ = run_shard_map(PARAMS, DATA, adaptive=adaptive,
                            check_vma=check_vma, mark=check_vma)
  expected, _ = ref_run(PARAMS, DATA, adaptive=adaptive)
  assert_close(params, expected)
  glob, _ = ref_run(PARAMS, DATA, adaptive=adaptive, ascent="global")
  assert_differs(params, glob)


def test_shard_map_and_pmap_agree_including_state():
  via_pmap, pmap_state = run_pmap(PARAMS, DATA, **SAM_MOMENTUM)
  via_shmap, shmap_state = run_shard_map(PARAMS, DATA, **SAM_MOMENTUM)
  assert_close(via_shmap, first(via_pmap))
  assert_close(shmap_state, first(pmap_state))


def test_mark_varying_is_identity_under_pmap():
  out = jax.pmap(lambda w: sam_optax.mark_varying(w, "batch"),
                 axis_name="batch")(_replicate(PARAMS))
  assert_close(first(out), PARAMS, atol=0, rtol=0)


@pytest.mark.parametrize("mark", [True, False])
def test_mark_varying_makes_grads_local_under_shard_map(mark):
  # The gotcha itself: without mark_varying the gradient w.r.t. replicated
  # params is the sum over the 8 shards.
  x, y, m = DATA

  def grads(params, x, y, m):
    local = sam_optax.mark_varying(params, "batch") if mark else params
    g = jax.grad(loss_fn)(local, x, y, m)
    return jax.tree.map(lambda a: a[None], g)

  shards = NamedSharding(MESH, P("batch"))
  flat = [jax.device_put(a.reshape((N_DEV * PER_DEV,) + a.shape[2:]), shards)
          for a in (x, y, m)]
  f = jax.jit(jax.shard_map(
      grads, mesh=MESH, in_specs=(P(), P("batch"), P("batch"), P("batch")),
      out_specs=P("batch")))
  out = f(jax.tree.map(jnp.asarray, PARAMS), *flat)
  local = [_ref_grad(PARAMS, x[i], y[i], m[i]) for i in range(N_DEV)]
  total = jax.tree.map(lambda *a: sum(a), *local)
  for i in range(N_DEV):
    assert_close(jax.tree.map(lambda a, i=i: a[i], out),
                 local[i] if mark else total)


def test_shard_map_rejects_invariant_grads():
  # The caller forgot mark_varying: under check_vma=True its gradient is the
  # psum over shards, and a per-shard ascent would silently become global.
  with pytest.raises(ValueError, match="mark_varying"):
    run_shard_map(PARAMS, DATA, steps=1, check_vma=True, mark=False)


def test_pmap_sync_ascent_matches_global_reference():
  adaptive = False  # ASAM with sync_ascent: under shard_map below.
  params, state = run_pmap(PARAMS, DATA, adaptive=adaptive, sync_ascent=True)
  assert_replicated((params, state))
  expected, info = ref_run(PARAMS, DATA, adaptive=adaptive, ascent="global")
  assert_close(first(params), expected)
  local, _ = ref_run(PARAMS, DATA, adaptive=adaptive)
  assert_differs(first(params), local)
  np.testing.assert_allclose(first(state).ascent_norm, info["ascent_norm"],
                             rtol=1e-5)


@pytest.mark.parametrize("adaptive,mark", [
    (False, True), (True, True), (False, False)],
    ids=["sam-local_grads", "asam-local_grads", "sam-summed_grads"])
def test_shard_map_sync_ascent_matches_global_reference(adaptive, mark):
  # check_vma=True: the synced ε is invariant over the axis, so the library
  # must make the perturbed params varying, or the gradient grad_fn takes
  # there comes back psummed (x8) and the step is 8 times too long.
  # mark=False: the caller passes the already-summed gradient (what the
  # error message of the previous test suggests with sync_ascent=True); it
  # has the direction of the mean, so the step is the same.
  params, state = run_shard_map(PARAMS, DATA, adaptive=adaptive,
                                check_vma=True, mark=mark, sync_ascent=True)
  expected, info = ref_run(PARAMS, DATA, adaptive=adaptive, ascent="global")
  assert_close(params, expected)
  if mark:
    np.testing.assert_allclose(state.ascent_norm, info["ascent_norm"],
                               rtol=1e-5)


@pytest.mark.parametrize("adaptive,groups", [
    (False, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (True, [[0, 2, 4, 6], [1, 3, 5, 7]]),
], ids=["sam-halves", "asam-interleaved"])
def test_pmap_ascent_groups_match_group_reference(adaptive, groups):
  params, state = run_pmap(PARAMS, DATA, adaptive=adaptive,
                           ascent_groups=groups)
  assert_replicated((params, state))
  expected, info = ref_run(PARAMS, DATA, adaptive=adaptive, ascent=groups)
  assert_close(first(params), expected)
  for other in ("local", "global"):
    ref, _ = ref_run(PARAMS, DATA, adaptive=adaptive, ascent=other)
    assert_differs(first(params), ref)
  np.testing.assert_allclose(first(state).ascent_norm, info["ascent_norm"],
                             rtol=1e-5)


def test_ascent_groups_under_shard_map_is_an_error():
  # axis_index_groups is not supported by shard_map: it must fail loudly
  # rather than silently ignore the groups.
  with pytest.raises(ValueError, match="ascent_groups"):
    run_shard_map(PARAMS, DATA, steps=1,
                  ascent_groups=[[0, 1, 2, 3], [4, 5, 6, 7]])


@pytest.mark.parametrize("eps", [1e-12, 0.0])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_zero_gradient_on_one_shard(adaptive, eps):
  # Shard 5's examples have weight 0: zero loss and zero gradient there, so
  # ε_5 = 0 (not NaN, even with eps = 0) and it contributes ∇L_5 = 0.
  data = make_data(zero_shards=(5,))
  params, state = run_pmap(PARAMS, data, adaptive=adaptive, eps=eps)
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves((params, state)))
  assert_replicated((params, state))
  expected, info = ref_run(PARAMS, data, adaptive=adaptive, eps=eps)
  assert_close(first(params), expected)
  np.testing.assert_allclose(first(state).radius, info["radius"], rtol=1e-5)
  if not adaptive:  # Seven shards with ‖ε‖ = ρ, one with ε = 0.
    np.testing.assert_allclose(first(state).radius,
                               SAM_RHO * 7 / 8, rtol=1e-5)
  if eps:  # Same compiled step as the shard_map tests above.
    params, _ = run_shard_map(PARAMS, data, adaptive=adaptive, eps=eps)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(params))
    assert_close(params, expected)


def test_zero_gradient_on_every_shard_leaves_params_unchanged():
  data = make_data(zero_shards=range(N_DEV))
  params, state = run_pmap(PARAMS, data, eps=0.0)
  assert_close(first(params), PARAMS, atol=0, rtol=0)
  assert float(first(state).ascent_norm) == 0.0
  assert float(first(state).radius) == 0.0


@pytest.mark.parametrize("cfg", [SAM_MOMENTUM, ASAM_ADAM], ids=_ids)
def test_pmap_state_is_replicated_and_logs_mean_norms(cfg):
  _, state = run_pmap(PARAMS, DATA, **cfg)
  # The whole state, base-optimizer state and logging scalars included, is
  # identical on every device (no per-shard drift).
  assert_replicated(state)
  _, info = ref_run(PARAMS, DATA, **cfg)
  s = first(state)
  assert int(s.step_count) == 2
  np.testing.assert_allclose(s.ascent_norm, info["ascent_norm"], rtol=1e-5)
  np.testing.assert_allclose(s.radius, info["radius"],
                             rtol=1e-5)
  if not cfg["adaptive"]:  # ‖ε_i‖ = ρ on every shard.
    np.testing.assert_allclose(s.radius, SAM_RHO, rtol=1e-5)
  # The mean of the local norms, not the norm of the mean gradient.
  _, glob = ref_run(PARAMS, DATA, ascent="global", **cfg)
  assert abs(float(s.ascent_norm) - glob["ascent_norm"]) > 0.05 * glob[
      "ascent_norm"]
  assert s.grad_norm is None and s.perturbation_norm is None


def test_pmap_exact_norms_are_the_mean_local_norms():
  _, state = run_pmap(PARAMS, DATA, exact_norms=True, **ASAM_ADAM)
  assert_replicated(state)
  _, info = ref_run(PARAMS, DATA, **ASAM_ADAM)
  s = first(state)
  np.testing.assert_allclose(s.grad_norm, info["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(s.perturbation_norm, info["perturbation_norm"],
                             rtol=1e-5)


def test_shard_map_state_is_replicated():
  # out_specs=P() with check_vma=True only compiles if every state leaf is
  # invariant over the axis; the logged norms are the per-shard means.
  _, state = run_shard_map(PARAMS, DATA, **SAM_MOMENTUM)
  _, info = ref_run(PARAMS, DATA, **SAM_MOMENTUM)
  assert int(state.step_count) == 2
  np.testing.assert_allclose(state.ascent_norm, info["ascent_norm"], rtol=1e-5)
  np.testing.assert_allclose(state.radius, SAM_RHO, rtol=1e-5)


def test_pmap_value_and_grad_logs_mean_losses():
  params, state = run_pmap(PARAMS, DATA, value_and_grad=True)
  assert_replicated((params, state))
  expected, info = ref_run(PARAMS, DATA)
  assert_close(first(params), expected)
  s = first(state)
  np.testing.assert_allclose(s.perturbed_loss, info["perturbed_loss"],
                             rtol=1e-5)
  np.testing.assert_allclose(s.sharpness,
                             info["perturbed_loss"] - info["loss"],
                             rtol=1e-4, atol=1e-6)
  assert float(s.sharpness) > 0


def test_pmap_microbatched_is_m_sharpness_over_all_microbatches():
  # 2 micro-batches of 2 per device: 16 ε's, 16 SAM gradients averaged.
  params, state = run_pmap(PARAMS, DATA, microbatches=2, microbatched=True)
  assert_replicated((params, state))
  expected, info = ref_run(PARAMS, DATA, m_split=2)
  assert_close(first(params), expected)
  per_device, _ = ref_run(PARAMS, DATA)
  assert_differs(first(params), per_device)
  np.testing.assert_allclose(first(state).ascent_norm, info["ascent_norm"],
                             rtol=1e-5)


def test_unbound_axis_name_under_pmap_raises():
  with pytest.raises(ValueError, match="outside a jax.pmap or jax.shard_map"):
    run_pmap(PARAMS, DATA, steps=1, bound_axis="data")


def test_unbound_axis_name_under_shard_map_raises():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  tx = make_tx(axis_name="batch")
  step = jax.shard_map(
      _step_body(tx, mark="data"), mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data"), P("data")),
      out_specs=(P(), P()))
  x, y, m = (a.reshape((N_DEV * PER_DEV,) + a.shape[2:]) for a in DATA)
  with pytest.raises(ValueError, match="'batch'"):
    jax.jit(step)(PARAMS, tx.init(PARAMS), x, y, m)


def test_axis_name_without_any_map_raises():
  tx = make_tx(axis_name="batch")
  step = jax.jit(_step_body(tx))
  x, y, m = DATA
  with pytest.raises(ValueError, match="axis_name=None"):
    step(PARAMS, tx.init(PARAMS), x[0], y[0], m[0])
