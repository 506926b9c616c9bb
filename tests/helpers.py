"""Small problems with known answers, shared by the tests."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

# A symmetric positive definite 5x5 matrix, fixed once for all tests.
_rng = np.random.default_rng(0)
_m = _rng.normal(size=(5, 5))
A = jnp.asarray(_m @ _m.T / 5 + np.eye(5), jnp.float32)


def quadratic_params():
  """Params split in two leaves (2 + 3 = 5 entries), far from the optimum."""
  return {"a": jnp.array([1.0, -2.0], jnp.float32),
          "b": jnp.array([0.5, 3.0, -1.0], jnp.float32)}


def flat(params):
  return jnp.concatenate([params["a"], params["b"]])


def unflat(vector):
  return {"a": vector[:2], "b": vector[2:]}


def quadratic_loss(params):
  """L(w) = ½ wᵀAw on the concatenated params."""
  w = flat(params)
  return 0.5 * w @ A @ w


quadratic_grad = jax.grad(quadratic_loss)


def sam_step_reference(w, lr, rho):
  """One SGD step of SAM on L = ½ wᵀAw: w − lr·A(w + ρ·Aw/‖Aw‖)."""
  g = A @ w
  return w - lr * A @ (w + rho * g / jnp.linalg.norm(g))


def asam_step_reference(w, lr, rho, eta):
  """One SGD step of ASAM: T = |w|+η, ε = ρ·T²g/‖Tg‖."""
  g = A @ w
  t = jnp.abs(w) + eta
  eps = rho * t * t * g / jnp.linalg.norm(t * g)
  return w - lr * A @ (w + eps)


def random_tree(seed, shapes, scale=1.0):
  """A dict pytree of float32 normals with the given shapes."""
  rng = np.random.default_rng(seed)
  return {f"leaf{i}": jnp.asarray(scale * rng.normal(size=s), jnp.float32)
          for i, s in enumerate(shapes)}


def run_steps(tx, params, num_steps, grad=None, grad_fn=None, **kwargs):
  """``num_steps`` jitted steps; returns the params and the state after each.

  ``grad`` gives the clean gradient (default: of the quadratic), ``grad_fn``
  the perturbed one (default: ``grad``); ``kwargs`` go to ``tx.update``.
  Also checks the Optax contract on the way: one trace for all the steps
  (``chex.assert_max_traces``), and the state's shapes and dtypes as ``init``
  made them.
  """
  grad = quadratic_grad if grad is None else grad
  grad_fn = grad if grad_fn is None else grad_fn
  chex.clear_trace_counter()  # This step is new; its trace count starts at 0.

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    updates, state = tx.update(grad(params), state, params, grad_fn=grad_fn,
                               **kwargs)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  layout = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), state)
  states = []
  for _ in range(num_steps):
    params, state = step(params, state)
    states.append(state)
  assert jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)),
                      state) == layout
  return params, states


def nonlinear_problem(seed=0):
  """Params (three leaves) and the gradient of a non-quadratic loss.

  Unlike the quadratic, its gradients carry rounding noise in every
  direction, so exact (bit-for-bit) comparisons can tell noise apart.
  """
  shapes = [(7, 5), (13,), (3, 3, 2)]
  params = random_tree(seed, shapes)
  coefs = random_tree(seed + 10, shapes)

  def loss(p):
    return sum(jnp.sum(jnp.sin(w * c) ** 2)
               for w, c in zip(jax.tree.leaves(p), jax.tree.leaves(coefs)))

  return params, jax.grad(loss)


def assert_flat_close(params, expected, rtol=1e-5, atol=1e-6):
  """The quadratic problem's params, flattened, equal ``expected``."""
  np.testing.assert_allclose(flat(params), expected, rtol=rtol, atol=atol)


def assert_differs(params, wrong, at_least=1e-4):
  """The params differ from a wrong reference (the oracle can see a bug)."""
  diff = np.max(np.abs(np.asarray(flat(params), np.float64) - wrong))
  assert diff > at_least, f"the oracle cannot see this bug ({diff:.1e})"
