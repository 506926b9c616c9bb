"""Quickstart: SAM and ASAM with optax on a small MLP, in plain JAX.

This script trains the same small multi-layer perceptron (64 -> 128 -> 10,
ReLU) on scikit-learn's handwritten digits (8x8 images, 10 classes, shipped
with scikit-learn: nothing is downloaded) three times:

* ``sgd``:  SGD with momentum, the base optimizer;
* ``sam``:  ``sam_optax.sam`` wrapped around that same SGD (rho = 0.05);
* ``asam``: the adaptive variant, ``adaptive=True`` (rho = 0.5).

All three runs start from the same initial weights and see the minibatches
in the same order, so the only difference is the optimizer. The script
prints the training progress, the test accuracy of each run and how much
slower a SAM step is than a plain step: the median of per-round paired
ratios over interleaved rounds, with its interquartile range, measured the
way ``benchmarks/speed.py`` does, so that a busy machine does not make SAM
look broken.

What to expect: SAM computes two gradients per step (one at the weights w to
find the perturbation, one at the perturbed weights w + eps), so a step
costs up to about twice as much; on a model this small the fixed overhead of
each step hides part of that. On this small, easy problem all three reach
about the same test accuracy (around 97 %): SAM is on par with the base
optimizer here, not clearly better. The test set has 540 images and a
change of seed moves each accuracy by a few images (about 0.5 %), so gaps of
that size between the optimizers mean nothing. The gains reported in the
SAM and ASAM papers are for larger networks on CIFAR and ImageNet.

Run it (10 to 20 s on 2 CPU cores, mostly imports and compilation)::

  pip install -e ".[examples]"   # scikit-learn
  python examples/quickstart.py
  python examples/quickstart.py --epochs 30 --seed 1
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import sam_optax

BATCH_SIZE = 32
LEARNING_RATE = 0.05
MOMENTUM = 0.9


# ----------------------------------------------------------------------------
# Data and model.
# ----------------------------------------------------------------------------


def load_data():
  """Digits, split 70/30 (fixed split) and standardized with train stats."""
  x, y = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.3, random_state=0, stratify=y)
  scaler = StandardScaler().fit(x_train)
  x_train = scaler.transform(x_train).astype(np.float32)
  x_test = scaler.transform(x_test).astype(np.float32)
  return x_train, y_train, x_test, y_test


def init_mlp(seed, sizes=(64, 128, 10)):
  """A list of (weights, bias) pairs, He-initialised.

  (NumPy's generator rather than `jax.random`: same result, and nothing to
  compile.)
  """
  rng = np.random.default_rng(seed)
  params = []
  for n_in, n_out in zip(sizes[:-1], sizes[1:]):
    w = rng.normal(size=(n_in, n_out)) * np.sqrt(2.0 / n_in)
    params.append((jnp.asarray(w, jnp.float32), jnp.zeros(n_out)))
  return params


def predict(params, x):
  """Logits of the MLP."""
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def loss_fn(params, x, y):
  """Mean softmax cross-entropy."""
  logits = predict(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(predict(params, x), axis=-1) == y)


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


def make_optimizers():
  """The three optimizers to compare, all around the same base optimizer."""

  def base():
    return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

  return {
      # A plain optax optimizer does not accept the `grad_fn=` keyword that
      # SAM needs; `with_extra_args_support` makes it ignore it, so that the
      # very same training step serves all three optimizers.
      "sgd": optax.with_extra_args_support(base()),
      "sam": sam_optax.sam(base(), rho=0.05),
      "asam": sam_optax.sam(base(), rho=0.5, adaptive=True),
  }


def make_train_step(tx):
  """One jitted training step for the optimizer `tx`."""

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    # SAM re-evaluates the gradient at perturbed weights on the *same*
    # minibatch: `grad_fn` tells it how.
    updates, opt_state = tx.update(
        grads, opt_state, params,
        grad_fn=lambda p: jax.grad(loss_fn)(p, x, y))
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss

  return train_step


def minibatches(x, y, rng):
  """Yields the (x, y) minibatches of one epoch, in a random order.

  The last incomplete batch is dropped, so every batch has the same shape
  and the step is compiled only once.
  """
  order = rng.permutation(len(x))
  for i in range(len(x) // BATCH_SIZE):
    idx = order[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]
    yield x[idx], y[idx]


def train(name, tx, train_step, params, data, epochs, seed, log_every=5):
  """Trains from `params` with `tx`; returns the final params."""
  x_train, y_train, x_test, y_test = data
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)  # Same seed: same minibatch order.
  for epoch in range(1, epochs + 1):
    losses = []
    for x, y in minibatches(x_train, y_train, rng):
      params, opt_state, loss = train_step(params, opt_state, x, y)
      losses.append(loss)
    if epoch % log_every == 0 or epoch == epochs:
      print(f"  {name:5s} epoch {epoch:3d}  "
            f"train loss {np.mean(losses):.4f}  "
            f"test acc {accuracy(params, x_test, y_test):.4f}")
  return params


def time_steps(optimizers, train_steps, params, x, y, n_steps=100,
               rounds=15):
  """Step times and step-time ratios to ``sgd``, measured as the benchmarks do.

  The steps are already compiled (by `train`). Each round times a loop of
  `n_steps` steps of every optimizer, one after the other, in an order
  rotated every round, with ``block_until_ready`` inside the timed region.
  A ratio is *paired*: an optimizer's time divided by sgd's time in the same
  round, so a change in machine load between rounds cancels out. Returns
  ``{name: per-round seconds per step}`` and ``{name: per-round ratios}``.
  """
  states = {name: (params, tx.init(params))
            for name, tx in optimizers.items()}
  names = list(train_steps)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      p, s = states[name]
      jax.block_until_ready(p)
      start = time.perf_counter()
      for _ in range(n_steps):
        p, s, _ = train_steps[name](p, s, x, y)
      jax.block_until_ready(p)
      times[name].append((time.perf_counter() - start) / n_steps)
      states[name] = p, s
  ratios = {name: [t / b for t, b in zip(times[name], times["sgd"])]
            for name in names}
  return times, ratios


def main(epochs=20, seed=0):
  """Trains with SGD, SAM and ASAM; returns {name: test accuracy}."""
  data = load_data()
  x_train, y_train, x_test, y_test = data
  print(f"digits: {len(x_train)} train / {len(x_test)} test images, "
        f"batch {BATCH_SIZE}, {epochs} epochs, seed {seed}")
  init_params = init_mlp(seed)
  optimizers = make_optimizers()
  train_steps = {name: make_train_step(tx) for name, tx in optimizers.items()}

  accuracies = {}
  for name, tx in optimizers.items():
    params = train(name, tx, train_steps[name], init_params, data, epochs,
                   seed)
    accuracies[name] = float(accuracy(params, x_test, y_test))

  x, y = x_train[:BATCH_SIZE], y_train[:BATCH_SIZE]
  step_times, ratios = time_steps(optimizers, train_steps, init_params, x, y)

  print()
  print(f"{'optimizer':10s} {'test acc':>9s} {'errors':>7s} "
        f"{'step time':>10s} {'vs sgd':>7s}  {'[IQR]':>12s}")
  for name, acc in accuracies.items():
    errors = round((1 - acc) * len(x_test))
    q25, q50, q75 = np.percentile(ratios[name], [25, 50, 75])
    print(f"{name:10s} {acc:9.4f} {errors:7d} "
          f"{np.median(step_times[name]) * 1e6:8.0f}us {q50:6.2f}x  "
          f"[{q25:.2f}, {q75:.2f}]")
  print(f"\nstep time: median over {len(ratios['sgd'])} interleaved rounds; "
        "vs sgd: median and\ninterquartile range of the per-round ratios "
        "(paired, so machine load cancels).")
  print(f"\nerrors: misclassified test images (out of {len(x_test)}). Gaps "
        "of a few images\nare within the spread over seeds: try --seed 1, "
        "2, ...")
  return accuracies


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=20,
                      help="passes over the training set (default: 20)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the initial weights and of the minibatch "
                      "order (default: 0); the train/test split is fixed")
  args = parser.parse_args()
  main(epochs=args.epochs, seed=args.seed)
