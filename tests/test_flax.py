"""Tests for ``sam_optax.flax``: NNX and linen, BatchNorm and dropout.

Every step is compared with a hand-written SAM step on the same model: the
clean gradient ``g`` at ``w``, ``ε = ρ g / ‖g‖``, the gradient at ``w + ε``
with the *pre-step* non-parameter state (BatchNorm running statistics, the
dropout RNG state or key), and an SGD update. The running statistics after
the step must be those of one clean forward pass: the perturbed pass's are
dropped.

Random keys use the ``'rbg'`` PRNG implementation (:func:`key`): XLA:CPU
takes seconds to compile threefry's random bits into every function with
dropout or random initialisation, and nothing tested here depends on the
generator. The doctests of ``sam_optax.flax`` use the default one.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import sam_optax
import sam_optax.flax as sam_flax

LR = 0.1
RHO = 0.1
ATOL = 1e-6
RTOL = 1e-5


def _data(seed=1, batch=16):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4)).astype(np.float32)
  y = np.arange(batch) % 3
  return jnp.asarray(x), jnp.asarray(y)


def key(seed):
  return jax.random.key(seed, impl="rbg")


def _np(x):
  if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def assert_close(actual, expected):
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(
          _np(a), _np(e), atol=ATOL, rtol=RTOL),
      actual, expected)


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def sgd_sam_update(params, grads, grad_at):
  """The hand-written SAM step: ``w − lr ∇L(w + ρ g/‖g‖)``."""
  norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))
  perturbed = jax.tree.map(lambda w, g: w + RHO * g / norm, params, grads)
  g_sam = grad_at(perturbed)
  return jax.tree.map(lambda w, g: w - LR * g, params, g_sam), perturbed


# ----------------------------------------------------------------------- NNX


class NnxNet(nnx.Module):
  """Linear → BatchNorm → ReLU → Dropout → Linear: 83 params."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(nnx.relu(self.bn(self.dense(x)))))


@functools.cache
def _nnx_net_state():
  graphdef, state = nnx.split(NnxNet(nnx.Rngs(key(0))))
  return graphdef, nnx.as_pure(state)


def nnx_net():
  """A fresh ``NnxNet`` (built once, then copied)."""
  return nnx.merge(*_nnx_net_state())  # Pure state: new Variables.


def nnx_loss(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def nnx_loss_aux(model, x, y):
  logits = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, logits


@functools.cache
def nnx_reference(steps=2):
  """Hand-written SAM steps on a functional copy of ``NnxNet``.

  Returns, for each step, the params and the non-param state after it, the
  clean and perturbed losses, and the BatchNorm statistics a leaky step would
  leave (the perturbed pass's updates applied after the clean pass's).
  """
  x, y = _data()
  graphdef, params, rest = nnx.split(nnx_net(), nnx.Param, ...)

  def loss_and_rest(p, r):
    m = nnx.merge(graphdef, p, r)
    loss = nnx_loss(m, x, y)
    return loss, nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param)))

  @jax.jit
  def ref_step(params, rest):
    # The clean pass: gradient, loss and the new running statistics.
    (loss, new_rest), g = jax.value_and_grad(loss_and_rest, has_aux=True)(
        params, rest)
    # The perturbed pass sees the pre-step state: the same dropout mask.
    def grad_at(p):
      return jax.grad(loss_and_rest, has_aux=True)(p, rest)[0]

    new_params, perturbed = sgd_sam_update(params, g, grad_at)
    perturbed_loss = loss_and_rest(perturbed, rest)[0]
    leaky_stats = loss_and_rest(perturbed, new_rest)[1]["bn"]
    return new_params, new_rest, loss, perturbed_loss, leaky_stats

  out = []
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  for _ in range(steps):
    out.append(ref_step(params, rest))
    params, rest = out[-1][:2]
  return out


def test_nnx_jit_steps_match_hand_written_reference():
  """Two ``nnx.jit`` steps; also ``has_aux`` and the recorded sharpness."""
  model = nnx_net()
  x, y = _data()
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO, value_and_grad=True)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    (loss, logits), grads, grad_fn = sam_flax.nnx_value_and_grad(
        model, nnx_loss_aux, x, y, has_aux=True, value_and_grad=True)
    optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
    return loss, logits

  reference = nnx_reference()
  for i, (params, rest, ref_loss, ref_perturbed, leaky) in enumerate(
      reference):
    loss, logits = step(model, optimizer, x, y)
    assert logits.shape == (16, 3)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    assert_close(nnx.as_pure(nnx.state(model, nnx.Param)), params)
    # The running statistics are those of the clean passes only, and one RNG
    # draw per step: the perturbed passes touched none of the model's state.
    assert_close(nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param))), rest)
    assert int(model.drop.rngs.count[...]) == i + 1
    assert max_abs_diff(nnx.as_pure(nnx.state(model.bn)), leaky) > 1e-3
    np.testing.assert_allclose(optimizer.opt_state.perturbed_loss[...],
                               ref_perturbed, rtol=RTOL)
    np.testing.assert_allclose(optimizer.opt_state.sharpness[...],
                               ref_perturbed - ref_loss, rtol=1e-4, atol=ATOL)
    assert ref_perturbed - ref_loss > 1e-3


def test_nnx_grad_fn_at_the_clean_params_gives_the_clean_gradient():
  """At ε = 0 the perturbed pass is the clean pass: same mask, same BN."""
  model = nnx_net()
  x, y = _data()

  @nnx.jit
  def grads_twice(model):
    _, grads, grad_fn = sam_flax.nnx_value_and_grad(model, nnx_loss, x, y)
    at_clean = grad_fn(nnx.as_pure(nnx.state(model, nnx.Param)))
    # A later clean pass draws another mask: the comparison can tell.
    later = nnx.grad(nnx_loss)(model, x, y)
    return nnx.as_pure(grads), at_clean, nnx.as_pure(later)

  grads, at_clean, later = grads_twice(model)
  assert_close(at_clean, grads)
  assert max_abs_diff(later, grads) > 1e-3


class MaskProbe(nnx.Module):
  """L(w) = Σ w · dropout(1) + 0 · Σ BN(x).

  ∂L/∂w is the dropout mask (0 or 2). The parameter-free BatchNorm only
  tracks the mean of ``x``: after k clean passes its running mean is
  (1 − 0.99^k) · mean(x).
  """

  def __init__(self, rngs=None):
    self.w = nnx.Param(jnp.zeros(64))
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.bn = nnx.BatchNorm(3, use_bias=False, use_scale=False,
                            rngs=nnx.Rngs(0))

  def __call__(self, x, rngs=None):
    probe = jnp.sum(self.w * self.drop(jnp.ones(64), rngs=rngs))
    return probe + 0.0 * jnp.sum(self.bn(x))


@pytest.mark.parametrize("rngs_in,jit", [("module", False),
                                         ("argument", True)])
def test_nnx_perturbed_pass_sees_the_clean_dropout_mask(rngs_in, jit):
  if rngs_in == "module":
    model, args = MaskProbe(nnx.Rngs(dropout=key(3))), ()
  else:
    model, args = MaskProbe(), (nnx.Rngs(dropout=key(3)),)
  x = jnp.asarray(np.arange(24, dtype=np.float32).reshape(8, 3))

  def loss_fn(m, x, *rngs):
    return m(x, *rngs)

  optimizer = nnx.Optimizer(model, sam_optax.sam(optax.sgd(1.0), rho=RHO),
                            wrt=nnx.Param)

  def step(model, optimizer, x, *args):
    _, grads, grad_fn = sam_flax.nnx_value_and_grad(model, loss_fn, x, *args)
    optimizer.update(model, grads, grad_fn=grad_fn)
    return grads

  step = nnx.jit(step) if jit else step
  masks = []
  for k in (1, 2):
    before = model.w[...]
    clean_mask = step(model, optimizer, x, *args)["w"][...]
    # L is linear in w, so the SGD step is minus the perturbed pass's mask.
    perturbed_mask = before - model.w[...]
    np.testing.assert_array_equal(perturbed_mask, clean_mask)
    assert set(np.unique(clean_mask)) == {0.0, 2.0}
    masks.append(clean_mask)
    np.testing.assert_allclose(model.bn.mean[...],
                               (1 - 0.99 ** k) * np.mean(x, axis=0),
                               rtol=RTOL)
  assert np.any(masks[0] != masks[1])  # The RNG stream advances per step.


# --------------------------------------------------------------------- linen


class LinenNet(nn.Module):
  """Dense → BatchNorm → ReLU → Dropout → Dense: 83 params."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


NET = LinenNet()


def linen_loss(params, batch_stats, x, y, key):
  logits, updates = NET.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True,
      mutable=["batch_stats"], rngs={"dropout": key})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates["batch_stats"]


@functools.cache
def _linen_variables():
  return jax.jit(NET.init, static_argnames="train")(
      key(0), _data()[0], train=False)


def linen_state(tx):
  variables = _linen_variables()
  return sam_flax.SAMTrainState.create(
      apply_fn=NET.apply, params=variables["params"], tx=tx,
      batch_stats=variables["batch_stats"])


@jax.jit
def linen_reference(params, batch_stats, x, y, key):
  """One hand-written SAM step.

  Returns the new params, the new batch stats (from the clean pass), the
  clean and perturbed losses, and the batch stats a leaky step would leave.
  """
  (loss, new_stats), g = jax.value_and_grad(linen_loss, has_aux=True)(
      params, batch_stats, x, y, key)

  def grad_at(p):
    return jax.grad(linen_loss, has_aux=True)(p, batch_stats, x, y, key)[0]

  params, perturbed = sgd_sam_update(params, g, grad_at)
  perturbed_loss = linen_loss(perturbed, batch_stats, x, y, key)[0]
  leaky_stats = linen_loss(perturbed, new_stats, x, y, key)[1]
  return params, new_stats, loss, perturbed_loss, leaky_stats


def test_linen_train_step_matches_hand_written_reference():
  """Two jitted steps, with the sharpness recorded (``value_and_grad``)."""
  x, y = _data()
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO, value_and_grad=True)
  state = linen_state(tx)
  step = jax.jit(lambda s, x, y, k: s.train_step(
      linen_loss, x, y, k, value_and_grad=True))
  params, stats = state.params, state.batch_stats
  for i in range(2):
    k = key(10 + i)
    params, stats, ref_loss, ref_perturbed, leaky = linen_reference(
        params, stats, x, y, k)
    state, loss = step(state, x, y, k)
    assert_close(state.params, params)
    # The new statistics are those of the clean pass alone.
    assert_close(state.batch_stats, stats)
    assert max_abs_diff(state.batch_stats, leaky) > 1e-3
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    np.testing.assert_allclose(state.opt_state.perturbed_loss, ref_perturbed,
                               rtol=RTOL)
    np.testing.assert_allclose(state.opt_state.sharpness,
                               ref_perturbed - ref_loss, rtol=1e-4,
                               atol=ATOL)
  assert int(state.step) == 2


def test_linen_perturbed_pass_sees_the_clean_dropout_mask():
  probe = nn.Dropout(0.5, deterministic=False)

  def loss_fn(params, batch_stats, key):
    mask = probe.apply({}, jnp.ones(64), rngs={"dropout": key})
    return jnp.sum(params["w"] * mask), batch_stats

  state = sam_flax.SAMTrainState.create(
      apply_fn=None, params={"w": jnp.zeros(64)},
      tx=sam_optax.sam(optax.sgd(1.0), rho=RHO), batch_stats={})
  k = key(3)
  new, _ = jax.jit(lambda s: s.train_step(loss_fn, k))(state)
  clean_mask = jax.jit(jax.grad(loss_fn, has_aux=True))(
      state.params, {}, k)[0]["w"]
  np.testing.assert_array_equal(state.params["w"] - new.params["w"],
                                clean_mask)
  assert set(np.unique(clean_mask)) == {0.0, 2.0}


def test_linen_apply_gradients_routes_keyword_arguments():
  state = linen_state(optax.sgd(LR))
  grads = jax.tree.map(jnp.ones_like, state.params)
  marker = jax.tree.map(jnp.zeros_like, state.batch_stats)

  # A plain optimizer ignores grad_fn and value; fields are replaced.
  new = jax.jit(lambda s: s.apply_gradients(
      grads=grads, grad_fn=lambda p: 1 / 0, value=1.0, batch_stats=marker))(
          state)
  assert_close(new.params, jax.tree.map(lambda w: w - LR, state.params))
  assert_close(new.batch_stats, marker)
  assert int(new.step) == 1

  # SAM receives grad_fn and value (recorded as the clean loss).
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO, value_and_grad=True)
  state = linen_state(tx)
  zero = jax.tree.map(jnp.zeros_like, grads)
  new = jax.jit(lambda s: s.apply_gradients(
      grads=grads, grad_fn=lambda p: (2.5, zero), value=1.0))(state)
  assert_close(new.params, state.params)
  np.testing.assert_allclose(new.opt_state.sharpness, 1.5)
  with pytest.raises(ValueError, match="grad_fn"):
    jax.eval_shape(lambda s: s.apply_gradients(grads=grads), state)


# ------------------------------------------------------------------ import


def test_core_does_not_import_flax_and_missing_flax_is_explained():
  code = (
      "import sys\n"
      "import sam_optax\n"
      "assert 'flax' not in sys.modules, 'import sam_optax imported flax'\n"
      "sys.modules['flax'] = None  # As if flax were not installed.\n"
      "try:\n"
      "  import sam_optax.flax\n"
      "except ImportError as e:\n"
      "  assert 'pip install' in str(e), e\n"
      "else:\n"
      "  raise AssertionError('no ImportError')\n")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_nnx_wrt_mismatch_names_wrt():
  class TwoLayers(nnx.Module):
    def __init__(self, rngs):
      self.body = nnx.Linear(2, 3, rngs=rngs)
      self.head = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
      return self.head(self.body(x))

  model = TwoLayers(nnx.Rngs(0))
  x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
  loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)  # noqa: E731
  head_only = nnx.All(nnx.Param, nnx.PathContains("head"))
  optimizer = nnx.Optimizer(model, sam_optax.sam(optax.sgd(0.1)),
                            wrt=head_only)
  grad_fn = sam_optax.flax.nnx_grad_fn(model, loss_fn, x, y)  # wrt=Param
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, head_only))(model, x, y)
  with pytest.raises(ValueError, match="same `wrt`"):
    optimizer.update(model, grads, grad_fn=grad_fn)
  # With the same filter it works.
  grad_fn = sam_optax.flax.nnx_grad_fn(model, loss_fn, x, y, wrt=head_only)
  before = model.body.kernel.value
  optimizer.update(model, grads, grad_fn=grad_fn)
  np.testing.assert_array_equal(model.body.kernel.value, before)
