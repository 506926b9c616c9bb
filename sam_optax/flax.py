r"""SAM with Flax: NNX modules and linen ``TrainState``, BatchNorm-correct.

``import sam_optax`` does not import Flax; this module does (``pip install
'sam_optax[flax]'``).

Both halves follow the reference semantics of google-research/sam:

* **BatchNorm.** The running statistics are updated by the clean pass only;
  the perturbed pass (at :math:`w + \epsilon`) normalises with its own batch
  statistics, as any training-mode pass does, but its updates of the running
  statistics are discarded.
* **Dropout.** The perturbed pass draws the same dropout masks as the clean
  pass, so that :math:`\nabla L(w + \epsilon)` is the gradient of the same
  function whose gradient gave ε.

NNX (:func:`nnx_value_and_grad`, :func:`nnx_grad_fn`): the perturbed pass runs
on a *pure copy* of the model's non-parameter state (BatchStats, RNG counts)
taken before the clean pass. Merging the live state instead (``nnx.split``
returns the model's own ``Variable`` objects) would write the perturbed pass's
statistics into the model, and the RNG streams would have advanced, giving
other dropout masks.

linen (:class:`SAMTrainState`): a ``TrainState`` with ``batch_stats`` whose
``apply_gradients`` forwards ``grad_fn`` to the optimizer, and a
:meth:`SAMTrainState.train_step` that keeps the clean pass's statistics
(``pmean``'d over ``axis_name``) and drops the perturbed pass's.

References:
  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021, and its
  code, https://github.com/google-research/sam.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax import lax

from sam_optax import _masks, _sharding

try:
  from flax import nnx
  from flax.training import train_state as _train_state
except ImportError as e:  # pragma: no cover - exercised in a subprocess test.
  raise ImportError(
      "sam_optax.flax needs Flax: install it with "
      "`pip install 'sam_optax[flax]'` or `pip install flax`. The core "
      "`import sam_optax` works without it.") from e

__all__ = (
    "SAMTrainState",
    "nnx_grad_fn",
    "nnx_value_and_grad",
)


# ----------------------------------------------------------------------- NNX


def _leaf_paths(tree: Any) -> list[str]:
  return [_masks.path_str(path) for path, _ in
          jax.tree_util.tree_flatten_with_path(nnx.as_pure(tree))[0]]


def _has_graph_nodes(tree: Any) -> bool:
  leaves = jax.tree.leaves(tree, is_leaf=nnx.graph.is_graph_node)
  return any(nnx.graph.is_graph_node(leaf) for leaf in leaves)


def nnx_grad_fn(
    model: nnx.Module,
    loss_fn: Callable[..., Any],
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    value_and_grad: bool = False,
) -> Callable[[Any], Any]:
  """The ``grad_fn`` for an NNX model, from its state *now*.

  Call it **before** the clean forward pass. It snapshots the model's state
  other than ``wrt`` (BatchStats, dropout RNG counts, ...) and of any NNX
  objects in ``args`` (e.g. an ``nnx.Rngs`` passed to the loss) as plain
  arrays, and returns ``grad_fn(perturbed_params)``, which rebuilds a
  throwaway copy of the model from ``perturbed_params`` and that snapshot and
  differentiates ``loss_fn(copy, *args)``. So the perturbed pass uses the
  dropout masks of the clean pass that follows, and cannot touch the live
  model: its BatchNorm statistics and RNG advances are discarded. Works under
  ``nnx.jit`` (``nnx.clone`` would raise a TraceContextError there).

  :func:`nnx_value_and_grad` does the snapshot and the clean pass in one call.

  Args:
    model: the NNX model, in the state of the upcoming clean pass.
    loss_fn: ``loss_fn(model, *args)`` returns the scalar loss, or
      ``(loss, aux)`` if ``has_aux``.
    *args: the other arguments of ``loss_fn`` (the batch, ...).
    wrt: the filter of the optimized variables; the same as the ``wrt`` of
      the ``nnx.Optimizer``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the perturbed pass's
      ``aux`` is dropped.
    value_and_grad: ``grad_fn`` returns ``(loss, grads)``, for
      ``sam_optax.sam(..., value_and_grad=True)``.

  Returns:
    ``grad_fn(perturbed_params)``: the gradient (an ``nnx.State`` of arrays
    shaped like ``perturbed_params``), or ``(loss, gradient)``. Use it with
    ``sam`` (``has_aux=False``).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import sam_optax, sam_optax.flax
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> optimizer = nnx.Optimizer(
    ...     model, sam_optax.sam(optax.sgd(0.1), rho=0.05), wrt=nnx.Param)
    >>> grad_fn = sam_optax.flax.nnx_grad_fn(model, loss_fn, x, y)
    >>> grads = nnx.grad(loss_fn)(model, x, y)  # the clean pass, after
    >>> _ = optimizer.update(model, grads, grad_fn=grad_fn)
  """
  graphdef, params, rest = nnx.split(model, wrt, ...)
  rest = nnx.as_pure(rest)  # Fresh Variables on merge: no aliasing.
  expected_paths = _leaf_paths(params)
  if _has_graph_nodes(args):
    args_def, args_state = nnx.split(args)
    args_state = nnx.as_pure(args_state)

    def get_args():
      return nnx.merge(args_def, args_state)
  else:

    def get_args():
      return args

  def loss_at(params):
    out = loss_fn(nnx.merge(graphdef, params, rest), *get_args())
    return out[0] if has_aux else out

  def grad_fn(perturbed_params):
    paths = _leaf_paths(perturbed_params)
    if paths != expected_paths:
      raise ValueError(
          "grad_fn got params with the leaves "
          f"{paths}, but the model's variables selected by wrt={wrt!r} are "
          f"{expected_paths}: pass the same `wrt` to nnx_grad_fn / "
          "nnx_value_and_grad as to nnx.Optimizer(model, tx, wrt=...).")
    if value_and_grad:
      return jax.value_and_grad(loss_at)(perturbed_params)
    return jax.grad(loss_at)(perturbed_params)

  return grad_fn


def nnx_value_and_grad(
    model: nnx.Module,
    loss_fn: Callable[..., Any],
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    value_and_grad: bool = False,
) -> tuple[Any, Any, Callable[[Any], Any]]:
  """The clean pass and SAM's ``grad_fn`` for an NNX model, in one call.

  Snapshots the model's non-``wrt`` state with :func:`nnx_grad_fn` (so the
  perturbed pass will see the same dropout masks), then runs the clean pass
  ``nnx.value_and_grad(loss_fn)(model, *args)``, which updates the model's
  BatchNorm statistics and RNG streams as usual.

  Args:
    model: the NNX model.
    loss_fn: ``loss_fn(model, *args)`` returns the scalar loss, or
      ``(loss, aux)`` if ``has_aux``.
    *args: the other arguments of ``loss_fn``. NNX objects among them (an
      ``nnx.Rngs``) are snapshotted like the model's own state.
    wrt: the filter of the optimized variables; the same as the ``wrt`` of
      the ``nnx.Optimizer``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``. The clean pass's
      ``aux`` is returned, the perturbed pass's dropped.
    value_and_grad: ``grad_fn`` returns ``(loss, grads)``, for
      ``sam_optax.sam(..., value_and_grad=True)``.

  Returns:
    ``(loss, grads, grad_fn)`` (``((loss, aux), grads, grad_fn)`` with
    ``has_aux``): the clean loss, the clean gradient (an ``nnx.State`` over
    ``wrt``) and the ``grad_fn`` to pass to ``nnx.Optimizer.update``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import sam_optax, sam_optax.flax
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.dense = nnx.Linear(3, 4, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(4, rngs=rngs)
    ...     self.drop = nnx.Dropout(0.2, rngs=rngs)
    ...     self.head = nnx.Linear(4, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(self.drop(nnx.relu(self.bn(self.dense(x)))))
    >>> def loss_fn(model, x, y):
    ...   logits = model(x)
    ...   return optax.softmax_cross_entropy_with_integer_labels(
    ...       logits, y).mean()
    >>> model = Net(nnx.Rngs(0))
    >>> tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   loss, grads, grad_fn = sam_optax.flax.nnx_value_and_grad(
    ...       model, loss_fn, x, y)
    ...   optimizer.update(model, grads, grad_fn=grad_fn)
    ...   return loss
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8) % 2
    >>> loss = train_step(model, optimizer, x, y)
    >>> int(optimizer.step[...])
    1
  """
  grad_fn = nnx_grad_fn(model, loss_fn, *args, wrt=wrt, has_aux=has_aux,
                        value_and_grad=value_and_grad)
  value, grads = nnx.value_and_grad(
      loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(model, *args)
  return value, grads, grad_fn


# --------------------------------------------------------------------- linen


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
