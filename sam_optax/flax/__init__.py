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

try:
  import flax  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess test.
  raise ImportError(
      "sam_optax.flax needs Flax: install it with "
      "`pip install 'sam_optax[flax]'` or `pip install flax`. The core "
      "`import sam_optax` works without it.") from e

from sam_optax.flax._linen import SAMTrainState
from sam_optax.flax._nnx import nnx_grad_fn, nnx_value_and_grad

__all__ = (
    "SAMTrainState",
    "nnx_grad_fn",
    "nnx_value_and_grad",
)
