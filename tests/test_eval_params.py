"""Tests for ``sam_optax.eval_params`` and the one-gradient skeleton hooks."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import sam_optax
from sam_optax._core import eval_params as _eval_params
from sam_optax._core import gradient as _gradient
from sam_optax._core import skeleton as _skeleton
from tests import helpers

METHODS = {
    "sam": lambda: sam_optax.sam(optax.sgd(0.1), rho=0.1),
    "asam": lambda: sam_optax.sam(optax.sgd(0.1), rho=0.5, adaptive=True),
    "gsam": lambda: sam_optax.gsam(optax.sgd(0.1), rho=0.1),
    "looksam": lambda: sam_optax.looksam(optax.sgd(0.1), rho=0.1),
    "friendly_sam": lambda: sam_optax.friendly_sam(optax.sgd(0.1), rho=0.1),
}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("wrap", ["plain", "chain", "inject"])
def test_clean_param_methods_return_params_unchanged(name, wrap):
  tx = {"plain": METHODS[name],
        "chain": lambda: optax.chain(optax.clip(10.0), METHODS[name]()),
        "inject": lambda: optax.inject_hyperparams(
            lambda learning_rate: optax.chain(
                optax.scale(learning_rate), METHODS[name]()))(1.0),
        }[wrap]()
  params, states = helpers.run_steps(tx, helpers.quadratic_params(), 2)
  assert sam_optax.eval_params(states[-1], params) is params


class _ShiftState(NamedTuple):
  """A toy one-gradient method: holds w + shift, shift in the state."""

  shift: Any


def _shifted_method(shift):
  """Gradient taken at the held params w + shift; no grad_fn needed."""

  def rule(step, method_state):
    info = _gradient.SAMInfo(*(jnp.zeros([], jnp.float32),) * 2, None, None,
                             None)
    return step.grads, method_state, info

  def finish(step, updates, base_state, method_state):
    # Move from w_t + s_t to w_{t+1} + s_{t+1}, with s_{t+1} = s_t / 2.
    new = jax.tree.map(lambda s: s / 2, method_state.shift)
    updates = jax.tree.map(lambda u, a, b: u + a - b, updates, new,
                           method_state.shift)
    return updates, _ShiftState(new)

  return _skeleton.variant(
      "shifted", optax.sgd(0.1), rule, 0.0, {},
      init_method_state=lambda p: _ShiftState(
          jax.tree.map(lambda x: jnp.full_like(x, shift), p)),
      needs_grad_fn=False, finish=finish)


_eval_params.register(
    _ShiftState, lambda state, params: jax.tree.map(
        jnp.subtract, params, state.method_state.shift))


def test_registered_method_is_unperturbed_and_needs_no_grad_fn():
  tx = optax.chain(optax.identity(), _shifted_method(1.0))
  w = helpers.quadratic_params()
  held = jax.tree.map(lambda x: x + 1.0, w)  # The loop starts at w + s_0.
  state = tx.init(w)
  chex.assert_trees_all_close(sam_optax.eval_params(state, held), w)
  g = helpers.quadratic_grad(held)
  updates, state = tx.update(g, state, held)  # A plain Optax step.
  held = optax.apply_updates(held, updates)
  expected = jax.tree.map(lambda a, b: a - 0.1 * b, w, g)
  chex.assert_trees_all_close(sam_optax.eval_params(state, held), expected,
                              rtol=1e-6)
  chex.assert_trees_all_close(
      held, jax.tree.map(lambda x: x + 0.5, expected), rtol=1e-6)


def test_two_perturbing_states_are_ambiguous():
  tx = optax.chain(_shifted_method(1.0), _shifted_method(2.0))
  params = helpers.quadratic_params()
  with pytest.raises(ValueError, match="2 SAM states"):
    sam_optax.eval_params(tx.init(params), params)
