"""Step time of the SAM variants against the base optimizer, on a small MLP.

Measures the average time of a jitted training step (SGD with momentum as
the base optimizer) for

* ``sgd``: the base optimizer alone (1 gradient per step);
* ``sam``, ``gsam``, ``friendly_sam``: 2 gradients per step;
* ``looksam k=1``: a SAM gradient every step, through the ``lax.cond``;
* ``looksam k=5``, ``k=10``: a SAM gradient every k-th step only. If the
  skipped steps really skip the second gradient, their average step costs
  about (k + 1)/k plain steps, not 2.

Method (``benchmarks/_common.py``): one compiled step per variant, warmed
up; then rounds in which every variant runs a sample of consecutive steps (a
multiple of 20, so of every k, so each sample has the same mix of SAM and
reuse steps) timed with ``block_until_ready``, the variants interleaved
round-robin with the order rotated each round so that a background load hits
them alike. Reported: the median [IQR] and the best (minimum) over rounds of
the time per step, the ratio to ``sgd`` (median [IQR] over rounds of the
ratio to the ``sgd`` sample of the same round, and the ratio of the best
times, the least sensitive to other jobs on the machine), and the temporary
memory XLA allocates for the compiled step.

Run (about 30 s on 2 CPU cores)::

  python benchmarks/variants.py
  python benchmarks/variants.py --rounds 15 --hidden 1024

The report goes to the git-ignored ``benchmarks/results/local/
variants_<device>.{json,md}``; ``--write`` writes the tracked
``benchmarks/results/variants_<device>.*``, ``--out STEM`` any path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import sam_optax  # noqa: E402

BLOCK = 20  # Steps per sample: a multiple of every k below.
PERIODS = (1, 5, 10)


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
      **{f"looksam k={k}": _common.looksam(base(), k, rho=rho)
         for k in PERIODS},
  }


def expected_ratio(name):
  """Gradient evaluations per step relative to sgd."""
  if name == "sgd":
    return 1.0
  if name.startswith("looksam"):
    k = int(name.split("=")[1])
    return (k + 1) / k
  return 2.0


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


def markdown(rows, info, argv, header):
  out = ["# SAM variants: step time (`benchmarks/variants.py`)", ""]
  out += _common.machine_markdown(info)
  out += [f"Command: `python benchmarks/variants.py {' '.join(argv)}`. "
          + header, "",
          "| optimizer | ms/step median [IQR] | best ms | x sgd median [IQR] "
          "| best x best sgd | expected | temp MiB |",
          "|---|---|---|---|---|---|---|"]
  for name, row in rows.items():
    out.append(
        f"| {name} | {_common.fmt_quantiles(row['ms'])} | "
        f"{row['ms']['min']:.2f} | {_common.fmt_quantiles(row['vs_sgd'])} | "
        f"{row['best_vs_best_sgd']:.2f} | {row['expected']:.2f} | "
        f"{row['temp_bytes'] / 2**20:.2f} |")
  out += ["", "expected: gradient evaluations per step relative to sgd (the "
          "update arithmetic is not counted)."]
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--sample-seconds", type=float, default=0.2,
                      help="approximate length of one timed sample")
  _common.add_output_args(parser, "variants_<device>")
  args = parser.parse_args(argv)
  argv_used = sys.argv[1:] if argv is None else list(argv)
  stem = _common.output_stem(args, f"variants_{_common.device_slug()}")

  info = _common.machine()
  sizes = (64, args.hidden, args.hidden, 10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, sizes[0])), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=args.batch))
  start = time.perf_counter()
  runners, temps = {}, {}
  for name, tx in optimizers().items():
    params = init_mlp(0, sizes)
    state = tx.init(params)
    _common.log(f"compiling {name}")
    step = make_step(name, tx).lower(params, state, x, y).compile()
    temps[name] = int(getattr(step.memory_analysis(), "temp_size_in_bytes",
                              0))
    runners[name] = _common.loop_runner(step, (params, state), x, y)
  samples, n = _common.time_interleaved(
      runners, args.rounds, args.sample_seconds, step_multiple=BLOCK,
      min_steps=BLOCK)
  elapsed = time.perf_counter() - start
  info["load_average_end"] = _common.load_average()

  best_sgd = min(samples["sgd"])
  rows = {name: {
      "ms": _common.quantiles(s * 1e3 for s in samples[name]),
      "vs_sgd": _common.paired(samples, name, "sgd"),
      "best_vs_best_sgd": min(samples[name]) / best_sgd,
      "expected": expected_ratio(name), "temp_bytes": temps[name],
      "samples_ms": [s * 1e3 for s in samples[name]]} for name in samples}
  n_params = sum(w.size + b.size for w, b in init_mlp(0, sizes))
  header = (f"MLP {'-'.join(map(str, sizes))} ({n_params:,} params), batch "
            f"{args.batch}, SGD + momentum 0.9 as the base, {args.rounds} "
            f"rounds of {n} steps per optimizer, interleaved "
            f"({elapsed:.0f} s).")
  _common.publish(
      stem, {"machine": info, "argv": argv_used, "elapsed_s": elapsed,
             "steps_per_sample": n, "results": rows},
      markdown(rows, info, argv_used, header))


if __name__ == "__main__":
  main()
