"""Does SAM find flatter minima? Top Hessian eigenvalue on digits.

Trains the same MLP (64 -> 128 -> 10, ReLU) on scikit-learn's handwritten
digits (shipped with scikit-learn, nothing downloaded) from the same initial
weights, with the same minibatch order, with

* ``sgd``: SGD with momentum (the base optimizer),
* ``sam``: ``sam_optax.sam`` around it,
* ``gsam``, ``looksam``, ``friendly_sam``: the variants around it,

and then measures, at the weights each one ends at, the largest eigenvalue
of the Hessian of the full training loss (power iteration on
Hessian-vector products, ``sam_optax.diagnostics.top_hessian_eigenvalue``)
and how much the training loss rises along filter-normalised random
directions (``sam_optax.diagnostics.loss_landscape_1d``, mean over a few
directions of L(w ± 0.5 d) - L(w)). Smaller is flatter. It also prints the
final training loss and the test accuracy, so that "flatter" is not simply
"less trained".

Run (about 40 s on 2 CPU cores)::

  python benchmarks/top_eigenvalue.py
  python benchmarks/top_eigenvalue.py --seeds 0 1 2 --epochs 40
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import sam_optax  # noqa: E402
from sam_optax import diagnostics  # noqa: E402

BATCH_SIZE = 32
LR = 0.05
RHO = 0.1
SMOOTHING = 0.1


def init_mlp(seed, sizes=(64, 128, 10)):
  rng = np.random.default_rng(seed)
  return [{"kernel": jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2.0 / a),
                                 jnp.float32),
           "bias": jnp.zeros(b, jnp.float32)}
          for a, b in zip(sizes[:-1], sizes[1:])]


def predict(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
  return x @ params[-1]["kernel"] + params[-1]["bias"]


def loss_fn(params, x, y):
  """Cross-entropy with label smoothing.

  Smoothing gives the loss a minimum at finite weights. Without it the
  training loss of this separable problem goes to 0 and the Hessian with it
  (softmax saturates), so the eigenvalue would only measure how far training
  went, not how flat the minimum is.
  """
  labels = optax.smooth_labels(jax.nn.one_hot(y, 10), SMOOTHING)
  return optax.softmax_cross_entropy(predict(params, x), labels).mean()


def optimizers():
  base = lambda: optax.sgd(LR, momentum=0.9)  # noqa: E731
  return {
      "sgd": base(),
      "sam": sam_optax.sam(base(), rho=RHO),
      "gsam": sam_optax.gsam(base(), rho=RHO, alpha=0.3),
      "looksam": _common.looksam(base(), 5, rho=RHO, alpha=0.7),
      "friendly_sam": sam_optax.friendly_sam(base(), rho=RHO),
  }


def train(tx, name, params, data, epochs, seed):
  x_train, y_train = data
  grad = jax.grad(loss_fn)

  @jax.jit
  def step(params, state, x, y):
    g = grad(params, x, y)
    if name == "sgd":
      updates, state = tx.update(g, state, params)
    else:
      updates, state = tx.update(g, state, params,
                                 grad_fn=lambda p: grad(p, x, y))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  rng = np.random.default_rng(seed)
  n_batches = len(x_train) // BATCH_SIZE
  for _ in range(epochs):
    order = rng.permutation(len(x_train))
    for i in range(n_batches):
      idx = order[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]
      params, state = step(params, state, x_train[idx], y_train[idx])
  return params


def flatness(full_loss, params, key, num_directions=4):
  """(top Hessian eigenvalue, mean rise of the loss at t = ±0.5, loss)."""
  top = diagnostics.top_hessian_eigenvalue(full_loss, params, num_iters=50,
                                           key=key)
  rises = []
  for k in jax.random.split(key, num_directions):
    line = diagnostics.loss_landscape_1d(full_loss, params, k, num_points=3,
                                         span=0.5)
    rises.append(float(jnp.mean(line.losses[::2]) - line.losses[1]))
  return float(top.eigenvalue), float(np.mean(rises)), float(
      full_loss(params))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--epochs", type=int, default=30)
  args = parser.parse_args()

  x_train, y_train, x_test, y_test = _common.load_digits_split()

  def full_loss(params):  # One function object: compiled once.
    return loss_fn(params, x_train, y_train)

  results = {name: [] for name in optimizers()}
  for seed in args.seeds:
    for name, tx in optimizers().items():
      params = train(tx, name, init_mlp(seed), (x_train, y_train),
                     args.epochs, seed)
      eig, rise, train_loss = flatness(full_loss, params,
                                       jax.random.key(100 + seed))
      accuracy = float(np.mean(
          np.argmax(predict(params, x_test), -1) == y_test))
      results[name].append((eig, rise, train_loss, accuracy))

  print(f"digits MLP 64-128-10, cross-entropy with label smoothing "
        f"{SMOOTHING}, SGD lr={LR} momentum=0.9, rho={RHO}, batch "
        f"{BATCH_SIZE}, {args.epochs} epochs, seeds {args.seeds}; "
        f"jax {jax.__version__}")
  print(f"{'optimizer':<14}{'top eig (per seed)':>28}{'median':>9}"
        f"{'rise@0.5':>10}{'train loss':>12}{'test acc':>10}")
  for name, rows in results.items():
    eigs, rises, losses, accs = (np.asarray(c) for c in zip(*rows))
    per_seed = " ".join(f"{e:.2f}" for e in eigs)
    print(f"{name:<14}{per_seed:>28}{np.median(eigs):>9.2f}"
          f"{np.median(rises):>10.4f}{np.median(losses):>12.5f}"
          f"{np.median(accs):>10.4f}")
  sgd, sam = (np.median([r[0] for r in results[n]]) for n in ("sgd", "sam"))
  print(f"SAM / SGD top eigenvalue: {sam / sgd:.2f}")


if __name__ == "__main__":
  main()
