"""The benchmark registry (``benchmarks/problems``) and the frontier's sums.

Exact checks of the pieces of arithmetic the frontier's verdicts rest on:
label noise, the stratified split, round-to-nearest quantization, bits per
byte, the count of second gradients, the fraction of SAM's gain kept and a
late-phase entry's step cost. Only the digits problem is trained (one epoch).
"""

from __future__ import annotations

import math
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

from benchmarks import frontier, problems  # noqa: E402
from benchmarks.problems import _base, text_lm  # noqa: E402
from benchmarks.problems import train as T  # noqa: E402


def test_registry_names_the_three_problems():
  assert problems.names() == ["digits-mlp", "images-cnn", "text-lm"]
  with pytest.raises(ValueError, match="unknown problem"):
    problems.get("nope")


def test_noisy_labels_flip_exactly_that_fraction_to_other_classes():
  y = np.arange(1000) % 10
  noisy = problems.noisy_labels(y, 0.4, seed=3, num_classes=10)
  changed = noisy != y
  assert changed.sum() == 400
  assert noisy.min() >= 0 and noisy.max() <= 9
  np.testing.assert_array_equal(noisy, problems.noisy_labels(y, 0.4, 3, 10))


def test_stratified_split_is_disjoint_and_keeps_the_proportions():
  y = np.repeat(np.arange(4), [100, 200, 300, 400])
  a, b, c = _base.stratified_split(y, (500, 200, 300))
  assert len(a) == 500 and len(b) == 200 and len(c) == 300
  assert len(np.unique(np.concatenate([a, b, c]))) == 1000
  np.testing.assert_array_equal(np.bincount(y[b]), [20, 40, 60, 80])


def test_quantize_is_round_to_nearest_per_output_column():
  w = jnp.array([[0.5, -2.0], [-1.0, 0.3], [0.26, 1.0]])
  params = {"kernel": w, "bias": jnp.array([0.123, 4.56])}
  q = text_lm.quantize(params, 4)  # Levels -7..7, scale max|w| / 7.
  scale = jnp.array([1.0, 2.0]) / 7
  np.testing.assert_allclose(q["kernel"], jnp.round(w / scale) * scale,
                             rtol=1e-6)
  np.testing.assert_array_equal(q["bias"], params["bias"])  # Vectors kept.
  assert len(np.unique(np.asarray(q["kernel"][:, 0] / scale[0]))) <= 15
  q8 = text_lm.quantize(params, 8)
  np.testing.assert_allclose(q8["kernel"], w, atol=float(scale.max()) / 36)


def test_bits_per_byte_is_cross_entropy_over_log_2():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.125, 0.125, 0.75]]]))
  y = jnp.array([[0, 2]])
  expected = (-math.log2(0.5) - math.log2(0.75)) / 2
  np.testing.assert_allclose(text_lm.bits_per_byte(logits, y), [expected],
                             rtol=1e-6)


def test_batchnorm_statistics_move_in_training_mode_only():
  from benchmarks.problems import images_cnn

  f = T.Functional(images_cnn.model(0))
  x = jnp.ones((4, 14, 14, 1)) * 3.0
  _, rest_train = f.apply(f.params, f.rest, x, True)
  _, rest_eval = f.apply(f.params, f.rest, x, False)
  before = jax.tree.leaves(f.rest)
  assert any(not np.allclose(a, b) for a, b in
             zip(before, jax.tree.leaves(rest_train)))
  for a, b in zip(before, jax.tree.leaves(rest_eval)):
    np.testing.assert_array_equal(a, b)


# One epoch of 1,007 // 32 = 31 steps; LookSAM's SAM steps are 0, 5, ..., 30.
@pytest.mark.parametrize("name, calls", [
    ("sgd", 0.0), ("sam", 1.0), ("looksam", 7 / 31)])
def test_grad_fn_calls_are_counted_per_step(name, calls):
  problem = problems.get("digits-mlp")
  make = {"sgd": lambda b, h, n: optax.with_extra_args_support(b),
          "sam": lambda b, h, n: sam_optax.sam(b, rho=0.1),
          "looksam": lambda b, h, n: sam_optax.looksam(b, rho=0.1,
                                                       every_k=5)}[name]
  train = T.make_train(problem, make, epochs=1)
  out = T.run_seed(train, problem, problem.load(), "clean", 0, {})
  assert out["grad_fn_calls_per_step"] == pytest.approx(calls, abs=1e-9)
  assert 0.5 < out["test"] <= 1.0


def _write(monkeypatch, tmp_path, problem, method, setting, h, tests, val):
  monkeypatch.setattr(frontier, "CACHE", str(tmp_path))
  for seed, test in enumerate(tests):
    frontier.save_json(
        frontier.run_path(problem.name, False, method, setting, h, seed),
        {"val": val, "test": test, "perturbed_fraction": 0.0,
         "grad_fn_calls_per_step": 0.0})


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_kept_is_the_fraction_of_sams_gain(monkeypatch, tmp_path,
                                           higher_is_better):
  import dataclasses

  problem = dataclasses.replace(
      problems.get("digits-mlp"), higher_is_better=higher_is_better,
      grids={"sam": ({"rho": 0.1}, {"rho": 0.2}), "msam": ({"rho": 1.0},)})
  sign = 1 if higher_is_better else -1
  args = (monkeypatch, tmp_path, problem)
  _write(*args, "sgd", "s", {}, [0.5, 0.7], 0.5)
  # SAM: ρ = 0.2 is better on validation (in the problem's direction).
  _write(*args, "sam", "s", {"rho": 0.1}, [0.1, 0.1], 0.5 - sign * 0.1)
  _write(*args, "sam", "s", {"rho": 0.2}, [0.6 + sign * 0.2] * 2,
         0.5 + sign * 0.1)
  _write(*args, "msam", "s", {"rho": 1.0}, [0.6 + sign * 0.05] * 2, 0.5)
  rows = {r["method"]: r for r in frontier.summarize(
      problem, False, ["sgd", "sam", "msam"], ["s"], [0, 1], {})}
  assert rows["sam"]["hyperparameters"] == {"rho": 0.2}
  assert rows["sgd"]["mean"] == pytest.approx(0.6)
  assert rows["sgd"]["std"] == pytest.approx(0.1)
  assert rows["sam"]["kept"] == pytest.approx(1.0)
  assert rows["msam"]["kept"] == pytest.approx(0.25)


def test_late_phase_step_cost_mixes_zero_and_full_steps():
  timing = {"sam": {"median": 2.0, "q25": 1.8, "q75": 2.2},
            "sam_zero": {"median": 1.0, "q25": 0.9, "q75": 1.1}}
  cost, iqr = frontier.step_cost("sam_late20", timing)
  assert cost == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)
  assert iqr == pytest.approx([0.8 * 0.9 + 0.2 * 1.8, 0.8 * 1.1 + 0.2 * 2.2])
  assert frontier.step_cost("sgd_2x", timing) == (1.0, None)
  assert frontier.step_cost("rwp", timing) == (None, None)
