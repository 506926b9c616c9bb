"""The Functional-SAM step of the training loop and the LM benchmark's sums.

``kind="functional"`` of :mod:`benchmarks.problems.train` against a
hand-written Functional-SAM step (Singh et al. 2025) on the digits MLP, and
the paired differences :mod:`benchmarks.language_model` reports.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

pytest.importorskip("sklearn")
pytest.importorskip("flax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # The problem registry lives in benchmarks/.
  sys.path.insert(0, ROOT)

from benchmarks import language_model as LM  # noqa: E402
from benchmarks import problems  # noqa: E402
from benchmarks.problems import train as T  # noqa: E402


def test_functional_step_is_the_hand_written_functional_sam_step():
  problem = problems.get("digits-mlp")
  f = T.Functional(problem.model(0))
  data = problem.load()
  x, y = jnp.asarray(data.x_train[:8]), jnp.asarray(data.y_train[:8])
  lr, rho = 0.5, 0.3
  tx = sam_optax.functional_sam(optax.sgd(lr), rho=rho)
  step = T.make_step(problem, f, tx, "functional", count=True)
  carry = T.Carry(f.params, f.rest, tx.init(f.params),
                  jnp.zeros([], jnp.int32))
  T.GRAD_FN_CALLS.take()
  new, loss = jax.jit(step)(carry, (x, y, jnp.arange(8)))
  assert T.GRAD_FN_CALLS.take() == 1  # One perturbed pass per step.

  def outputs(p):
    return f.apply(p, f.rest, x, True)[0]

  def ell(out):
    return problem.example_loss(out, y).mean()

  logits = outputs(f.params)
  dlogits = jax.grad(ell)(logits)
  g = jax.grad(lambda p: ell(outputs(p)))(f.params)
  norm = jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda p, a: p + rho * a / norm, f.params, g)
  _, pullback = jax.vjp(outputs, perturbed)
  (g_f,) = pullback(dlogits)
  expected = jax.tree.map(lambda p, a: p - lr * a, f.params, g_f)
  np.testing.assert_allclose(float(loss), float(ell(logits)), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  assert int(new.perturbed_steps) == 1
  # Not SAM's step: the loss derivative there is the perturbed point's.
  sam_g = jax.grad(lambda p: ell(outputs(p)))(perturbed)
  assert any(not np.allclose(a, b, atol=1e-6) for a, b in zip(
      jax.tree.leaves(g_f), jax.tree.leaves(sam_g)))


def test_other_kinds_still_pass_through():
  problem = problems.get("digits-mlp")
  f = T.Functional(problem.model(0))
  with pytest.raises(ValueError, match="kind must be one of"):
    T.make_step(problem, f, optax.sgd(0.1), "nope")
  assert "functional" in T.KINDS and "grad_fn" in T.KINDS


def test_paired_difference_and_radius_choice(monkeypatch, tmp_path):
  runs = [{"seed": 0, "test": 3.0}, {"seed": 1, "test": 3.2},
          {"seed": 2, "test": 2.9}]
  base = [{"seed": 0, "test": 3.1}, {"seed": 1, "test": 3.1}]
  mean, std, n = LM.paired(runs, base)
  assert n == 2  # Seed 2 has no baseline.
  assert mean == pytest.approx(0.0)
  assert std == pytest.approx(np.std([-0.1, 0.1], ddof=1))
  monkeypatch.setattr(LM, "CACHE", str(tmp_path))
  for rho, val in ((0.003, 3.3), (0.01, 3.2), (0.03, 3.4)):
    LM.save_json(LM.run_path(False, "sam", {"rho": rho}, 0), {"val": val})
  assert LM.choose(False, "sam") == ({"rho": 0.01}, 3.2)
  assert LM.choose(False, "psam") is None
  # Seed 1 on part of the grid: still seed 0 alone.
  LM.save_json(LM.run_path(False, "sam", {"rho": 0.003}, 1), {"val": 3.0})
  assert LM.selection_seeds(False, "sam") == [0]
  assert LM.choose(False, "sam") == ({"rho": 0.01}, 3.2)
  # The whole grid on seed 1: the mean over both seeds chooses.
  for rho, val in ((0.001, 3.5), (0.01, 3.3), (0.03, 3.0)):
    LM.save_json(LM.run_path(False, "sam", {"rho": rho}, 1), {"val": val})
  assert LM.selection_seeds(False, "sam") == [0, 1]
  h, val = LM.choose(False, "sam")
  assert h == {"rho": 0.003} and val == pytest.approx(3.15)
