"""Why LAMB misses optax's matrix target under a constant learning rate.

LAMB's step on a leaf is ``lr * ||w|| * r / ||r||`` (the trust ratio
``||w|| / ||r||`` times the Adam direction ``r``): its length is
``lr * ||w||`` whatever the gradient, so near the minimiser of the 2x2 matrix
target (``||w*|| = sqrt(30) = 5.48``) the iterate keeps moving by
``lr * 5.48`` per step and ends wherever the last steps leave it. This
script runs optax's matrix target (30 000 steps, as optax's battery) with a
bare ``optax.lamb`` at constant learning rates and with the contract
battery's cosine decay, for the base alone (rho = 0) and each method, and
reports the largest error over the tolerance ``3e-2 + 3e-2 |w*|`` (pass
<= 1) and the last step's length over ``lr * ||w||``.

  python benchmarks/lamb_trust_ratio.py  # writes results/lamb_trust_ratio.md
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import contract  # noqa: E402

NUM_STEPS = 30_000
METHODS = ("sam", "gsam", "looksam", "friendly_sam", "rst", "ae_sam",
           "msam")


def run(method_name, learning_rate, rho):
  problem = contract.matrix_parabola()
  method = contract.METHODS[method_name]
  tx = method.build(optax.lamb(learning_rate), radius=rho)

  @jax.jit
  def go():
    def body(i, carry):
      params, state, _ = carry
      updates, state = method.step(tx, problem, params, state)
      return optax.apply_updates(params, updates), state, updates

    params = problem.params
    params, state, last = jax.lax.fori_loop(
        0, NUM_STEPS, body,
        (params, tx.init(params), jnp.zeros_like(params)))
    return sam_eval(state, params), last, params

  clean, last, held = go()
  target = np.asarray(problem.target)
  err = np.max(np.abs(np.asarray(clean) - target)
               / (3e-2 + 3e-2 * np.abs(target)))
  if callable(learning_rate):  # The last step's learning rate is ~0.
    return err, None
  ratio = float(jnp.linalg.norm(last)
                / (learning_rate * jnp.linalg.norm(held)))
  return err, ratio


def sam_eval(state, params):
  import sam_optax
  return sam_optax.eval_params(state, params)


def main():
  rates = {"1.0": 1.0, "0.1": 0.1, "0.01": 0.01, "0.001": 1e-3,
           "cosine 0.01 -> 0": optax.cosine_decay_schedule(1e-2, NUM_STEPS)}
  lines = ["# LAMB on optax's 2x2 matrix target",
           "",
           "Produced by `python benchmarks/lamb_trust_ratio.py` (CPU, "
           f"float32, {NUM_STEPS} steps, rho = {contract.RHO}; msam with "
           "lamb's `mu`). Each cell: largest error over optax's tolerance "
           "3e-2 + 3e-2 |w*| (pass <= 1) / the last step's length over "
           "lr ||w|| (LAMB's trust ratio makes it 1 whatever the gradient).",
           "",
           "| method | " + " | ".join(f"lr {k}" for k in rates) + " |",
           "|---" * (len(rates) + 1) + "|"]
  rows = [("lamb alone", "sam", 0.0)] + [(m, m, contract.RHO)
                                          for m in METHODS]
  for label, name, rho in rows:
    cells = []
    for lr in rates.values():
      err, ratio = run(name, lr, rho)
      cells.append(f"{err:.2f}" if ratio is None
                   else f"{err:.2f} / {ratio:.2f}")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print(lines[-1], flush=True)
  out = ROOT / "benchmarks" / "results" / "lamb_trust_ratio.md"
  out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
