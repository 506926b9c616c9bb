"""Tests for ``sam_optax.diagnostics``: Hessian eigenvalue and landscapes.

Oracles are quadratics, whose Hessian is known exactly and whose slices are
exact parabolas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

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


def test_top_eigenvalue_keeps_the_sign_of_a_negative_dominant_spectrum():
  # Power iteration finds the eigenvalue of largest magnitude, here -5: the
  # Rayleigh quotient keeps its sign (‖Hv‖ would give +5).
  h = jnp.array([-5.0, 1.0, 0.5])
  loss = lambda w: 0.5 * jnp.sum(h * w ** 2)  # noqa: E731
  lam, v = diagnostics.top_hessian_eigenvalue(
      loss, jnp.ones(3), num_iters=40, key=jax.random.key(0))
  np.testing.assert_allclose(lam, -5.0, rtol=1e-5)
  np.testing.assert_allclose(abs(np.asarray(v)), [1.0, 0.0, 0.0], atol=1e-4)


# A tiny tanh network on fixed data: a non-quadratic loss over a pytree of
# three float leaves (20 parameters) and an integer leaf held fixed, whose
# dense Hessian (jax.hessian) is the reference.
_rng = np.random.default_rng(5)
X = jnp.asarray(_rng.normal(size=(16, 3)), jnp.float32)
Y = jnp.asarray(np.sin(3 * _rng.normal(size=16)), jnp.float32)


def net_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          "b1": jnp.asarray(0.5 * rng.normal(size=4), jnp.float32),
          "w2": jnp.asarray(rng.normal(size=4), jnp.float32),
          "step": jnp.asarray(3, jnp.int32)}


def net_loss(params, x=X, y=Y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2) * params["step"]


def dense_spectrum(loss, params):
  """Eigenvalues (descending) and eigenvectors of the dense Hessian."""
  floats = {k: v for k, v in params.items() if k != "step"}
  flat, unravel = ravel_pytree(floats)

  def flat_loss(v):
    return loss({**unravel(v), **{k: v for k, v in params.items()
                                  if k == "step"}})

  h = np.asarray(jax.hessian(flat_loss)(flat), np.float64)
  lam, q = np.linalg.eigh((h + h.T) / 2)
  return lam[::-1], q[:, ::-1]


def tree_rows(tree):
  """A pytree with a leading axis k -> a (k, n) matrix (dict order)."""
  return np.concatenate(
      [np.asarray(tree[k]).reshape(np.shape(tree[k])[0], -1)
       for k in sorted(tree) if k != "step"], axis=1)


def test_top_eigenvalues_match_the_dense_hessian_of_a_pytree_under_jit():
  params = net_params()
  lam, q = dense_spectrum(net_loss, params)
  assert lam[0] > 0 and lam[-1] < 0  # An indefinite Hessian.
  top = jax.jit(lambda p, key: diagnostics.top_hessian_eigenvalues(
      net_loss, p, k=5, key=key, num_iters=20))
  spec = top(params, jax.random.key(0))
  scale = abs(lam).max()
  np.testing.assert_allclose(spec.eigenvalues, lam[:5], atol=1e-5 * scale)
  vectors = tree_rows(spec.eigenvectors)  # (5, 20), ravel_pytree order.
  np.testing.assert_allclose(vectors @ vectors.T, np.eye(5), atol=1e-4)
  np.testing.assert_allclose(abs(np.sum(vectors * q[:, :5].T, axis=1)),
                             np.ones(5), atol=1e-3)
  np.testing.assert_array_less(spec.residuals, 1e-3 * scale)
  assert np.all(np.asarray(spec.eigenvectors["step"]) == 0)


def test_top_eigenvalues_converge_before_full_rank():
  # 12 of 20 steps: the top 2 have converged, and the residuals say so.
  params = net_params(1)
  lam, q = dense_spectrum(net_loss, params)
  spec = diagnostics.top_hessian_eigenvalues(
      net_loss, params, k=2, key=jax.random.key(1), num_iters=12)
  err = np.abs(np.asarray(spec.eigenvalues) - lam[:2])
  np.testing.assert_array_less(err, 1e-3 * abs(lam).max())
  # The residuals are those of the Ritz pairs, ‖Hu − θu‖ with the dense H.
  h = (q * lam) @ q.T
  u = tree_rows(spec.eigenvectors)
  actual = np.linalg.norm(u @ h - np.asarray(spec.eigenvalues)[:, None] * u,
                          axis=1)
  np.testing.assert_allclose(spec.residuals, actual, rtol=0.05, atol=1e-4)
  np.testing.assert_array_less(err, np.asarray(spec.residuals) + 1e-5)


def test_top_eigenvalues_of_a_negative_dominant_spectrum():
  # The largest eigenvalues in value, not in magnitude: 1, 0.5, 0.2 (and the
  # dominant -5 last), all exact with full-rank Lanczos.
  spectrum = np.array([-5.0, 1.0, 0.5, 0.2])
  q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(4, 4)))
  h = jnp.asarray(q @ np.diag(spectrum) @ q.T, jnp.float32)
  loss = lambda w: 0.5 * w @ h @ w  # noqa: E731
  spec = diagnostics.top_hessian_eigenvalues(
      loss, jnp.zeros(4), k=4, key=jax.random.key(0))
  np.testing.assert_allclose(spec.eigenvalues, [1.0, 0.5, 0.2, -5.0],
                             atol=1e-5)


def test_top_eigenvalues_with_repeated_and_zero_eigenvalues():
  # Breakdown of the Krylov space (2 distinct eigenvalues) restarts the
  # iteration: every copy of an eigenvalue is found, none is invented.
  h = jnp.array([2.0, 2.0, 2.0, 0.0, 0.0, 0.0])
  loss = lambda w: 0.5 * jnp.sum(h * w ** 2)  # noqa: E731
  spec = diagnostics.top_hessian_eigenvalues(
      loss, jnp.ones(6), k=6, key=jax.random.key(3))
  np.testing.assert_allclose(spec.eigenvalues, h, atol=1e-5)
  linear = lambda p: jnp.sum(p["w"]) + jnp.sum(p["b"])  # noqa: E731
  spec = diagnostics.top_hessian_eigenvalues(
      linear, make_params(), k=3, key=jax.random.key(0), num_iters=5)
  np.testing.assert_array_equal(spec.eigenvalues, np.zeros(3))
  # Hv = 0 exactly at every step: each restart still adds a unit vector.
  u = tree_rows(spec.eigenvectors)
  np.testing.assert_allclose(u @ u.T, np.eye(3), atol=1e-5)


def test_top_eigenvalues_rejects_more_steps_than_parameters():
  with pytest.raises(ValueError, match="num_iters"):
    diagnostics.top_hessian_eigenvalues(
        quadratic, make_params(), k=3, key=jax.random.key(0), num_iters=11)


def test_spectral_density_of_a_known_spectrum():
  params = make_params()
  density = diagnostics.hessian_spectral_density(
      quadratic, params, key=jax.random.key(0), num_probes=64,
      num_iters=10, num_points=1024)
  # Full-rank Lanczos: every probe's Ritz values are the eigenvalues.
  np.testing.assert_allclose(np.asarray(density.nodes),
                             np.tile(np.sort(SPECTRUM), (64, 1)), atol=1e-4)
  np.testing.assert_allclose(density.weights.sum(1), np.ones(64), rtol=1e-5)
  # A density: integrates to 1, and its mean is that of the quadrature.
  dt = float(density.grid[1] - density.grid[0])
  np.testing.assert_allclose(density.density.sum() * dt, 1.0, rtol=1e-3)
  probe_means = np.sum(density.weights * density.nodes, axis=1)
  np.testing.assert_allclose(np.sum(density.grid * density.density) * dt,
                             probe_means.mean(), rtol=1e-3)
  # Each probe's mean is vᵀHv for a random unit v: trace/n on average.
  # (std of the mean over 64 probes: about 0.07 here.)
  np.testing.assert_allclose(probe_means.mean(), SPECTRUM.mean(), atol=0.2)
  # The weights are the squared projections of the probe on the
  # eigenvectors: the probe mass at the top eigenvalue is 1/n on average.
  np.testing.assert_allclose(density.weights[:, -1].mean(), 0.1, atol=0.05)


def test_spectral_density_on_a_pytree_resolves_two_clusters():
  # Eigenvalues 1 (x8) and 10 (x2): SLQ puts 80% of the mass near 1.
  h = jnp.asarray([1.0] * 8 + [10.0] * 2)
  loss = lambda p: 0.5 * jnp.sum(  # noqa: E731
      h * jnp.concatenate([p["a"].ravel(), p["b"]]) ** 2)
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones(4)}
  density = diagnostics.hessian_spectral_density(
      loss, params, key=jax.random.key(1), num_probes=32, num_points=2048,
      sigma=0.1)
  assert float(density.sigma) == pytest.approx(0.1)
  dt = float(density.grid[1] - density.grid[0])
  low = float(jnp.sum(jnp.where(density.grid < 5, density.density, 0)) * dt)
  np.testing.assert_allclose(low, 0.8, atol=0.1)


def test_low_precision_leaves_keep_their_dtype():
  # A bf16 leaf next to a float32 one: the Lanczos vectors are float32, the
  # tangents and the returned eigenvectors have each leaf's dtype.
  h = jnp.array([4.0, 2.0, 1.0, 0.5, -1.0, 0.1])

  def loss(p):
    w = jnp.concatenate([p["a"].astype(jnp.float32), p["b"]])
    return 0.5 * jnp.sum(h * w ** 2)

  params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(3, jnp.float32)}
  spec = diagnostics.top_hessian_eigenvalues(loss, params, k=3,
                                             key=jax.random.key(0))
  assert spec.eigenvalues.dtype == jnp.float32
  np.testing.assert_allclose(spec.eigenvalues, [4.0, 2.0, 1.0], rtol=1e-2)
  assert spec.eigenvectors["a"].dtype == jnp.bfloat16
  assert spec.eigenvectors["b"].dtype == jnp.float32


def test_axis_name_outside_a_map_is_a_clear_error():
  with pytest.raises(ValueError, match="outside a jax.pmap"):
    diagnostics.top_hessian_eigenvalues(
        quadratic, make_params(), k=2, key=jax.random.key(0),
        axis_name="batch")
