"""late_phase: the schedule, its checks, and SAM switched on at step N."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import sam_optax
from tests import helpers


def test_late_phase_values_and_schedule_rho():
  rho = sam_optax.late_phase(optax.linear_schedule(0.0, 1.0, 10), 4)
  got = [float(rho(t)) for t in range(6)]
  chex.assert_trees_all_close(got, [0, 0, 0, 0, 0.4, 0.5], atol=1e-6)


@pytest.mark.parametrize("bad, error", [
    (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_late_phase_rejects_bad_start(bad, error):
  with pytest.raises(error, match="start_step"):
    sam_optax.late_phase(0.05, bad)


def test_late_phase_rejects_negative_rho():
  with pytest.raises(ValueError, match="rho"):
    sam_optax.late_phase(-0.1, 3)


def test_sam_with_late_phase_is_the_base_step_then_sam():
  """Before step N: the base optimizer's step; from N: SAM's."""
  params, loss_fn, n = helpers.quadratic_params(), helpers.quadratic_loss, 3
  base = optax.sgd(0.1)

  def run(tx, p, steps, state=None):
    state = tx.init(p) if state is None else state
    for _ in range(steps):
      u, state = tx.update(jax.grad(loss_fn)(p), state, p,
                           grad_fn=jax.grad(loss_fn))
      p = optax.apply_updates(p, u)
    return p, state

  late = sam_optax.sam(base, rho=sam_optax.late_phase(0.2, n))
  p_late, s_late = run(late, params, n)
  p_base, _ = run(base, params, n)
  chex.assert_trees_all_close(p_late, p_base, rtol=1e-6)
  assert int(s_late.step_count) == n
  # Step n: SAM's step from the same point, not the base step.
  p_next, _ = run(late, p_late, 1, s_late)
  p_sam, _ = run(sam_optax.sam(base, rho=0.2), p_late, 1)
  p_plain, _ = run(base, p_late, 1)
  chex.assert_trees_all_close(p_next, p_sam, rtol=1e-6)
  assert not jnp.allclose(helpers.flat(p_next), helpers.flat(p_plain))
