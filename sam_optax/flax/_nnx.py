"""NNX: SAM's ``grad_fn`` from a module, with the clean pass's state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from sam_optax._core import masks as _masks


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
