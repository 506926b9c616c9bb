"""Small Flax (linen) models shared by the benchmarks, with synthetic data.

Each entry of :data:`MODELS` builds a model, its initial variables and one
synthetic batch. The models are pure functions of ``(params, batch_stats)``
through ``model.apply``, so a training step is a plain jitted function:

* ``mlp``: a ReLU multi-layer perceptron on flattened 28x28 inputs;
* ``cnn``: a small VGG-style convolutional network with BatchNorm on 32x32x3
  inputs (the BatchNorm statistics are a separate ``batch_stats`` tree);
* ``transformer``: a token embedding, one pre-LayerNorm transformer block
  (multi-head self-attention and a 4x MLP) and a mean-pooled classifier.

Nothing here depends on the device: the same shapes are used on CPU and GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

NUM_CLASSES = 10


class MLP(nn.Module):
  """ReLU MLP; ``features`` are the hidden widths."""

  features: Sequence[int]

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape((x.shape[0], -1))
    for width in self.features:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(NUM_CLASSES)(x)


class CNN(nn.Module):
  """Two conv-BN-ReLU stages per resolution, max-pooling in between."""

  channels: Sequence[int]

  @nn.compact
  def __call__(self, x, train: bool = True):
    for c in self.channels:
      for _ in range(2):
        x = nn.Conv(c, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(NUM_CLASSES)(x)


class Transformer(nn.Module):
  """Embedding, one pre-LN transformer block, mean pooling, classifier."""

  vocab: int
  dim: int
  heads: int
  seq_len: int

  @nn.compact
  def __call__(self, tokens, train: bool = True):
    del train
    x = nn.Embed(self.vocab, self.dim)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (self.seq_len, self.dim))
    x = x + pos[None]
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * self.dim)(h)
    x = x + nn.Dense(self.dim)(nn.gelu(h))
    x = nn.LayerNorm()(x)
    return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=1))


@dataclasses.dataclass(frozen=True)
class Spec:
  """A benchmark model: a name, a module, and the shape of one batch."""

  name: str
  description: str
  module: nn.Module
  batch_size: int
  input_shape: tuple[int, ...]
  tokens: int = 0  # > 0: integer inputs in [0, tokens) (vocabulary size).

  def make_batch(self, seed: int = 0):
    """One synthetic batch ``(x, y)``."""
    kx, ky = jax.random.split(jax.random.key(seed))
    shape = (self.batch_size,) + self.input_shape
    if self.tokens:
      x = jax.random.randint(kx, shape, 0, self.tokens)
    else:
      x = jax.random.normal(kx, shape, jnp.float32)
    y = jax.random.randint(ky, (self.batch_size,), 0, NUM_CLASSES)
    return x, y

  def init(self, seed: int = 0):
    """``(params, batch_stats)``; ``batch_stats`` is ``{}`` without BN."""
    x, _ = self.make_batch(seed)
    variables = self.module.init(jax.random.key(seed), x, train=False)
    return variables["params"], variables.get("batch_stats", {})

  def loss_fn(self) -> Callable[..., Any]:
    """``loss(params, batch_stats, x, y) -> (loss, new_batch_stats)``.

    The new BatchNorm statistics are the auxiliary output, for
    ``jax.value_and_grad(..., has_aux=True)``.
    """
    module = self.module

    def loss(params, batch_stats, x, y):
      variables = {"params": params}
      if batch_stats:
        variables["batch_stats"] = batch_stats
        logits, updates = module.apply(variables, x, train=True,
                                       mutable=["batch_stats"])
        new_stats = updates["batch_stats"]
      else:
        logits, new_stats = module.apply(variables, x, train=True), {}
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return ce.mean(), new_stats

    return loss


MODELS: dict[str, Spec] = {
    s.name: s for s in (
        Spec("mlp-s", "MLP 784-512-512-10, batch 128", MLP((512, 512)),
             128, (28, 28)),
        Spec("mlp-l", "MLP 784-2048-2048-10, batch 32", MLP((2048, 2048)),
             32, (28, 28)),
        Spec("mlp-1m", "MLP 784-1024-256-10 (1.07M params), batch 128",
             MLP((1024, 256)), 128, (28, 28)),
        Spec("cnn-s", "CNN+BN 16-32 ch, 16x16x3, batch 16", CNN((16, 32)),
             16, (16, 16, 3)),
        Spec("cnn-l", "CNN+BN 32-64-128 ch, 16x16x3, batch 16",
             CNN((32, 64, 128)), 16, (16, 16, 3)),
        Spec("transformer-s", "Transformer d=64 h=4, seq 32, batch 16",
             Transformer(1000, 64, 4, 32), 16, (32,), tokens=1000),
        Spec("transformer-l", "Transformer d=128 h=4, seq 64, batch 8",
             Transformer(1000, 128, 4, 64), 8, (64,), tokens=1000),
    )
}


def num_params(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def scale_batch(spec: Spec, factor: int) -> Spec:
  """``spec`` with ``factor`` times its batch size (itself for 1)."""
  if factor == 1:
    return spec
  batch = spec.batch_size * factor
  return dataclasses.replace(
      spec, batch_size=batch,
      description=f"{spec.description} x{factor} = batch {batch}")
