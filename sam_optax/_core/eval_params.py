"""``eval_params``: the weights to evaluate and save, for every method.

Most methods hold the clean weights w in the training loop and perturb only
inside ``update``. One-gradient methods (MSAM, random weight perturbation)
instead keep the loop's params at the *perturbed* point, where their single
gradient is taken, like ``optax.contrib.schedule_free``. Such a method
registers, for the type of its ``SAMState.method_state``, how to get w back
from the held params; :func:`eval_params` finds the ``SAMState`` anywhere in
an optimizer state (inside ``optax.chain``, ``inject_hyperparams``, ...) and
applies it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from sam_optax._core import skeleton as _skeleton

# type(method_state) -> fn(sam_state, held_params) -> clean params.
_UNPERTURB: dict[type, Callable[[_skeleton.SAMState, Any], Any]] = {}


def register(method_state_type: type,
             unperturb: Callable[[_skeleton.SAMState, Any], Any]) -> None:
  """Declares that a method holds perturbed params, and how to undo it."""
  _UNPERTURB[method_state_type] = unperturb


def eval_params(state: Any, params: Any) -> Any:
  """The weights to evaluate and checkpoint, given the held ``params``.

  For the methods that hold the clean weights (``sam``, ``gsam``,
  ``looksam``, ...) this is ``params`` itself. For the one-gradient methods
  that keep the training loop's params at a perturbed point, it removes the
  perturbation. ``state`` is the whole optimizer state: the method's
  :class:`sam_optax.SAMState` is found wherever it sits (``optax.chain``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``, ...).

  .. warning::
    Evaluate and save ``eval_params(state, params)``, not the held params:
    for a one-gradient method those are perturbed.

  Args:
    state: the optimizer state returned by ``init``/``update``.
    params: the params the training loop holds.

  Returns:
    The clean params, a pytree like ``params``.

  Raises:
    ValueError: if ``state`` holds several SAM states that perturb the params
      (ambiguous).

  Examples:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(optax.clip(1.0), sam_optax.sam(optax.sgd(0.1)))
    >>> params = jnp.ones(2)
    >>> sam_optax.eval_params(tx.init(params), params)
    Array([1., 1.], dtype=float32)
  """
  found = [leaf for leaf in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, _skeleton.SAMState))
           if isinstance(leaf, _skeleton.SAMState)]
  perturbing = [s for s in found if type(s.method_state) in _UNPERTURB]
  if len(perturbing) > 1:
    raise ValueError(
        f"eval_params found {len(perturbing)} SAM states that perturb the "
        "params; call it on the part of the optimizer state that belongs to "
        "the params you pass.")
  if not perturbing:
    return params
  sam_state = perturbing[0]
  return _UNPERTURB[type(sam_state.method_state)](sam_state, params)
