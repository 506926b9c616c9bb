"""Tests for the ascent directions (``sam_optax.ascent_direction``)."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import helpers

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)
shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    min_size=1, max_size=4)


def global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                           for x in jax.tree.leaves(tree))))


@SETTINGS
@hypothesis.given(shapes=shapes, seed=st.integers(0, 2**16),
                  rho=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 1e3))
def test_sam_perturbation_has_norm_rho(shapes, seed, rho, scale):
  grads = helpers.random_tree(seed, shapes, scale)
  hypothesis.assume(global_norm(grads) > 1e-6)
  eps = sam_optax.ascent_direction(grads, grads, rho).epsilon
  np.testing.assert_allclose(global_norm(eps), rho, rtol=1e-5)


@SETTINGS
@hypothesis.given(shapes=shapes, seed=st.integers(0, 2**16),
                  rho=st.floats(1e-3, 10.0), eta=st.floats(0.0, 1.0))
def test_asam_perturbation_has_norm_rho_in_scaled_coordinates(
    shapes, seed, rho, eta):
  # ASAM's constraint is ‖T⁻¹ε‖ = ρ, and ε = T·(ρ·Tg/‖Tg‖).
  grads = helpers.random_tree(seed, shapes)
  params = helpers.random_tree(seed + 1, shapes)
  t = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
  hypothesis.assume(global_norm(jax.tree.map(jnp.multiply, t, grads)) > 1e-6)
  hypothesis.assume(min(float(jnp.min(x)) for x in jax.tree.leaves(t)) > 1e-3)
  eps = sam_optax.ascent_direction(
      grads, params, rho, adaptive=True, eta=eta).epsilon
  np.testing.assert_allclose(
      global_norm(jax.tree.map(jnp.divide, eps, t)), rho, rtol=1e-4)


def test_sam_direction_is_normalised_gradient():
  grads = {"x": jnp.array([3.0, 0.0]), "y": jnp.array([[4.0]])}
  p = sam_optax.ascent_direction(grads, grads, rho=2.0)
  np.testing.assert_allclose(p.epsilon["x"], [1.2, 0.0], rtol=1e-6)
  np.testing.assert_allclose(p.epsilon["y"], [[1.6]], rtol=1e-6)
  np.testing.assert_allclose(p.ascent_norm, 5.0)
  np.testing.assert_allclose(p.radius, 2.0)


def test_asam_matches_hand_formula():
  w = jnp.array([1.0, -2.0, 0.0, 0.5])
  g = jnp.array([0.3, 0.1, -2.0, 1.0])
  rho, eta = 0.7, 0.01
  t = jnp.abs(w) + eta
  expected = rho * t**2 * g / jnp.linalg.norm(t * g)
  eps = sam_optax.ascent_direction(
      {"w": g}, {"w": w}, rho, adaptive=True, eta=eta).epsilon["w"]
  np.testing.assert_allclose(eps, expected, rtol=1e-6)


def test_asam_is_scale_invariant_at_eta_zero():
  # Rescaling a layer w → c·w (so that g → g/c for a scale-invariant loss)
  # must rescale that layer's ε by c and leave the others untouched.
  params = helpers.random_tree(0, [(3, 2), (4,)])
  grads = helpers.random_tree(1, [(3, 2), (4,)])
  c = 7.5
  scaled_params = {"leaf0": c * params["leaf0"], "leaf1": params["leaf1"]}
  scaled_grads = {"leaf0": grads["leaf0"] / c, "leaf1": grads["leaf1"]}
  eps = sam_optax.ascent_direction(grads, params, 0.5, adaptive=True,
                                   eta=0.0).epsilon
  eps2 = sam_optax.ascent_direction(scaled_grads, scaled_params, 0.5,
                                    adaptive=True, eta=0.0).epsilon
  np.testing.assert_allclose(eps2["leaf0"], c * eps["leaf0"], rtol=1e-5)
  np.testing.assert_allclose(eps2["leaf1"], eps["leaf1"], rtol=1e-5)
  # Plain SAM is not scale invariant: the same check fails for it.
  sam1 = sam_optax.ascent_direction(grads, params, 0.5).epsilon
  sam2 = sam_optax.ascent_direction(scaled_grads, scaled_params, 0.5).epsilon
  assert not np.allclose(sam2["leaf0"], c * sam1["leaf0"], rtol=1e-2)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("eps", [1e-12, 0.0])
def test_zero_gradient_gives_zero_perturbation(adaptive, eps):
  zeros = {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
  p = sam_optax.ascent_direction(zeros, zeros, 0.05, adaptive=adaptive,
                                 eps=eps)
  for leaf in jax.tree.leaves(p.epsilon):
    np.testing.assert_array_equal(leaf, 0.0)
  assert float(p.ascent_norm) == 0.0 and float(p.radius) == 0.0
  # Also under jit, and differentiated: the guarded division must not put a
  # NaN in the gradient of ε (jnp.where's unselected branch would).
  def sum_of_eps(g):
    return optax.tree.sum(sam_optax.ascent_direction(
        g, g, 0.05, adaptive=adaptive, eps=eps).epsilon)
  value, grad = jax.jit(jax.value_and_grad(sum_of_eps))(zeros)
  assert float(value) == 0.0
  chex.assert_tree_all_finite(grad)


def test_mask_excludes_leaves_from_perturbation_and_norm():
  grads = {"kernel": jnp.array([[3.0, 4.0]]), "bias": jnp.array([100.0])}
  for mask in (
      {"kernel": True, "bias": False},
      {"kernel": jnp.array(True), "bias": jnp.array(False)},
      lambda p: {"kernel": True, "bias": False},
      sam_optax.ndim_mask(),
      sam_optax.path_mask(lambda path, leaf: path == "kernel"),
  ):
    p = sam_optax.ascent_direction(grads, grads, 1.0, mask=mask)
    np.testing.assert_allclose(p.epsilon["kernel"], [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(p.epsilon["bias"], [0.0])
    np.testing.assert_allclose(p.ascent_norm, 5.0, rtol=1e-6)


def test_prefix_mask_and_sam_on():
  grads = {"enc": {"w": jnp.ones((2, 2)), "scale": jnp.ones(2)},
           "head": jnp.ones(3)}
  p = sam_optax.ascent_direction(grads, grads, 1.0,
                                 mask={"enc": True, "head": False})
  np.testing.assert_array_equal(p.epsilon["head"], 0.0)
  np.testing.assert_allclose(p.ascent_norm, np.sqrt(6.0), rtol=1e-6)
  # SAM-ON: perturb only the normalisation parameters (1-D leaves here).
  only_norm = sam_optax.path_mask(lambda path, leaf: jnp.ndim(leaf) == 1)
  p = sam_optax.ascent_direction(grads, grads, 1.0, mask=only_norm)
  np.testing.assert_array_equal(p.epsilon["enc"]["w"], 0.0)
  assert float(jnp.abs(p.epsilon["enc"]["scale"]).sum()) > 0


def test_bad_mask_is_rejected():
  grads = {"a": jnp.ones(2), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="structure"):
    sam_optax.ascent_direction(grads, grads, 1.0, mask={"a": True})
  with pytest.raises(ValueError, match="booleans"):
    sam_optax.ascent_direction(grads, grads, 1.0, mask={"a": 1.0, "b": 0.5})


def test_adaptive_mask_uses_identity_scaling_for_biases():
  params = {"kernel": jnp.array([[2.0, -1.0]]), "bias": jnp.array([0.0])}
  grads = {"kernel": jnp.array([[1.0, 1.0]]), "bias": jnp.array([1.0])}
  eta, rho = 0.01, 0.5
  p = sam_optax.ascent_direction(grads, params, rho, adaptive=True, eta=eta,
                                 adaptive_mask=sam_optax.exclude_biases())
  t = {"kernel": jnp.abs(params["kernel"]) + eta, "bias": jnp.ones(1)}
  tg = jax.tree.map(jnp.multiply, t, grads)
  norm = global_norm(tg)
  np.testing.assert_allclose(p.epsilon["bias"], rho * 1.0 / norm, rtol=1e-6)
  np.testing.assert_allclose(
      p.epsilon["kernel"], rho * t["kernel"] ** 2 / norm, rtol=1e-6)


def test_non_float_leaves_are_not_perturbed():
  params = {"w": jnp.ones(2), "step": jnp.array(3, jnp.int32)}
  grads = {"w": jnp.ones(2), "step": jnp.array(0, jnp.int32)}
  p = sam_optax.ascent_direction(grads, params, 1.0)
  np.testing.assert_allclose(global_norm(p.epsilon), 1.0, rtol=1e-6)
  perturbed = sam_optax._core.perturbation.perturb(params, p.epsilon)
  assert perturbed["step"].dtype == jnp.int32 and int(perturbed["step"]) == 3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_norm_is_accumulated_in_float32(dtype):
  # 512 entries of 300: ‖g‖² = 4.6e7 overflows float16 (max 65504).
  grads = {"w": jnp.full((512,), 300.0, dtype)}
  p = sam_optax.ascent_direction(grads, grads, 0.05)
  assert p.ascent_norm.dtype == jnp.float32
  assert p.epsilon["w"].dtype == jnp.float32
  np.testing.assert_allclose(p.ascent_norm, 300.0 * np.sqrt(512), rtol=1e-3)
  np.testing.assert_allclose(global_norm(p.epsilon), 0.05, rtol=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_eps_enters_the_denominator(adaptive):
  # A large eps makes its place in the formula visible: ρ·Tg/(‖Tg‖ + eps).
  w = jnp.array([1.0, -2.0, 0.5])
  g = jnp.array([3.0, 0.0, 4.0])
  t = jnp.abs(w) + 0.01 if adaptive else jnp.ones(3)
  for eps in (0.0, 0.5, 5.0):
    p = sam_optax.ascent_direction({"w": g}, {"w": w}, 0.3, eps=eps,
                                   adaptive=adaptive, eta=0.01)
    norm = jnp.linalg.norm(t * g)
    np.testing.assert_allclose(p.epsilon["w"], 0.3 * t * t * g / (norm + eps),
                               rtol=1e-6)
    np.testing.assert_allclose(p.radius, 0.3 * norm / (norm + eps), rtol=1e-6)


def test_exact_norms_are_opt_in_and_exact_for_asam():
  w = {"k": jnp.array([[1.0, -2.0], [0.5, 0.0]]), "b": jnp.array([0.3, -1.0])}
  g = {"k": jnp.array([[0.2, 1.0], [-3.0, 0.4]]), "b": jnp.array([1.0, 2.0])}
  rho, eta = 0.7, 0.05
  cheap = sam_optax.ascent_direction(g, w, rho, adaptive=True, eta=eta)
  assert cheap.grad_norm is None and cheap.norm is None
  p = sam_optax.ascent_direction(g, w, rho, adaptive=True, eta=eta,
                                 exact_norms=True)
  chex.assert_trees_all_equal(p.epsilon, cheap.epsilon)
  t = jax.tree.map(lambda x: jnp.abs(x) + eta, w)
  np.testing.assert_allclose(p.grad_norm, global_norm(g), rtol=1e-6)
  np.testing.assert_allclose(p.norm, global_norm(p.epsilon), rtol=1e-6)
  np.testing.assert_allclose(
      p.ascent_norm, global_norm(jax.tree.map(jnp.multiply, t, g)),
      rtol=1e-6)
  np.testing.assert_allclose(
      p.radius, global_norm(jax.tree.map(jnp.divide, p.epsilon, t)),
      rtol=1e-6)
  # For SAM the exact norms are the cheap ones.
  s = sam_optax.ascent_direction(g, w, rho, exact_norms=True)
  assert float(s.grad_norm) == float(s.ascent_norm)
  assert float(s.norm) == float(s.radius)


@pytest.mark.parametrize("adaptive", [False, True])
def test_float64_perturbation_is_exact(adaptive):
  # The norm is accumulated in float64 when a perturbed leaf is float64
  # (the float32 norm gave 1.8e-8 relative error).
  rng = np.random.default_rng(3)
  w64 = rng.normal(size=1000) * np.exp(rng.normal(size=1000) * 3)
  g64 = rng.normal(size=1000) * np.exp(rng.normal(size=1000) * 3)
  t = np.abs(w64) + 0.01 if adaptive else np.ones_like(w64)
  expected = 0.05 * t * t * g64 / np.linalg.norm(t * g64)
  with jax.enable_x64(True):
    grads = {"w": jnp.asarray(g64), "f32": jnp.zeros(3, jnp.float32)}
    params = {"w": jnp.asarray(w64), "f32": jnp.ones(3, jnp.float32)}
    p = sam_optax.ascent_direction(grads, params, 0.05, adaptive=adaptive,
                                   eps=0.0)
    assert p.epsilon["w"].dtype == jnp.float64
    assert p.ascent_norm.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(p.epsilon["w"]), expected,
                               rtol=1e-12)
