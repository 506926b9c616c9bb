"""Step time of the SAM variants against the base optimizer, on a small MLP.

Measures the average time of a jitted training step (SGD with momentum as
the base optimizer) for

* ``sgd``: the base optimizer alone (1 gradient per step);
* ``sam``, ``gsam``, ``friendly_sam``: 2 gradients per step;
* ``looksam k=1``: a SAM gradient every step, through the ``lax.cond``;
* ``looksam k=5``, ``k=10``: a SAM gradient every k-th step only. If the
  skipped steps really skip the second gradient, their average step costs
  about (k + 1)/k plain steps, not 2.

Method: one compiled step per variant, warmed up; then rounds in which every
variant runs a block of 20 consecutive steps (a multiple of k, so each block
has the same mix of SAM and reuse steps) timed with ``block_until_ready``,
the variants interleaved within each round so that a background load hits
them alike. Reported: the median and the best (minimum) over rounds of the
time per step, the ratio to ``sgd`` (median over rounds of the ratio to the
``sgd`` block of the same round, and ratio of the best times, which is the
least sensitive to other jobs on the machine), and the temporary memory XLA
allocates for the compiled step.

Run (about 30 s on 2 CPU cores)::

  python benchmarks/variants.py
  python benchmarks/variants.py --rounds 15 --hidden 1024
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax

BLOCK = 20  # Steps per timed block: a multiple of every k below.


def init_mlp(seed, sizes):
  rng = np.random.default_rng(seed)
  return [(jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2.0 / a),
                       jnp.float32), jnp.zeros(b, jnp.float32))
          for a, b in zip(sizes[:-1], sizes[1:])]


def loss_fn(params, x, y):
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()


def optimizers(lr=0.05, rho=0.05):
  base = lambda: optax.sgd(lr, momentum=0.9)  # noqa: E731
  return {
      "sgd": base(),
      "sam": sam_optax.sam(base(), rho=rho),
      "gsam": sam_optax.gsam(base(), rho=rho, alpha=0.3),
      "friendly_sam": sam_optax.friendly_sam(base(), rho=rho),
      "looksam k=1": sam_optax.looksam(base(), rho=rho, k=1),
      "looksam k=5": sam_optax.looksam(base(), rho=rho, k=5),
      "looksam k=10": sam_optax.looksam(base(), rho=rho, k=10),
  }


def make_step(name, tx):
  grad = jax.grad(loss_fn)
  if name == "sgd":
    def step(params, state, x, y):
      updates, state = tx.update(grad(params, x, y), state, params)
      return optax.apply_updates(params, updates), state
  else:
    def step(params, state, x, y):
      updates, state = tx.update(grad(params, x, y), state, params,
                                 grad_fn=lambda p: grad(p, x, y))
      return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--batch", type=int, default=256)
  args = parser.parse_args()

  sizes = (64, args.hidden, args.hidden, 10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, sizes[0])), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=args.batch))
  runs = {}
  for name, tx in optimizers().items():
    params = init_mlp(0, sizes)
    state = tx.init(params)
    step = make_step(name, tx)
    memory = step.lower(params, state, x, y).compile().memory_analysis()
    for _ in range(BLOCK):  # Compile and warm up.
      params, state = step(params, state, x, y)
    jax.block_until_ready(params)
    runs[name] = dict(step=step, params=params, state=state, times=[],
                      temp=getattr(memory, "temp_size_in_bytes", 0))

  for _ in range(args.rounds):
    for run in runs.values():
      params, state = run["params"], run["state"]
      start = time.perf_counter()
      for _ in range(BLOCK):
        params, state = run["step"](params, state, x, y)
      jax.block_until_ready((params, state))
      run["times"].append((time.perf_counter() - start) / BLOCK)
      run["params"], run["state"] = params, state

  base = np.asarray(runs["sgd"]["times"])
  n_params = sum(w.size + b.size for w, b in init_mlp(0, sizes))
  print(f"MLP {'-'.join(map(str, sizes))} ({n_params} params), batch "
        f"{args.batch}, {args.rounds} rounds of {BLOCK} steps; "
        f"jax {jax.__version__}, {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()})")
  print(f"{'optimizer':<14}{'median':>9}{'best':>9}{'vs sgd':>8}"
        f"{'best vs':>9}{'expected':>10}{'temp mem':>10}")
  best_base = base.min()
  for name, run in runs.items():
    times = np.asarray(run["times"])
    ratio = np.median(times / base)  # Paired with sgd in the same round.
    if name == "sgd":
      expected = 1.0
    elif name.startswith("looksam"):
      k = int(name.split("=")[1])
      expected = (k + 1) / k
    else:
      expected = 2.0
    print(f"{name:<14}{np.median(times) * 1e3:>7.2f}ms"
          f"{times.min() * 1e3:>7.2f}ms{ratio:>7.2f}x"
          f"{times.min() / best_base:>8.2f}x{expected:>9.2f}x"
          f"{run['temp'] / 2**20:>8.1f}MB")
  print("expected: gradient evaluations per step relative to sgd (the "
        "update arithmetic is not counted).")


if __name__ == "__main__":
  main()
