"""Tests for ``sam_optax.diagnostics``: Hessian eigenvalue and landscapes.

Oracles are quadratics, whose Hessian is known exactly and whose slices are
exact parabolas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import diagnostics

# A quadratic ½ wᵀHw on a dict of a (3, 2) matrix and a (4,) vector (10
# parameters), with a known spectrum and a clear gap at the top.
SPECTRUM = np.array([7.0, 4.0, 3.0, 2.5, 2.0, 1.0, 0.5, 0.2, 0.1, -0.3])
_q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(10, 10)))
H = jnp.asarray(_q @ np.diag(SPECTRUM) @ _q.T, jnp.float32)


def flatten(params):
  return jnp.concatenate([params["w"].ravel(), params["b"]])


def quadratic(params):
  v = flatten(params)
  return 0.5 * v @ H @ v


def make_params(seed=1):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=4), jnp.float32)}


def test_hessian_vector_product_is_exact():
  params = make_params()
  v = make_params(seed=2)
  hv = diagnostics.hessian_vector_product(quadratic, params, v)
  np.testing.assert_allclose(flatten(hv), H @ flatten(v), rtol=1e-5,
                             atol=1e-5)


def test_top_eigenvalue_of_a_known_spectrum_under_jit():
  # num_iters may be traced: one compiled program for all the calls.
  top = jax.jit(lambda p, key, n: diagnostics.top_hessian_eigenvalue(
      quadratic, p, num_iters=n, key=key))
  for seed in (0, 1):
    lam, v = top(make_params(), jax.random.key(seed), 40)
    np.testing.assert_allclose(lam, SPECTRUM[0], rtol=1e-3)
    vec = np.asarray(flatten(v))
    np.testing.assert_allclose(np.linalg.norm(vec), 1.0, rtol=1e-5)
    # The eigenvector, up to sign.
    np.testing.assert_allclose(abs(vec @ _q[:, 0]), 1.0, rtol=1e-3)
  # Too few iterations on a crowded spectrum do not converge: the check above
  # is a real one.
  lam, _ = top(make_params(), jax.random.key(0), 1)
  assert abs(float(lam) - SPECTRUM[0]) > 1e-2
  assert top._cache_size() == 1


def test_top_eigenvalue_of_a_zero_hessian_is_zero_not_nan():
  linear = lambda p: jnp.sum(p["w"]) + jnp.sum(p["b"])  # noqa: E731
  lam, v = diagnostics.top_hessian_eigenvalue(
      linear, make_params(), num_iters=3, key=jax.random.key(0))
  assert float(lam) == 0.0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(v))


def norms(x, axis):
  return np.linalg.norm(np.asarray(x), axis=axis)


def test_filter_normalized_direction():
  params = {"kernel": jnp.asarray(np.arange(1.0, 13.0).reshape(2, 3, 2),
                                  jnp.float32),
            "bias": jnp.ones(2), "scale": jnp.ones(())}
  d = diagnostics.filter_normalized_direction(jax.random.key(0), params)
  # One filter per slice along the last axis: same norm as the weights'.
  np.testing.assert_allclose(norms(d["kernel"], (0, 1)),
                             norms(params["kernel"], (0, 1)), rtol=1e-5)
  assert np.all(np.asarray(d["bias"]) == 0)
  assert np.asarray(d["scale"]) == 0
  d = diagnostics.filter_normalized_direction(
      jax.random.key(0), params, filter_axis=0, ignore_1d=False)
  np.testing.assert_allclose(norms(d["kernel"], (1, 2)),
                             norms(params["kernel"], (1, 2)), rtol=1e-5)
  np.testing.assert_allclose(norms(d["bias"], None), np.sqrt(2), rtol=1e-5)
  np.testing.assert_allclose(abs(np.asarray(d["scale"])), 1.0, rtol=1e-5)


@pytest.mark.parametrize("ignore_1d", [True, False])
def test_1d_slice_of_a_quadratic_is_the_exact_parabola(ignore_1d):
  params = make_params()
  line = diagnostics.loss_landscape_1d(quadratic, params, jax.random.key(3),
                                       num_points=9, span=2.0,
                                       ignore_1d=ignore_1d)
  np.testing.assert_allclose(line.coordinates, np.linspace(-2, 2, 9))
  w, d = np.asarray(flatten(params)), np.asarray(flatten(line.direction))
  h = np.asarray(H, np.float64)
  t = np.asarray(line.coordinates, np.float64)
  # L(w + t d) = L(w) + t gᵀd + ½ t² dᵀHd, with g = Hw.
  expected = (0.5 * w @ h @ w + t * ((h @ w) @ d)
              + 0.5 * t ** 2 * (d @ h @ d))
  np.testing.assert_allclose(line.losses, expected, rtol=1e-5, atol=1e-5)
  assert (np.abs(d[6:]).sum() == 0) == ignore_1d  # The bias "b".


def test_2d_slice_layout_and_values():
  params = make_params()
  plane = diagnostics.loss_landscape_2d(quadratic, params, jax.random.key(4),
                                        num_points=5, span=1.0)
  assert plane.losses.shape == (5, 5)
  d1, d2 = (np.asarray(flatten(d)) for d in plane.directions)
  assert np.linalg.norm(d1 - d2) > 0.1  # Two different directions.
  w, h = np.asarray(flatten(params)), np.asarray(H, np.float64)
  for i, j in ((0, 4), (3, 1), (2, 2)):  # losses[j, i] at (x[i], y[j]).
    p = w + float(plane.x[i]) * d1 + float(plane.y[j]) * d2
    np.testing.assert_allclose(plane.losses[j, i], 0.5 * p @ h @ p,
                               rtol=1e-5)
