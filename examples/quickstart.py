"""Quickstart: SAM and ASAM with optax on a small MLP, in plain JAX.

This script trains the same multi-layer perceptron (64 -> 128 -> 128 -> 10,
ReLU, a Flax NNX module) on scikit-learn's handwritten digits (8x8 images,
10 classes, shipped with scikit-learn: nothing is downloaded) three times:

* ``sgd``:  SGD with momentum and a cosine learning rate, the base optimizer;
* ``sam``:  ``sam_optax.sam`` wrapped around that same SGD (rho = 0.05);
* ``asam``: the adaptive variant, ``adaptive=True`` (rho = 0.5).

The data, the model and the training loop are the benchmarks' ``digits-mlp``
problem (``benchmarks/problems/``), here with clean labels. The heart of the
loop is one line: SAM re-evaluates the gradient at perturbed weights on the
*same* minibatch, and ``grad_fn`` tells it how::

    updates, state = tx.update(grads, state, params,
                               grad_fn=lambda p: jax.grad(loss)(p, x, y))

A plain optax optimizer does not accept ``grad_fn``;
``optax.with_extra_args_support`` makes it ignore it, so the very same step
serves all three optimizers. All three runs start from the same initial
weights and see the minibatches in the same order. The script prints the
test accuracy of each run and how much slower a SAM step is than a plain
step: the median of per-round paired ratios over interleaved rounds, with
its interquartile range, so that a busy machine does not make SAM look
broken.

What to expect: SAM computes two gradients per step, so a step costs up to
about twice as much; on a model this small the fixed overhead of each step
hides part of that. With clean labels all three reach about the same test
accuracy: the test set has 540 images and a change of seed moves each
accuracy by a few images, so gaps of that size mean nothing. SAM's gains
show under label noise (``python benchmarks/frontier.py --problem
digits-mlp``) and on larger networks.

Run it from the repository root (about 20-30 s on 2 CPU cores, mostly
imports and compilation)::

  pip install -e ".[examples]"   # scikit-learn
  python examples/quickstart.py
  python examples/quickstart.py --epochs 30 --seed 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # The problem registry lives in benchmarks/.
  sys.path.insert(0, ROOT)

import sam_optax  # noqa: E402
from benchmarks import problems  # noqa: E402
from benchmarks.problems import train as T  # noqa: E402

PROBLEM = problems.get("digits-mlp")


def make_optimizers():
  """``{name: make(base, h, total_steps)}``: the three optimizers, each
  around the problem's base optimizer (SGD, momentum 0.9, cosine)."""
  return {
      "sgd": lambda base, h, n: optax.with_extra_args_support(base),
      "sam": lambda base, h, n: sam_optax.sam(base, rho=0.05),
      "asam": lambda base, h, n: sam_optax.sam(base, rho=0.5,
                                               adaptive=True),
  }


def time_steps(data, rounds=15, steps=100):
  """Step-time ratios to ``sgd``, paired per round (see the docstring)."""
  x, y = jax.numpy.asarray(data.x_train), jax.numpy.asarray(data.y_train)
  idx = jax.numpy.asarray(np.random.default_rng(0).integers(
      0, len(x), (steps, PROBLEM.batch_size)))
  runners = {}
  for name, make in make_optimizers().items():
    tx = make(PROBLEM.base(10**6), {}, 10**6)
    run, carry = T.scan_runner(PROBLEM, tx, x, y)
    runners[name] = [run, jax.block_until_ready(run(carry, idx))]
  times = {name: [] for name in runners}
  names = list(runners)
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      run, carry = runners[name]
      start = time.perf_counter()
      runners[name][1] = jax.block_until_ready(run(carry, idx))
      times[name].append((time.perf_counter() - start) / steps)
  ratios = {name: [t / b for t, b in zip(times[name], times["sgd"])]
            for name in names}
  return times, ratios


def main(epochs=20, seed=0):
  """Trains with SGD, SAM and ASAM; returns {name: test accuracy}."""
  data = PROBLEM.load()
  print(f"digits: {data.sizes()} images, batch {PROBLEM.batch_size}, "
        f"{epochs} epochs, seed {seed}, clean labels")
  accuracies = {}
  for name, make in make_optimizers().items():
    train = T.make_train(PROBLEM, make, epochs=epochs)
    out = T.run_seed(train, PROBLEM, data, "clean", seed, {})
    accuracies[name] = out["test"]
    print(f"  {name:5s} final train loss {out['final_loss']:.4f}  "
          f"val acc {out['val']:.4f}  test acc {out['test']:.4f}")

  step_times, ratios = time_steps(data)
  n_test = len(data.x_test)
  print()
  print(f"{'optimizer':10s} {'test acc':>9s} {'errors':>7s} "
        f"{'step time':>10s} {'vs sgd':>7s}  {'[IQR]':>12s}")
  for name, acc in accuracies.items():
    errors = round((1 - acc) * n_test)
    q25, q50, q75 = np.percentile(ratios[name], [25, 50, 75])
    print(f"{name:10s} {acc:9.4f} {errors:7d} "
          f"{np.median(step_times[name]) * 1e6:8.0f}us {q50:6.2f}x  "
          f"[{q25:.2f}, {q75:.2f}]")
  print(f"\nstep time: median over {len(ratios['sgd'])} interleaved rounds; "
        "vs sgd: median and\ninterquartile range of the per-round ratios "
        "(paired, so machine load cancels).")
  print(f"\nerrors: misclassified test images (out of {n_test}). Gaps "
        "of a few images\nare within the spread over seeds: try --seed 1, "
        "2, ...")
  return accuracies


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=20,
                      help="passes over the training set (default: 20)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the initial weights and of the minibatch "
                      "order (default: 0); the splits are fixed")
  args = parser.parse_args()
  main(epochs=args.epochs, seed=args.seed)
