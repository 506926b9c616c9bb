"""What a problem is: data, a Flax NNX model, a loss, a metric, a budget.

A :class:`Problem` owns everything that makes a training run of that problem
and nothing about the optimizer around its base optimizer: fixed train /
validation / test splits (``load``), the model (``model``), the per-example
loss, the metric, the base optimizer with its schedule, the batch, the
number of epochs, and a ``quick`` variant of all of it for tests and smoke
runs. The one training loop that uses it is :mod:`benchmarks.problems.train`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Data:
  """Fixed splits as NumPy arrays: inputs ``x_*``, targets ``y_*``.

  ``extra`` holds what a problem's evaluation needs besides the splits (e.g.
  the fine-tuning corpus of ``text-lm``); arrays only.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  extra: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def sizes(self) -> str:
    return (f"{len(self.x_train)} train / {len(self.x_val)} val / "
            f"{len(self.x_test)} test")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One benchmark problem. See the module docstring.

  Attributes:
    name: registry name, e.g. ``"digits-mlp"``.
    description: one line for tables.
    load: ``load(quick) -> Data`` (clean labels; cached by the caller).
    model: ``model(seed, quick) -> nnx.Module``.
    example_loss: ``example_loss(outputs, targets) -> (batch,)`` losses.
    metric: the reported metric's name (evaluated on validation to choose
      hyperparameters and on test once), e.g. ``"accuracy"``.
    higher_is_better: the metric's direction.
    evaluate: ``evaluate(outputs, targets) -> (batch,)`` per-example
      metric values; a split's metric is their mean.
    base: ``base(total_steps, quick) -> optax.GradientTransformation``.
    batch_size, epochs, quick_epochs: the budget; ``steps`` /
      ``quick_steps``, when set, cap the run at that many steps.
    settings: named settings (e.g. ``("noise=0.2", "noise=0.4")``), each a
      separate selection; ``quick_settings`` for ``--quick``.
    train_targets: ``train_targets(data, setting, seed) -> y_train`` (e.g.
      with label noise).
    example_ids: whether examples have stable indices (SAF's store).
    num_outputs: width of the model's output (SAF's store).
    extra_metrics: optional ``extra_metrics(ctx) -> {name: scalar}``, traced
      inside the jitted run (``ctx``: :class:`EvalContext`).
    grids: per-method hyperparameter grids that replace the frontier's
      defaults on this problem.
  """

  name: str
  description: str
  load: Callable[[bool], Data]
  model: Callable[[int, bool], nnx.Module]
  example_loss: Callable[[jax.Array, jax.Array], jax.Array]
  metric: str
  higher_is_better: bool
  evaluate: Callable[[jax.Array, jax.Array], jax.Array]
  base: Callable[[int, bool], optax.GradientTransformation]
  batch_size: int
  epochs: int
  quick_epochs: int
  settings: tuple[str, ...]
  quick_settings: tuple[str, ...]
  train_targets: Callable[[Data, str, int], np.ndarray]
  example_ids: bool = True
  num_outputs: int = 10
  extra_metrics: Callable[[Any], Mapping[str, jax.Array]] | None = None
  grids: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
  eval_chunk: int = 4096
  # A step budget instead of whole epochs (the last epoch cut short).
  steps: int | None = None
  quick_steps: int | None = None

  def epochs_for(self, quick: bool) -> int:
    return self.quick_epochs if quick else self.epochs

  def steps_for(self, quick: bool) -> int | None:
    return self.quick_steps if quick else self.steps


class Functional:
  """A Flax NNX model as pure functions of ``(params, rest)``.

  ``params`` are the ``nnx.Param`` leaves (what the optimizer updates);
  ``rest`` is everything else (BatchNorm statistics). ``apply(params, rest,
  x, train)`` returns ``(outputs, new_rest)``: in training mode BatchNorm
  normalises with the batch's statistics and updates its running averages;
  in evaluation mode it uses the running averages and ``new_rest is rest``.
  """

  def __init__(self, module: nnx.Module):
    self.graphdef, self.params, self.rest = nnx.split(module, nnx.Param, ...)

  def apply(self, params, rest, x, train: bool):
    # Fresh Variables at this trace level (NNX refuses to update a
    # BatchNorm statistic created under another trace, e.g. outside grad).
    params, rest = jax.tree.map(lambda a: a, (params, rest))
    module = nnx.merge(self.graphdef, params, rest)
    if train:
      module.train()
    else:
      module.eval()
    out = module(x)
    if not train:
      return out, rest
    _, _, new_rest = nnx.split(module, nnx.Param, ...)
    return out, new_rest


def noisy_labels(y: np.ndarray, noise: float, seed: int,
                 num_classes: int) -> np.ndarray:
  """Replaces a fraction ``noise`` of ``y`` by a different, random class."""
  rng = np.random.default_rng(10_000 + seed)
  y = y.copy()
  flip = rng.permutation(len(y))[:int(round(noise * len(y)))]
  y[flip] = (y[flip] + rng.integers(1, num_classes, len(flip))) % num_classes
  return y


def noise_of(setting: str) -> float:
  """``"noise=0.4"`` -> 0.4; ``"clean"`` -> 0."""
  if setting == "clean":
    return 0.0
  key, _, value = setting.partition("=")
  if key != "noise":
    raise ValueError(f"unknown setting {setting!r}")
  return float(value)


def classification_loss(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def correct(logits, y):
  """Per-example accuracy: 1 where the top class is the label, else 0."""
  return (jnp.argmax(logits, -1) == y).astype(jnp.float32)


def stratified_split(y: np.ndarray, sizes: tuple[int, ...],
                     seed: int = 0) -> list[np.ndarray]:
  """Index arrays of the given sizes, each with the classes' proportions.

  The last split takes what is left. Deterministic for a given ``seed``.
  """
  rng = np.random.default_rng(seed)
  classes = np.unique(y)
  per_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
  out, start = [], {c: 0 for c in classes}
  for i, size in enumerate(sizes):
    idx = []
    for c in classes:
      n_c = len(per_class[c])
      take = (n_c - start[c] if i == len(sizes) - 1
              else int(round(size * n_c / len(y))))
      idx.append(per_class[c][start[c]:start[c] + take])
      start[c] += take
    out.append(rng.permutation(np.concatenate(idx)))
  return out


def grids(sam, asam, msam, rwp, lam):
  """Per-method grids of a problem: ``sam`` radii serve every method with
  SAM's ρ (GSAM, LookSAM, Friendly-SAM, ESAM, AE-SAM and RST at p = 0.5);
  ``asam``, ``msam``, ``rwp`` (noise std) and ``lam`` (MESA/SAF) their own.
  """
  def rhos(values):
    return tuple({"rho": v} for v in values)

  out = {m: rhos(sam) for m in ("sam", "gsam", "looksam", "friendly_sam",
                                 "esam", "ae_sam")}
  out.update(asam=rhos(asam), msam=rhos(msam), rwp=rhos(rwp),
             rst=tuple({"rho": r, "p": 0.5} for r in sam),
             mesa=tuple({"lam": v} for v in lam),
             saf=tuple({"lam": v} for v in lam))
  return out
