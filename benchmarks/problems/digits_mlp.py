"""``digits-mlp``: an MLP on scikit-learn's handwritten digits, label noise.

scikit-learn's digits (8x8 images, 10 classes, 1,797 examples, shipped with
scikit-learn: nothing is downloaded), split once (stratified): 30% test
(clean), 250 images of validation (clean), the rest (1,007) train;
standardised on the training statistics. Symmetric label noise replaces a
fraction (20, 40, 60%) of the *training* labels by a different random class.
Model: MLP 64-128-128-10 (ReLU, He-initialised), batch 32, SGD with momentum
0.9 and learning rate 0.05 with cosine decay to 0, 40 epochs (quick: 20
epochs, 40% noise). The problem of the first frontier, kept for continuity
and as the quick case.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from flax import nnx

from ._base import (
  Data,
  Problem,
  classification_loss,
  correct,
  noise_of,
  noisy_labels,
)

NUM_CLASSES = 10
VAL_SIZE = 250
HIDDEN = (128, 128)


@functools.cache
def load(quick: bool = False) -> Data:
  """The fixed splits (clean labels); the same for ``quick``."""
  del quick
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  x, y = load_digits(return_X_y=True)
  x_rest, x_test, y_rest, y_test = train_test_split(
      x, y, test_size=0.3, random_state=0, stratify=y)
  x_train, x_val, y_train, y_val = train_test_split(
      x_rest, y_rest, test_size=VAL_SIZE, random_state=1, stratify=y_rest)
  mean, std = x_train.mean(0), x_train.std(0)
  std[std == 0] = 1.0

  def f(a):
    return ((a - mean) / std).astype(np.float32)

  def i(a):
    return a.astype(np.int32)

  return Data(f(x_train), i(y_train), f(x_val), i(y_val), f(x_test),
              i(y_test))


class MLP(nnx.Module):
  """ReLU MLP ``sizes[0]-...-sizes[-1]``, He-initialised, zero biases."""

  def __init__(self, sizes, *, rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
    self.layers = nnx.List([nnx.Linear(a, b, kernel_init=init, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def model(seed: int = 0, quick: bool = False, hidden=HIDDEN) -> MLP:
  del quick
  return MLP((64, *hidden, NUM_CLASSES), rngs=nnx.Rngs(seed))


def base(total_steps: int, quick: bool = False, lr: float = 0.05):
  del quick
  return optax.sgd(optax.cosine_decay_schedule(lr, total_steps),
                   momentum=0.9)


def train_targets(data: Data, setting: str, seed: int) -> np.ndarray:
  return noisy_labels(data.y_train, noise_of(setting), seed, NUM_CLASSES)


PROBLEM = Problem(
    name="digits-mlp",
    description="MLP 64-128-128-10 on sklearn digits (1,007 train), batch "
    "32, SGD momentum, cosine, 40 epochs, symmetric label noise",
    load=load, model=model, example_loss=classification_loss,
    metric="accuracy", higher_is_better=True,
    evaluate=correct,
    base=base, batch_size=32, epochs=40, quick_epochs=20,
    settings=("noise=0.2", "noise=0.4", "noise=0.6"),
    quick_settings=("noise=0.4",), train_targets=train_targets,
    example_ids=True, num_outputs=NUM_CLASSES,
)
