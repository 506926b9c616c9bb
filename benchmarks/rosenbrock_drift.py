"""SAM's offset on optax's Rosenbrock target at a constant radius.

Rosenbrock's minimiser (1, 1) sits in a curved valley whose curvature
across the valley grows with x. At a constant radius SAM does not settle at
(1, 1): it drifts along the valley towards flatter points. This runs SAM
(``tests/contract.py``'s calling convention) over a few of optax's base
optimizers with the contract battery's cosine-decayed step (30 000 steps)
at constant radii, and prints the final clean params' largest distance to
(1, 1) (optax's tolerance there: 3e-2 + 3e-2 * 1 = 0.06).

  nice -n 10 python benchmarks/rosenbrock_drift.py  # -> results/*.md
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sam_optax  # noqa: E402
from tests import contract  # noqa: E402

NUM_STEPS = 30_000
BASES = ("sgd", "sgd_momentum", "adam", "lamb", "lion")
RADII = (0.0, 1e-3, 1e-2, 5e-2)


def final_point(base_name, rho):
  problem = contract.rosenbrock()
  tx = sam_optax.sam(contract.base_optimizer(base_name, NUM_STEPS), rho=rho)

  @jax.jit
  def go():
    def body(i, carry):
      params, state = carry
      updates, state = tx.update(problem.grad(params), state, params,
                                 grad_fn=problem.grad)
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, NUM_STEPS, body,
                             (problem.params, tx.init(problem.params)))[0]

  return go()


def main():
  lines = ["# SAM on Rosenbrock at a constant radius", "",
           "Produced by `benchmarks/rosenbrock_drift.py` (CPU, float32, "
           f"{NUM_STEPS} steps, the battery's cosine-decayed steps): the "
           "final point and its largest distance to (1, 1); optax's "
           "tolerance there is 0.06.", "",
           "| base | " + " | ".join(f"rho {r:g}" for r in RADII) + " |",
           "|---" * (len(RADII) + 1) + "|"]
  for base in BASES:
    cells = []
    for rho in RADII:
      w = final_point(base, rho)
      dist = float(jnp.max(jnp.abs(w - 1.0)))
      cells.append(f"{dist:.3f} ({float(w[0]):.3f}, {float(w[1]):.3f})")
    lines.append(f"| {base} | " + " | ".join(cells) + " |")
    print(lines[-1], flush=True)
  (ROOT / "benchmarks" / "results" / "rosenbrock_drift.md").write_text(
      "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
