"""Random weight perturbation: the gradient at w + ε, ε filter-wise Gaussian
noise (Li et al.), one gradient per step."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sam_optax._core import eval_params as _eval_params
from sam_optax._core import gradient as _gradient
from sam_optax._core import skeleton as _skeleton
from sam_optax._core import tree as _tree
from sam_optax._core import validation as _validation


class RWPState(NamedTuple):
  """What :func:`rwp` keeps between steps (``SAMState.method_state``).

  Attributes:
    key: the raw data of the PRNG key all the noise derives from
      (``jax.random.key_data``; ``uint32[2]`` for ``"threefry"`` and
      ``"hash"``, the same as ``jax.random.PRNGKey(seed)``, ``uint32[4]``
      for ``"rbg"``/``"unsafe_rbg"``): step ``t``'s noise is drawn from
      ``jax.random.fold_in(key, t)``.
    noise_std: per leaf, the standard deviation of the noise the held params
      carry: one per filter (last axis) for leaves with 2 or more axes, one
      per leaf otherwise (float32; all 0 before the first step).
    noise: with ``store_noise=True``, the noise ε the held params carry
      (params' structure, float32 or float64); ``None`` otherwise (it is
      regenerated from ``key``).

  The state's type records the generator (``RWPState`` itself for
  ``"threefry"``, a subclass with a ``generator`` class attribute for the
  others), so that :func:`sam_optax.eval_params` regenerates the same noise.
  """

  key: jax.Array  # shape=(2,) or (4,), dtype=jnp.uint32
  noise_std: Any  # per leaf: shape=(leaf.shape[-1],) or (), float32
  noise: Any = None  # like params, float32 (store_noise=True), else None

  generator = "threefry"


GENERATORS = ("threefry", "hash", "rbg", "unsafe_rbg")
_KEY_IMPL = {"threefry": "threefry2x32", "hash": "threefry2x32",
             "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}
_STATE_TYPES = {"threefry": RWPState}
for _g in GENERATORS[1:]:
  _STATE_TYPES[_g] = type(f"RWPState_{_g}", (RWPState,),
                          {"__slots__": (), "generator": _g})


def filter_norms(params: Any) -> Any:
  """Per leaf: the L2 norm of each filter (last axis) for leaves with 2 or
  more axes, of the whole leaf otherwise (float32)."""

  def leaf_norm(w):
    w = jnp.asarray(w, jnp.float32)
    if w.ndim >= 2:
      return jnp.sqrt(jnp.sum(w * w, axis=tuple(range(w.ndim - 1))))
    return jnp.sqrt(jnp.sum(w * w))

  return jax.tree.map(leaf_norm, params)


def _mix32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer mix (xor-shift-multiply, 'lowbias32')."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_normal(round_keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  r"""Standard normals from a keyed counter hash (the ``"hash"`` generator).

  Element ``i`` is :math:`\sqrt 2\, \mathrm{erf}^{-1}(2u_i - 1)` with
  :math:`u_i` the top 24 bits of ``mix(mix(mix(i ^ k_0) ^ k_1) ^ k_2)``
  plus one half, over :math:`2^{24}` (``round_keys``: three ``uint32``):
  one pass of integer arithmetic, no threefry rounds. Not cryptographic;
  the normals are cut at about 5.4 (24-bit uniforms).
  """
  size = math.prod(shape)
  x = lax.iota(jnp.uint32, size)
  for i in range(3):
    x = _mix32(x ^ round_keys[i])
  u = ((x >> 8).astype(jnp.float32) + 0.5) * jnp.float32(2.0 ** -24)
  z = jnp.float32(math.sqrt(2.0)) * lax.erf_inv(2.0 * u - 1.0)
  return z.reshape(shape)


def noise(key: jax.Array, step: Any, noise_std: Any, params: Any,
          generator: str = "threefry") -> Any:
  """The noise of step ``step``: N(0, std²) per filter, in float32.

  ``key`` is the raw key data in the state (see :class:`RWPState`).
  """
  leaves, treedef = jax.tree.flatten(params)
  typed = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32),
                                   impl=_KEY_IMPL[generator])
  step_key = jax.random.fold_in(typed, step)
  stds = treedef.flatten_up_to(noise_std)
  if generator == "hash":
    round_keys = jax.random.bits(step_key, (max(len(leaves), 1), 3),
                                 jnp.uint32)
    draws = [hash_normal(round_keys[i], jnp.shape(w))
             for i, w in enumerate(leaves)]
  else:
    keys = jax.random.split(step_key, max(len(leaves), 1))
    draws = [jax.random.normal(k, jnp.shape(w), jnp.float32)
             for k, w in zip(keys, leaves)]
  return treedef.unflatten([z * s for z, s in zip(draws, stds)])


def _unperturb(sam_state: _skeleton.SAMState, params: Any) -> Any:
  """w = held - ε, ε stored or regenerated from the key, step and stds."""
  ms = sam_state.method_state
  eps = ms.noise
  if eps is None:
    eps = noise(ms.key, sam_state.step_count, ms.noise_std, params,
                type(ms).generator)
  return jax.tree.map(lambda p, e: (p - e).astype(p.dtype), params, eps)


def rwp(
    base_tx: optax.GradientTransformation,
    std: optax.ScalarOrSchedule = 0.01,
    *,
    seed: int | jax.Array = 0,
    axis_name: Any = None,
    generator: str = "threefry",
    store_noise: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Random weight perturbation (RWP): the gradient at Gaussian-perturbed
  weights, one gradient per step.

  Each step's gradient is taken at :math:`\tilde w_t = w_t + \epsilon_t`
  with fresh noise scaled to each filter's norm, as in the authors' code
  (``ARWP.first_step`` with ``eta = 0``):

  .. math::

    \epsilon_t[\ldots, j] \sim \mathcal N\!\left(0,\;
      \sigma_t^2 \,\|w_t[\ldots, j]\|_2^2\right)

  for a leaf with 2 or more axes (filter :math:`j` = the *last* axis, the
  output units of Flax ``Dense``/``Conv`` kernels; PyTorch's first axis), and
  :math:`\mathcal N(0, \sigma_t^2 \|w_t\|_2^2)` for biases and scalars. The
  base optimizer, fed :math:`\nabla L(\tilde w_t)`, updates the clean
  :math:`w_t \to w_{t+1}`.

  **Calling convention (drop-in, one gradient):** the training loop holds
  :math:`\tilde w` and the train step is a plain Optax step (no
  ``grad_fn``); each ``update`` moves the held params from
  :math:`w_t + \epsilon_t` to :math:`w_{t+1} + \epsilon_{t+1}`. The noise is
  not stored by default: it is regenerated from a PRNG key in the state
  (the only extra state is the key and one float per filter), so ``update``
  draws twice per step (:math:`\epsilon_t` to remove, :math:`\epsilon_{t+1}`
  to add); ``store_noise=True`` keeps :math:`\epsilon_t` in the state
  instead (one param-sized float32 buffer) and draws once per step, with
  the same trajectory. The first gradient is taken at :math:`w_0` (no noise
  yet).

  **Cost.** A step costs one gradient plus the noise: drawing normals with
  JAX's default threefry generator costs more than a small model's gradient
  on CPU (measured: about 20 ms per million normals on 2 CPU cores, more
  than an MLP step at batch 256). ``generator`` chooses the generator:

  * ``"threefry"`` (default): ``jax.random.normal`` with the default
    threefry key: reproducible across backends, devices and shardings for
    the same seed (JAX's guarantee), slow on CPU;
  * ``"hash"``: a keyed counter hash (three rounds of a 32-bit
    xor-shift-multiply mix per element, keyed per leaf and step by threefry
    on a few scalars) and :math:`\sqrt2\,\mathrm{erf}^{-1}(2u - 1)` on its
    top 24 bits (:func:`hash_normal`): one pass of integer arithmetic,
    about 10x faster than threefry on CPU; a pure function of (seed, step,
    leaf, element index), so it is as reproducible as threefry (the
    integers are exact; :math:`\mathrm{erf}^{-1}` may differ in the last
    bit between backends). Not a cryptographic generator, and the normals
    are cut at about 5.4 standard deviations;
  * ``"rbg"``/``"unsafe_rbg"``: ``jax.random.key(seed, impl=...)``, XLA's
    ``RngBitGenerator``: fast on GPU and TPU, *slower* than threefry on
    XLA:CPU (measured). Its bits may change across backends and JAX
    versions, and under a sharded ``jit`` may depend on the sharding;
    ``unsafe_rbg``'s ``fold_in``/``split`` are of lower statistical quality
    (see ``jax.random``'s documentation).

  Every generator derives step ``t``'s noise from ``fold_in(key, t)`` of the
  key in the state, so the same seed gives the same run, and under
  ``axis_name`` every device (its key replicated) draws the same noise.

  .. warning::
    Evaluate and checkpoint ``sam_optax.eval_params(state, params)``, the
    clean :math:`w`, not the held (noisy) params.

  Differences from the authors' code: the base optimizer receives the held
  params, so a weight decay in it (``optax.add_decayed_weights``) decays
  :math:`w + \epsilon` (theirs decays :math:`w`: a zero-mean difference
  :math:`\lambda \epsilon` in the gradient); and the adaptive variant (ARWP,
  noise divided by :math:`\sqrt{1 + \eta F}` with a running Fisher :math:`F`)
  and the mixed loss of m-ARWP (two gradients) are not implemented. The
  paper grows σ during training (``CosineInc``: :math:`\sigma_t = \sigma_0
  (1 + k (1 - \cos(\pi t / T)) / 2)`, e.g. :math:`k = 10`): pass it as a
  schedule.

  Args:
    base_tx: the optimizer that applies the gradient.
    std: σ ≥ 0, the noise's standard deviation relative to each filter's
      norm, or a schedule of the step (authors' scripts: 0.001 to 0.01 at
      the start, with their increasing schedule).
    seed: the seed of the PRNG key kept in the state (an int).
    axis_name: the data-parallel axis of ``pmap``/``shard_map``: every device
      draws the *same* noise (the key is replicated, so the held params stay
      replicated) and the gradients are averaged (one ``pmean``).
    generator: ``"threefry"`` (default), ``"hash"`` (fastest on CPU),
      ``"rbg"`` or ``"unsafe_rbg"``: see **Cost** above.
    store_noise: keep :math:`\epsilon_t` in the state (one param-sized
      float32 buffer) instead of regenerating it: one draw per step instead
      of two, the same trajectory.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`sam_optax.SAMState` whose ``method_state`` is a
    :class:`sam_optax.RWPState`. Its ``radius`` is :math:`\|\epsilon_t\|_2`,
    the norm of the noise at which this step's gradient was taken.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> loss = lambda w: jnp.sum((w["k"] - 1.0) ** 2)
    >>> tx = sam_optax.rwp(optax.sgd(0.1), std=0.1)
    >>> @jax.jit
    ... def step(params, state):  # A plain Optax step: no grad_fn.
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> params = {"k": jnp.zeros((3, 2))}
    >>> state = tx.init(params)
    >>> params, state = step(params, state)  # The first step has no noise.
    >>> clean = sam_optax.eval_params(state, params)["k"]
    >>> bool(jnp.allclose(clean, 0.2))  # w_1 = w_0 - 0.1 g(w_0)
    True
    >>> bool(jnp.any(params["k"] != clean))  # the held params are noisy
    True
    >>> state.method_state.noise_std["k"].round(4)  # σ ‖w[:, j]‖ per filter
    Array([0.0346, 0.0346], dtype=float32)

  References:
    Li et al., `Revisiting Random Weight Perturbation for Efficiently
    Improving Generalization <https://arxiv.org/abs/2404.00357>`_, TMLR 2024
    (official code: nblt/mARWP, ``ARWP`` in ``utils.py``); Bisla et al.,
    `Low-Pass Filtering SGD for Recovering Flat Optima
    <https://arxiv.org/abs/2201.08025>`_, AISTATS 2022 (filter-wise noise).
  """

  if generator not in GENERATORS:
    raise ValueError(f"rwp: generator must be one of {GENERATORS}, got "
                     f"{generator!r}.")
  _validation.check_bools(store_noise=store_noise)
  state_type = _STATE_TYPES[generator]

  def init_method_state(params):
    key = jax.random.key_data(jax.random.key(
        jnp.asarray(seed).astype(jnp.int32), impl=_KEY_IMPL[generator]))
    zeros = jax.tree.map(lambda s: jnp.zeros_like(s),
                         filter_norms(params))
    stored = None
    if store_noise:
      stored = _tree.to_compute(optax.tree.zeros_like(params))
    return state_type(key, zeros, stored)

  def rule(step, method_state):
    eps = method_state.noise
    if eps is None:
      eps = noise(method_state.key, step.step_count, method_state.noise_std,
                  step.params, generator)
    zero = jnp.zeros([], jnp.float32)
    info = _gradient.SAMInfo(zero, _tree.norm(eps).astype(jnp.float32),
                             None, None, None)
    # ε_t goes on to ``finish`` with the state (the skeleton hands the rule's
    # method state to ``finish``; only ``finish``'s is kept): regenerated at
    # most once per step (or read from the state), never twice.
    return step.pmean(step.grads), (method_state, eps), info

  def finish(step, updates, base_state, method_state):
    method_state, old = method_state
    key, count = method_state.key, step.step_count
    clean = jax.tree.map(lambda p, e: _tree.to_compute(p) - e, step.params,
                         old)
    u = _tree.to_compute(updates)
    next_clean = jax.tree.map(jnp.add, clean, u)
    sigma = _skeleton.rho_at(std, optax.safe_increment(count), base_state)
    new_std = jax.tree.map(lambda n: jnp.asarray(sigma, jnp.float32) * n,
                           filter_norms(next_clean))
    new = noise(key, optax.safe_increment(count), new_std, step.params,
                generator)
    new_updates = jax.tree.map(
        lambda u, a, b, ref: (u - a + b).astype(ref.dtype), u, old, new,
        updates)
    stored = None
    if store_noise:
      stored = optax.tree.cast_like(new, method_state.noise)
    return new_updates, state_type(key, new_std, stored)

  return _skeleton.transformation(
      "rwp", base_tx, rule, std, _gradient.AscentOptions(),
      axis_name=axis_name, needs_grad_fn=False, finish=finish,
      init_method_state=init_method_state)


for _type in _STATE_TYPES.values():
  _eval_params.register(_type, _unperturb)
