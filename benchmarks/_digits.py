"""Noisy digits and a small MLP, shared by the diagnostics benchmarks.

scikit-learn's handwritten digits (8x8 images, 10 classes, 1797 examples,
shipped with scikit-learn: nothing is downloaded), split once into train /
validation / test (60/20/20, stratified, standardised on the training
statistics). Symmetric label noise replaces a fraction of the training and
validation labels by a different class drawn uniformly at random (a user has
no clean labels to tune on); the test labels stay clean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

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


def load_train_test():
  """``(x_train, y_train, x_test, y_test)``: a 70/30 stratified split.

  The split of ``label_noise.py`` (no validation set), standardised on the
  training statistics; float32 features, int32 labels.
  """
  x, y = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.3, random_state=0, stratify=y)
  scaler = StandardScaler().fit(x_train)
  return (scaler.transform(x_train).astype(np.float32),
          y_train.astype(np.int32),
          scaler.transform(x_test).astype(np.float32),
          y_test.astype(np.int32))


def noisy_labels(y, noise, seed):
  """Replaces a fraction ``noise`` of ``y`` by a different, random class."""
  rng = np.random.default_rng(10_000 + seed)
  y = y.copy()
  flip = rng.permutation(len(y))[:int(round(noise * len(y)))]
  y[flip] = (y[flip] + rng.integers(1, NUM_CLASSES, len(flip))) % NUM_CLASSES
  return y


def init_mlp(key, sizes):
  """He-initialised ``[{'kernel', 'bias'}, ...]``."""
  params = []
  for n_in, n_out in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    params.append({
        "kernel": jax.random.normal(sub, (n_in, n_out)) * jnp.sqrt(2 / n_in),
        "bias": jnp.zeros(n_out)})
  return params


def predict(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
  return x @ params[-1]["kernel"] + params[-1]["bias"]


def cross_entropy(params, x, y, smoothing=0.0):
  labels = optax.smooth_labels(jax.nn.one_hot(y, NUM_CLASSES), smoothing)
  return optax.softmax_cross_entropy(predict(params, x), labels).mean()


def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(predict(params, x), -1) == y)
