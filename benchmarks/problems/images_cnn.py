"""``images-cnn``: a small ResNet with BatchNorm on animal silhouettes.

Data: Animal-Shape MNIST (the PyPI package ``animal-mnist``, MIT licence:
10,000 real 28x28 grayscale silhouettes of 10 animal classes, 1,000 each,
bundled inside the wheel: nothing is downloaded at run time). Install the
data alone with ``pip install --no-deps animal-mnist`` (its declared
dependencies include TensorFlow, which is not needed: only the two data
files are read, never its loader). Images are average-pooled 2x2 to 14x14
(CPU cost) and standardised with the training mean and std. Fixed,
stratified splits: 5,000 train, 1,000 validation (clean), 4,000 test
(clean). Symmetric label noise on the training labels: 20% and 40%.

Model: a ResNet-style CNN: a 3x3 stem (8 channels) with BatchNorm, two
stages of one residual block each (8 channels at 14x14; 16 channels at 7x7
with a strided 1x1 projection shortcut), every convolution followed by
BatchNorm, global average pooling, a linear classifier (5,122
parameters: small because a convolution is slow on this CPU, about 40 s for
one SGD run of 6 epochs on one shared core). Base optimizer: SGD with
momentum 0.9, Nesterov, learning rate 0.05 with cosine decay, weight decay
5e-4, batch 64, 6 epochs (468 steps). Quick: 1,000 training images, 3
epochs, 40% noise.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ._base import (
  Data,
  Problem,
  classification_loss,
  correct,
  grids,
  noise_of,
  noisy_labels,
  stratified_split,
)

NUM_CLASSES = 10
SPLITS = (5000, 1000, 4000)
QUICK_TRAIN = 1000


def _data_dir() -> str:
  spec = importlib.util.find_spec("animal_mnist")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "images-cnn needs the data of the PyPI package animal-mnist: "
        "pip install --no-deps animal-mnist")
  return os.path.join(list(spec.submodule_search_locations)[0], "data",
                      "Animal_MNIST")


def _read(name: str) -> np.ndarray:
  # The package stores two pickled NumPy arrays (its own format).
  with gzip.open(os.path.join(_data_dir(), name), "rb") as f:
    return np.asarray(pickle.load(f))


@functools.cache
def load(quick: bool = False) -> Data:
  x = _read("animal_data_version_3.gz").astype(np.float32) / 255.0
  y = _read("animal_label_version_3.gz").astype(np.int32)
  x = x.reshape(-1, 14, 2, 14, 2).mean((2, 4))[..., None]  # 28 -> 14.
  train, val, test = stratified_split(y, SPLITS, seed=0)
  if quick:
    train = train[:QUICK_TRAIN]
  mean, std = x[train].mean(), x[train].std()

  def f(i):
    return ((x[i] - mean) / std).astype(np.float32)

  return Data(f(train), y[train], f(val), y[val], f(test), y[test])


class Block(nnx.Module):
  """Two 3x3 conv-BN layers and a (projection) shortcut, then ReLU."""

  def __init__(self, c_in: int, c_out: int, stride: int, *, rngs):
    conv = functools.partial(nnx.Conv, use_bias=False, rngs=rngs)
    bn = functools.partial(nnx.BatchNorm, momentum=0.9, rngs=rngs)
    self.conv1 = conv(c_in, c_out, (3, 3), strides=stride)
    self.bn1 = bn(c_out)
    self.conv2 = conv(c_out, c_out, (3, 3))
    self.bn2 = bn(c_out)
    if stride != 1 or c_in != c_out:
      self.proj = conv(c_in, c_out, (1, 1), strides=stride)
      self.bn_proj = bn(c_out)
    else:
      self.proj = None

  def __call__(self, x):
    h = jax.nn.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    skip = x if self.proj is None else self.bn_proj(self.proj(x))
    return jax.nn.relu(h + skip)


class ResNet(nnx.Module):
  """Stem, one residual block per stage, global pooling, classifier."""

  def __init__(self, widths=(8, 16), num_classes: int = NUM_CLASSES, *,
               rngs: nnx.Rngs):
    self.stem = nnx.Conv(1, widths[0], (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(widths[0], momentum=0.9, rngs=rngs)
    blocks, c = [], widths[0]
    for i, w in enumerate(widths):
      blocks.append(Block(c, w, 1 if i == 0 else 2, rngs=rngs))
      c = w
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(c, num_classes, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


def model(seed: int = 0, quick: bool = False) -> ResNet:
  del quick
  return ResNet(rngs=nnx.Rngs(seed))


def base(total_steps: int, quick: bool = False):
  del quick
  return optax.chain(
      optax.add_decayed_weights(5e-4),
      optax.sgd(optax.cosine_decay_schedule(0.05, total_steps), momentum=0.9,
                nesterov=True))


def train_targets(data: Data, setting: str, seed: int) -> np.ndarray:
  return noisy_labels(data.y_train, noise_of(setting), seed, NUM_CLASSES)


PROBLEM = Problem(
    name="images-cnn",
    description="ResNet-style CNN with BatchNorm (2 stages, 8/16 ch) on "
    "Animal-Shape MNIST 14x14 (5,000 train), batch 64, SGD Nesterov, "
    "cosine, 6 epochs, symmetric label noise",
    load=load, model=model, example_loss=classification_loss,
    metric="accuracy", higher_is_better=True, evaluate=correct, base=base,
    batch_size=64, epochs=6, quick_epochs=3,
    settings=("noise=0.4", "noise=0.2"), quick_settings=("noise=0.4",),
    train_targets=train_targets, example_ids=True, num_outputs=NUM_CLASSES,
    # Two values per method (the CPU budget); around the radii that helped
    # in a pilot at 40% noise (SAM's ρ = 0.1 hurt at 6 epochs).
    grids=grids(sam=(0.02, 0.05), asam=(0.2, 0.5), msam=(0.3, 1.0),
                rwp=(0.002, 0.005), lam=(0.3, 1.0)),
)
