"""linen: a ``TrainState`` with ``batch_stats`` whose updates run SAM."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax.training import train_state as _train_state
from jax import lax

from sam_optax._core import sharding as _sharding


class SAMTrainState(_train_state.TrainState):
  """A linen ``TrainState`` with ``batch_stats`` that can run SAM.

  ``flax.training.train_state.TrainState.apply_gradients`` calls
  ``tx.update(grads, opt_state, params)`` with no ``grad_fn``, so it cannot
  drive :func:`sam_optax.sam`. Here ``apply_gradients(grads=..., grad_fn=...,
  **kwargs)`` passes ``grad_fn`` on to ``tx.update``; of the other keyword
  arguments, the names of fields of the state (``batch_stats=...``) replace
  those fields as in ``TrainState``, and the others (e.g. ``value=loss``) go
  to ``tx.update`` too. A ``tx`` that takes no extra arguments (plain
  ``optax.sgd``) ignores them, so the same step also trains the base
  optimizer.

  :meth:`train_step` is the whole SAM step with BatchNorm done right.

  Attributes:
    batch_stats: the ``'batch_stats'`` collection (``None`` without
      BatchNorm).

  Examples:
    The step written out (what :meth:`train_step` does), with the perturbed
    pass's statistics dropped by ``sam(..., has_aux=True)``. With dropout,
    pass the same key to both passes, e.g. ``jax.random.fold_in(key,
    state.step)``.

    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import sam_optax, sam_optax.flax
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    ...     return nn.Dense(2)(nn.relu(x))
    >>> net = Net()
    >>> x, y = jnp.linspace(-1, 1, 24).reshape(8, 3), jnp.arange(8) % 2
    >>> variables = net.init(jax.random.key(0), x, train=False)
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05, has_aux=True)
    >>> state = sam_optax.flax.SAMTrainState.create(
    ...     apply_fn=net.apply, params=variables['params'], tx=tx,
    ...     batch_stats=variables['batch_stats'])
    >>> def loss_fn(params, batch_stats, x, y):
    ...   logits, updates = net.apply(
    ...       {'params': params, 'batch_stats': batch_stats}, x, train=True,
    ...       mutable=['batch_stats'])
    ...   loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    ...   return loss.mean(), updates['batch_stats']
    >>> @jax.jit
    ... def train_step(state, x, y):
    ...   grad = jax.value_and_grad(loss_fn, has_aux=True)
    ...   (loss, stats), grads = grad(state.params, state.batch_stats, x, y)
    ...   grad_fn = lambda p: jax.grad(loss_fn, has_aux=True)(
    ...       p, state.batch_stats, x, y)  # (grads, dropped stats)
    ...   return state.apply_gradients(grads=grads, grad_fn=grad_fn,
    ...                                batch_stats=stats), loss
    >>> state, loss = train_step(state, x, y)
    >>> int(state.step)
    1

    Under ``jax.pmap(..., axis_name='batch')`` with ``sam(...,
    axis_name='batch')``: keep the gradient local (no ``pmean``) and average
    the statistics, ``stats = jax.lax.pmean(stats, 'batch')``.
  """

  batch_stats: Any = None

  def apply_gradients(self, *, grads: Any, grad_fn: Callable[[Any], Any]
                      | None = None, **kwargs: Any) -> SAMTrainState:
    """Applies ``grads`` with ``tx``, passing ``grad_fn`` on to it.

    Args:
      grads: the clean gradient at ``self.params`` (local to this device
        under ``pmap``/``shard_map`` with ``sam(..., axis_name=...)``).
      grad_fn: ``grad_fn(perturbed_params)``, passed to ``tx.update``.
      **kwargs: names of fields of the state (``batch_stats``, ...) replace
        them; the others are passed to ``tx.update`` (e.g. ``value=loss``
        for ``sam(..., value_and_grad=True)``).

    Returns:
      The new state: ``step + 1``, new ``params`` and ``opt_state``, and the
      replaced fields.
    """
    fields = {f.name for f in dataclasses.fields(self)}
    replace = {k: v for k, v in kwargs.items() if k in fields}
    extra = {k: v for k, v in kwargs.items() if k not in fields}
    if grad_fn is not None:
      extra["grad_fn"] = grad_fn
    if isinstance(grads, dict) and _train_state.OVERWRITE_WITH_GRADIENT in (
        grads):
      raise NotImplementedError(
          "SAMTrainState does not support the "
          f"{_train_state.OVERWRITE_WITH_GRADIENT!r} collection.")
    tx = optax.with_extra_args_support(self.tx)
    updates, opt_state = tx.update(grads, self.opt_state, self.params,
                                   **extra)
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        opt_state=opt_state,
        **replace,
    )

  def train_step(
      self,
      loss_fn: Callable[..., tuple[Any, Any]],
      *args: Any,
      axis_name: Any = None,
      value_and_grad: bool = False,
  ) -> tuple[SAMTrainState, jax.Array]:
    """One SAM step that keeps the clean pass's BatchNorm statistics.

    The clean pass ``loss_fn(params, batch_stats, *args)`` gives the loss,
    the gradient and the new statistics. The perturbed pass runs at
    ``params + ε`` with the same ``batch_stats`` and ``args`` (so the same
    dropout key, hence the same masks) and its statistics are dropped.

    Args:
      loss_fn: ``loss_fn(params, batch_stats, *args)`` returns
        ``(loss, new_batch_stats)``: apply the model with
        ``mutable=['batch_stats']`` (return ``batch_stats`` unchanged if the
        model has none). Pass the dropout key in ``args``.
      *args: the batch, the dropout key, ...
      axis_name: under ``jax.pmap`` or ``jax.shard_map``: the data axis, the
        same as ``sam``'s. The gradient stays local (per-device ascent; under
        ``shard_map`` it is taken w.r.t.
        :func:`sam_optax.mark_varying` params), the new statistics and the
        returned loss are ``pmean``'d.
      value_and_grad: for ``sam(..., value_and_grad=True)``: ``grad_fn``
        returns ``(loss, grads)`` and the clean loss is passed as ``value``,
        so ``opt_state.sharpness`` is filled in.

    Returns:
      ``(new_state, loss)``: the clean loss (averaged over ``axis_name``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import flax.linen as nn
      >>> import sam_optax, sam_optax.flax
      >>> net = nn.Sequential([nn.Dense(4), nn.BatchNorm(False), nn.Dense(1)])
      >>> x, y = jnp.arange(8.0).reshape(4, 2), jnp.zeros((4, 1))
      >>> variables = net.init(jax.random.key(0), x)
      >>> state = sam_optax.flax.SAMTrainState.create(
      ...     apply_fn=net.apply, params=variables['params'],
      ...     tx=sam_optax.sam(optax.sgd(0.1), rho=0.05),
      ...     batch_stats=variables['batch_stats'])
      >>> def loss_fn(params, batch_stats, x, y):
      ...   out, updates = net.apply(
      ...       {'params': params, 'batch_stats': batch_stats}, x,
      ...       mutable=['batch_stats'])
      ...   return jnp.mean((out - y) ** 2), updates['batch_stats']
      >>> step = jax.jit(lambda state, x, y: state.train_step(loss_fn, x, y))
      >>> state, loss = step(state, x, y)
      >>> dense = variables['params']['layers_0']  # The running mean is
      >>> h = x @ dense['kernel'] + dense['bias']  # 0.01 x the clean batch's.
      >>> bool(jnp.allclose(state.batch_stats['layers_1']['mean'],
      ...                   0.01 * h.mean(0), atol=1e-6))
      True
    """
    params = self.params
    if axis_name is not None:
      params = _sharding.mark_varying(params, axis_name)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, self.batch_stats, *args)
    if axis_name is not None:
      batch_stats = lax.pmean(batch_stats, axis_name)

    def grad_fn(perturbed_params):
      (value, _), g = jax.value_and_grad(loss_fn, has_aux=True)(
          perturbed_params, self.batch_stats, *args)
      return (value, g) if value_and_grad else g

    extra = {"value": loss} if value_and_grad else {}
    state = self.apply_gradients(grads=grads, grad_fn=grad_fn,
                                 batch_stats=batch_stats, **extra)
    if axis_name is not None:
      loss = lax.pmean(loss, axis_name)
    return state, loss
