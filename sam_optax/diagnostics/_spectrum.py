r"""The Hessian spectrum: top-k eigenvalues and the spectral density.

Lanczos on Hessian-vector products builds an orthonormal basis
:math:`V_m` of the Krylov space of a start vector and the tridiagonal
:math:`T_m = V_m^\top H V_m`. Its eigenvalues (Ritz values) approximate the
extreme eigenvalues of H after a few dozen products (:func:`
top_hessian_eigenvalues`), and with the squared first components of its
eigenvectors as weights they form a Gauss quadrature of the spectral
density seen from the start vector; averaging over random start vectors
gives stochastic Lanczos quadrature (:func:`hessian_spectral_density`).

Both keep the whole basis (``num_iters`` vectors the size of the params) and
reorthogonalise every new vector against all of it, twice: in floating
point, plain Lanczos loses orthogonality and reports spurious copies of the
converged eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sam_optax._compilation import static_loss as _compile
from sam_optax._core import tree as _tree
from sam_optax.diagnostics import _hessian as _hessian

LossFn = Callable[[Any], jax.Array]


class Tridiagonal(NamedTuple):
  """The output of :func:`lanczos`.

  Attributes:
    alphas: the diagonal of :math:`T_m`, shape ``(m,)``.
    betas: ``betas[j]`` couples basis vectors j and j + 1, shape ``(m,)``;
      ``betas[m - 1]`` is the norm of the final residual (0 where the
      iteration restarted after finding an invariant subspace).
    basis: the orthonormal basis :math:`V_m`, shape ``(m, size)``.
  """

  alphas: jax.Array
  betas: jax.Array
  basis: jax.Array


def _reorthogonalise(w: jax.Array, basis: jax.Array) -> jax.Array:
  """Removes from w its components along the rows of ``basis``, twice."""
  for _ in range(2):
    w = w - basis.T @ (basis @ w)
  return w


def lanczos(matvec: Callable[[jax.Array], jax.Array], start: jax.Array,
            num_iters: int, key: jax.Array) -> Tridiagonal:
  """``num_iters`` Lanczos steps with full reorthogonalisation.

  On breakdown (the Krylov space is invariant: the new residual vanishes),
  the iteration continues from a random vector orthogonal to the basis
  (``key``) with a zero coupling, so that :math:`T_m` stays
  :math:`V_m^\\top H V_m` and its eigenvalues stay eigenvalues of H.
  """
  size, dtype = start.shape[0], start.dtype
  tol = 10 * math.sqrt(size) * jnp.finfo(dtype).eps
  # One spare row: the residual direction after the last step.
  basis = jnp.zeros((num_iters + 1, size), dtype).at[0].set(start)
  zeros = jnp.zeros((num_iters,), dtype)

  def step(j, carry):
    basis, alphas, betas = carry
    v, previous = basis[j], basis[jnp.maximum(j - 1, 0)]
    beta_previous = jnp.where(j > 0, betas[j - 1], 0)
    hv = matvec(v)
    alpha = jnp.vdot(v, hv)
    w = hv - alpha * v - beta_previous * previous
    w = _reorthogonalise(w, basis)
    beta = jnp.linalg.norm(w)

    def restart():
      fresh = jax.random.normal(jax.random.fold_in(key, j), (size,), dtype)
      fresh = _reorthogonalise(fresh, basis)
      return _tree.safe_div(fresh, jnp.linalg.norm(fresh))

    breakdown = beta <= tol * jnp.linalg.norm(hv)
    following = lax.cond(breakdown, restart, lambda: _tree.safe_div(w, beta))
    return (basis.at[j + 1].set(following), alphas.at[j].set(alpha),
            betas.at[j].set(jnp.where(breakdown, 0, beta)))

  basis, alphas, betas = lax.fori_loop(0, num_iters, step,
                                       (basis, zeros, zeros))
  return Tridiagonal(alphas, betas, basis[:num_iters])


def ritz(tridiagonal: Tridiagonal) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues (ascending) and eigenvectors of :math:`T_m`."""
  off = tridiagonal.betas[:-1]
  t = (jnp.diag(tridiagonal.alphas) + jnp.diag(off, 1) + jnp.diag(off, -1))
  return jnp.linalg.eigh(t)


def _check_sizes(size: int, num_iters: int, k: int = 1) -> None:
  if not 1 <= k <= num_iters <= size:
    raise ValueError(
        f"Need 1 <= k <= num_iters <= number of parameters; got k={k}, "
        f"num_iters={num_iters} and {size} parameters.")


class HessianSpectrum(NamedTuple):
  """The result of :func:`top_hessian_eigenvalues`.

  Attributes:
    eigenvalues: the k largest Ritz values, in decreasing order, shape
      ``(k,)``, float32 (or float64).
    eigenvectors: the Ritz vectors, a pytree like the params whose leaves
      have a leading axis of size k: ``eigenvectors[i]`` belongs to
      ``eigenvalues[i]`` (unit norm over the tree).
    residuals: :math:`\\|H u_i - \\theta_i u_i\\|`, the residual norm of
      each Ritz pair (from the recurrence, without an extra product), shape
      ``(k,)``: an eigenvalue of H lies within it of :math:`\\theta_i`.
      It assumes exact arithmetic: once it is below the rounding level
      (about ``eps * |eigenvalues[0]|``), read it as that level.
  """

  eigenvalues: jax.Array  # shape=(k,), dtype=jnp.float32
  eigenvectors: Any
  residuals: jax.Array  # shape=(k,), dtype=jnp.float32


def _top_eigenvalues_impl(loss_fn, params, key, *, k, num_iters, axis_name):
  """The body of :func:`top_hessian_eigenvalues`."""
  hessian = _hessian.flat_hessian(loss_fn, params, axis_name)
  if num_iters is None:
    num_iters = min(hessian.size, max(3 * k, 20))
  _check_sizes(hessian.size, num_iters, k)
  start_key, restart_key = jax.random.split(key)
  start = _hessian.unit_normal(start_key, hessian.size, hessian.dtype)
  tri = lanczos(hessian.matvec, start, num_iters, restart_key)
  theta, s = ritz(tri)
  theta, s = theta[::-1][:k], s[:, ::-1][:, :k]  # Largest first.
  vectors = s.T @ tri.basis  # (k, size)
  residuals = jnp.abs(tri.betas[-1] * s[-1])
  return HessianSpectrum(theta, jax.vmap(hessian.to_tree)(vectors),
                         residuals)


_top_eigenvalues = _compile.jit_with_static_loss(
    _top_eigenvalues_impl, static_argnames=("k", "num_iters", "axis_name"))


def top_hessian_eigenvalues(
    loss_fn: LossFn,
    params: Any,
    k: int = 5,
    *,
    key: jax.Array,
    num_iters: int | None = None,
    axis_name: Any = None,
) -> HessianSpectrum:
  r"""The k largest eigenvalues of the Hessian, by Lanczos.

  Runs ``num_iters`` Lanczos steps on Hessian-vector products
  (:func:`hessian_vector_product`) from a random unit vector, with full
  reorthogonalisation, and returns the k largest eigenvalues of the
  tridiagonal :math:`T_m = V_m^\top H V_m` (Ritz values) and their Ritz
  vectors. The extreme eigenvalues converge first; ``residuals`` tells how
  far each one may still be. With ``num_iters`` equal to the number of
  parameters the Ritz values are all the eigenvalues of H.

  Unlike :func:`top_hessian_eigenvalue` (power iteration, largest
  *magnitude*), these are the largest eigenvalues in value: at a minimum
  the top of the spectrum, far from one possibly smaller than the most
  negative eigenvalue in magnitude. ``eigenvalues[0] / eigenvalues[4]`` is
  the :math:`\lambda_{max}/\lambda_5` ratio of Foret et al.

  Cost: ``num_iters`` Hessian-vector products; memory: ``num_iters + 1``
  vectors the size of the params. Compiled with ``loss_fn``, ``k``,
  ``num_iters`` and ``axis_name`` static; callable inside ``jax.jit``.

  Args:
    loss_fn: ``loss_fn(params) -> scalar`` on a fixed batch.
    params: where the Hessian is taken (any pytree; non-float leaves are
      held fixed).
    k: how many eigenvalues.
    key: a PRNG key for the start vector (and restarts).
    num_iters: Lanczos steps, ``k <= num_iters <= number of parameters``.
      Default ``max(3k, 20)``, capped at the number of parameters.
    axis_name: average the Hessian over this ``pmap``/``shard_map`` axis
      (per-device batches: the Hessian of the mean loss). Every device must
      use the same ``key``.

  Returns:
    A :class:`HessianSpectrum` ``(eigenvalues, eigenvectors, residuals)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import diagnostics
    >>> h = jnp.array([-5.0, 4.0, 2.0, 1.0, 0.5, 0.1])
    >>> loss = lambda w: 0.5 * jnp.sum(h * w['a'] ** 2)
    >>> spec = diagnostics.top_hessian_eigenvalues(
    ...     loss, {'a': jnp.ones(6)}, k=3, key=jax.random.key(0))
    >>> spec.eigenvalues.round(4)
    Array([4., 2., 1.], dtype=float32)
    >>> spec.eigenvectors['a'].shape
    (3, 6)

  References:
    Lanczos, `An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators
    <https://doi.org/10.6028/jres.045.026>`_, J. Res. Nat. Bur. Standards,
    1950.

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (Fig. 2:
    :math:`\lambda_{max}` and :math:`\lambda_{max}/\lambda_5`).
  """
  return _top_eigenvalues(loss_fn, params, key, k=k, num_iters=num_iters,
                          axis_name=axis_name)


class SpectralDensity(NamedTuple):
  r"""The result of :func:`hessian_spectral_density`.

  Attributes:
    grid: the points t where the density is evaluated, shape
      ``(num_points,)``, from 4σ below the smallest to 4σ above the largest
      Ritz value.
    density: the estimated eigenvalue density :math:`\phi_\sigma(t)` on the
      grid (integrates to about 1), shape ``(num_points,)``.
    nodes: the Ritz values of each probe, shape ``(num_probes, num_iters)``.
    weights: the squared first components of the eigenvectors of each
      probe's tridiagonal matrix, summing to 1 per probe, shape
      ``(num_probes, num_iters)``. ``sum(weights * nodes, -1)`` is each
      probe's :math:`v^\top H v` (mean: about ``trace(H) / n``).
    sigma: the width of the Gaussian kernel, a scalar.
  """

  grid: jax.Array  # shape=(num_points,)
  density: jax.Array  # shape=(num_points,)
  nodes: jax.Array  # shape=(num_probes, num_iters)
  weights: jax.Array  # shape=(num_probes, num_iters)
  sigma: jax.Array  # shape=()


def _density_impl(loss_fn, params, key, sigma, *, num_probes, num_iters,
                  num_points, axis_name):
  """The body of :func:`hessian_spectral_density`."""
  hessian = _hessian.flat_hessian(loss_fn, params, axis_name)
  num_iters = min(hessian.size, num_iters)
  _check_sizes(hessian.size, num_iters)

  def probe(probe_key):  # One probe at a time: memory of one basis.
    start_key, restart_key = jax.random.split(probe_key)
    start = _hessian.unit_normal(start_key, hessian.size, hessian.dtype)
    theta, s = ritz(lanczos(hessian.matvec, start, num_iters, restart_key))
    return theta, s[0] ** 2

  nodes, weights = lax.map(probe, jax.random.split(key, num_probes))
  lo, hi = jnp.min(nodes), jnp.max(nodes)
  spread = hi - lo
  scale = jnp.maximum(jnp.max(jnp.abs(nodes)), 1e-3)
  auto = 0.01 * jnp.where(spread > 0, spread, scale)
  sigma = jnp.where(jnp.isnan(sigma), auto, sigma).astype(nodes.dtype)
  grid = jnp.linspace(lo - 4 * sigma, hi + 4 * sigma, num_points)
  z = (grid[:, None, None] - nodes) / sigma
  kernel = jnp.exp(-0.5 * z ** 2) / (sigma * jnp.sqrt(2 * jnp.pi))
  density = jnp.sum(weights * kernel, axis=(1, 2)) / num_probes
  return SpectralDensity(grid, density, nodes, weights, sigma)


_density = _compile.jit_with_static_loss(
    _density_impl,
    static_argnames=("num_probes", "num_iters", "num_points", "axis_name"))


def hessian_spectral_density(
    loss_fn: LossFn,
    params: Any,
    *,
    key: jax.Array,
    num_probes: int = 4,
    num_iters: int = 40,
    num_points: int = 512,
    sigma: float | None = None,
    axis_name: Any = None,
) -> SpectralDensity:
  r"""The eigenvalue density of the Hessian, by stochastic Lanczos quadrature.

  For a random unit probe v, ``num_iters`` Lanczos steps give the Ritz values
  :math:`\theta_i` and weights :math:`w_i = s_{1i}^2` (squared first
  components of the eigenvectors of :math:`T_m`), a Gauss quadrature of the
  spectral measure seen from v: :math:`v^\top f(H) v \approx \sum_i w_i
  f(\theta_i)`. Averaging over probes and broadening each node with a
  Gaussian of width σ gives the density of the n eigenvalues
  :math:`\lambda_j`,

  .. math::
    \phi_\sigma(t) = \frac{1}{n} \sum_j g_\sigma(t - \lambda_j)
    \approx \frac{1}{P} \sum_{p=1}^{P} \sum_i w^{(p)}_i\,
    g_\sigma(t - \theta^{(p)}_i).

  The few large outlier eigenvalues carry little weight (about 1/n each) and
  show as tiny bumps: read them off ``nodes`` or
  :func:`top_hessian_eigenvalues` and plot the density on a log scale.

  Args:
    loss_fn: ``loss_fn(params) -> scalar`` on a fixed batch.
    params: where the Hessian is taken.
    key: a PRNG key for the probes.
    num_probes: number of random probes (run one after the other).
    num_iters: Lanczos steps per probe (capped at the number of params).
    num_points: grid size.
    sigma: width of the Gaussian kernel; default 1% of the spread of the
      Ritz values.
    axis_name: average the Hessian over this ``pmap``/``shard_map`` axis.

  Returns:
    A :class:`SpectralDensity` ``(grid, density, nodes, weights, sigma)``:
    ``plt.semilogy(grid, density)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import diagnostics
    >>> h = jnp.array([3.0, 1.0, 1.0, -1.0])
    >>> loss = lambda w: 0.5 * jnp.sum(h * w ** 2)
    >>> sd = diagnostics.hessian_spectral_density(
    ...     loss, jnp.zeros(4), key=jax.random.key(0), num_points=2001)
    >>> sd.nodes[0].round(4)  # Full-rank Lanczos: the eigenvalues.
    Array([-1.,  1.,  1.,  3.], dtype=float32)
    >>> mass = jnp.sum(sd.density) * (sd.grid[1] - sd.grid[0])
    >>> round(float(mass), 3)
    1.0

  References:
    Ghorbani, Krishnan and Xiao, `An Investigation into Neural Net
    Optimization via Hessian Eigenvalue Density
    <https://arxiv.org/abs/1901.10159>`_, ICML 2019.

    Golub and Meurant, Matrices, Moments and Quadrature with Applications,
    Princeton University Press, 2010.
  """
  sigma = jnp.nan if sigma is None else sigma
  return _density(loss_fn, params, key, jnp.asarray(sigma, jnp.float32),
                  num_probes=num_probes, num_iters=num_iters,
                  num_points=num_points, axis_name=axis_name)
