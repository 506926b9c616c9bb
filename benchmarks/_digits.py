"""Noisy digits and the registry's MLP, for the diagnostics benchmarks.

scikit-learn's handwritten digits (8x8 images, 10 classes, 1797 examples,
shipped with scikit-learn: nothing is downloaded), split once into train /
validation / test (60/20/20, stratified, standardised on the training
statistics). Symmetric label noise replaces a fraction of the training and
validation labels by a different class drawn uniformly at random (a user has
no clean labels to tune on); the test labels stay clean.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from benchmarks import problems  # noqa: E402
from benchmarks.problems import digits_mlp  # noqa: E402

NUM_CLASSES = 10


def load_splits():
  """``{'train': (x, y), 'val': (x, y), 'test': (x, y)}`` with clean labels."""
  x, y = load_digits(return_X_y=True)
  x_rest, x_test, y_rest, y_test = train_test_split(
      x, y, test_size=0.2, random_state=0, stratify=y)
  x_train, x_val, y_train, y_val = train_test_split(
      x_rest, y_rest, test_size=0.25, random_state=0, stratify=y_rest)
  scaler = StandardScaler().fit(x_train)

  def prep(xs, ys):
    return scaler.transform(xs).astype(np.float32), ys.astype(np.int32)

  return {"train": prep(x_train, y_train), "val": prep(x_val, y_val),
          "test": prep(x_test, y_test)}


def noisy_labels(y, noise, seed):
  """Replaces a fraction ``noise`` of ``y`` by a different, random class."""
  return problems.noisy_labels(y, noise, seed, NUM_CLASSES)


@functools.cache
def _functional(sizes):
  return problems.Functional(digits_mlp.MLP(sizes, rngs=nnx.Rngs(0)))


def _sizes(params):
  layers = params["layers"]
  return tuple([layers[0]["kernel"].shape[0]]
               + [layers[i]["kernel"].shape[1] for i in range(len(layers))])


def init_mlp(key, sizes):
  """The registry's digits MLP (He-initialised) as an NNX ``Param`` state."""
  module = digits_mlp.MLP(tuple(sizes), rngs=nnx.Rngs(key))
  return nnx.split(module, nnx.Param, ...)[1]


def predict(params, x):
  f = _functional(_sizes(params))
  return f.apply(params, f.rest, x, False)[0]


def cross_entropy(params, x, y, smoothing=0.0):
  labels = optax.smooth_labels(jax.nn.one_hot(y, NUM_CLASSES), smoothing)
  return optax.softmax_cross_entropy(predict(params, x), labels).mean()


def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(predict(params, x), -1) == y)
