"""m-sharpness: does a smaller ascent batch m generalise better?

Foret et al. (2021, Fig. 3) find that SAM generalises better when each
ascent step uses fewer examples (m), and Andriushchenko & Flammarion (2022,
Fig. 6) reproduce it on a sparse regression problem where 1-SAM (one
example per ascent) beats n-SAM (the whole batch) and ERM. Both are run here
with ``sam_optax.sam(base, rho, microbatched=True)``: every batch of B
examples is cut into B / m micro-batches (``sam_optax.split_microbatches``),
their gradients are taken with ``jax.vmap``, each micro-batch ascends along
its own gradient, and the SAM gradients are averaged.

(a) Digits with 40% symmetric label noise. MLP 64-128-10 (ReLU), batch 128,
    SGD momentum 0.9, lr 0.05 with cosine decay, m in {1, 4, 16, 64, 128 (the
    whole batch)}, and ERM (the same SGD without SAM). For every m, rho is
    chosen from a small grid by the mean accuracy on a *noisy* validation
    split (clean labels are not available in practice); the clean test
    accuracy is reported once, at that rho. Also reported: the top Hessian
    eigenvalue of the final training loss (Lanczos,
    ``sam_optax.diagnostics.top_hessian_eigenvalues``) and how many noisy
    training labels were memorised.
(b) Sparse regression with a diagonal linear network: n = 20 examples,
    d = 30 Gaussian features, a 3-sparse ground truth, y = <beta*, x>
    (noiseless), model beta = u*u - v*v with u = v = alpha at init (alpha =
    0.1: an init where GD's implicit bias towards sparse solutions is only
    partial), full-batch GD. 1-SAM, m in {2, 5, 10}, n-SAM (m = 20) and ERM
    over a grid of rho; the test loss is the exact population loss
    ||beta - beta*||^2 (x ~ N(0, I)); rho per m is chosen on a validation
    set of 100 fresh examples. Also reported: lambda_max and the trace of
    the Hessian of the final training loss (full-rank Lanczos: exact).

Seeds change the init, the noise and the batch order (digits) or the data
and the ground truth (regression); tables give mean +- std over seeds.

Run (from the repository root; needs scikit-learn and matplotlib)::

  python benchmarks/m_sharpness.py --quick   # 1-2 min, 1 seed, small grids
  python benchmarks/m_sharpness.py           # 2-4 min on 2 CPU cores
  python benchmarks/m_sharpness.py --write   # rewrite benchmarks/results/

Results (``m_sharpness.{json,md,png}``) go to ``benchmarks/results/local/``
(ignored by git) unless ``--write`` or ``--out DIR`` is given.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _digits  # noqa: E402
import _output  # noqa: E402

import sam_optax  # noqa: E402
from sam_optax import diagnostics  # noqa: E402

# (a) Digits.
SIZES = (64, 128, 10)
BATCH = 128
LR, MOMENTUM = 0.05, 0.9
NOISE = 0.4
DIGITS_M = (1, 4, 16, 64, 128)
DIGITS_RHOS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# (b) Sparse regression.
N, D, R = 20, 30, 3
ALPHA = 0.1
DLN_LR = 0.05
DLN_M = (1, 2, 5, 10, 20)
DLN_RHOS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def log(*args):
  print(*args, flush=True)


def sam_or_erm(base, rho):
  """SAM with micro-batched ascent, or the base optimizer if rho is None."""
  if rho is None:
    return optax.with_extra_args_support(base)
  return sam_optax.sam(base, rho=rho, microbatched=True)


def microbatched_step(tx, loss_fn, params, state, batch, m):
  """One step; the ascent of each micro-batch of m examples is its own."""
  size = jax.tree.leaves(batch)[0].shape[0]
  micro = sam_optax.split_microbatches(batch, size // m)
  grad = jax.grad(loss_fn)
  grads = jax.vmap(grad, in_axes=(None, 0))(params, micro)
  updates, state = tx.update(
      grads, state, params, grad_fn=lambda p: jax.vmap(grad)(p, micro))
  return optax.apply_updates(params, updates), state


def erm_step(tx, loss_fn, params, state, batch):
  updates, state = tx.update(jax.grad(loss_fn)(params, batch), state, params)
  return optax.apply_updates(params, updates), state


# ----------------------------------------------------------------------------
# (a) Digits with label noise.
# ----------------------------------------------------------------------------


def digits_loss(params, batch):
  return _digits.cross_entropy(params, batch["x"], batch["y"])


def make_digits_run(m, epochs, splits):
  """``run(key, y_train, rho) -> metrics``, jitted: one whole training run."""
  x_train = jnp.asarray(splits["train"][0])
  n = x_train.shape[0]
  steps = n // BATCH

  def run(key, y_train, rho):
    base = optax.sgd(optax.cosine_decay_schedule(LR, epochs * steps),
                     momentum=MOMENTUM)
    tx = sam_or_erm(base, None if m is None else rho)
    init_key, data_key = jax.random.split(key)
    params = _digits.init_mlp(init_key, SIZES)

    def step(carry, idx):
      params, state = carry
      batch = {"x": x_train[idx], "y": y_train[idx]}
      if m is None:
        return erm_step(tx, digits_loss, params, state, batch), None
      return microbatched_step(tx, digits_loss, params, state, batch, m), None

    def epoch(carry, key):
      order = jax.random.permutation(key, n)[:steps * BATCH]
      return jax.lax.scan(step, carry, order.reshape(steps, BATCH))[0], None

    params, _ = jax.lax.scan(epoch, (params, tx.init(params)),
                             jax.random.split(data_key, epochs))[0]
    train = {"x": x_train, "y": y_train}
    spectrum = diagnostics.top_hessian_eigenvalues(
        lambda p: digits_loss(p, train), params, k=1, num_iters=20,
        key=jax.random.key(0))
    return params, {"lambda_max": spectrum.eigenvalues[0],
                    "train_loss": digits_loss(params, train),
                    "train_acc_noisy": _digits.accuracy(params, x_train,
                                                        y_train)}

  return jax.jit(run)


def run_digits(seeds, rhos, epochs):
  splits = _digits.load_splits()
  (_, y_train), (x_val, y_val) = splits["train"], splits["val"]
  x_test, y_test = splits["test"]
  results = {}
  for m in (None,) + DIGITS_M:
    name = "erm" if m is None else f"m={m}"
    run = make_digits_run(m, epochs, splits)
    start = time.perf_counter()
    rows = []
    for rho in ([None] if m is None else rhos):
      for seed in seeds:
        y_noisy = _digits.noisy_labels(y_train, NOISE, seed)
        y_val_noisy = _digits.noisy_labels(y_val, NOISE, seed + 500)
        params, metrics = run(jax.random.key(seed), jnp.asarray(y_noisy),
                              jnp.float32(rho or 0.0))
        rows.append({
            "rho": rho, "seed": seed,
            "val_acc_noisy": float(_digits.accuracy(params, x_val,
                                                    y_val_noisy)),
            "test_acc": float(_digits.accuracy(params, x_test, y_test)),
            **{k: float(v) for k, v in metrics.items()}})
    results[name] = select_by_validation(rows, "val_acc_noisy", max)
    best = results[name]
    log(f"  digits {name:6s} rho {best['rho']}: test "
        f"{100 * best['test_acc'][0]:.1f} +- {100 * best['test_acc'][1]:.1f}"
        f" ({len(rows)} runs, {time.perf_counter() - start:.0f} s)")
  return results


# ----------------------------------------------------------------------------
# (b) Sparse regression, diagonal linear network.
# ----------------------------------------------------------------------------


def dln_beta(params):
  return params["u"] ** 2 - params["v"] ** 2


def dln_loss(params, batch):
  return jnp.mean((batch["x"] @ dln_beta(params) - batch["y"]) ** 2)


def dln_problem(seed):
  rng = np.random.default_rng(seed)
  beta = np.zeros(D, np.float32)
  support = rng.choice(D, R, replace=False)
  beta[support] = rng.choice([-1.0, 1.0], R)
  x = rng.normal(size=(N + 100, D)).astype(np.float32)
  y = x @ beta
  return beta, {"x": x[:N], "y": y[:N]}, {"x": x[N:], "y": y[N:]}


def make_dln_run(m, steps):
  def run(beta_star, train, val, rho):
    tx = sam_or_erm(optax.sgd(DLN_LR), None if m is None else rho)
    params = {"u": jnp.full(D, ALPHA), "v": jnp.full(D, ALPHA)}

    def step(carry, _):
      params, state = carry
      if m is None:
        return erm_step(tx, dln_loss, params, state, train), None
      return microbatched_step(tx, dln_loss, params, state, train, m), None

    params, _ = jax.lax.scan(step, (params, tx.init(params)), None,
                             length=steps)[0]
    beta = dln_beta(params)
    # Full-rank Lanczos (2d parameters): all the eigenvalues, so the trace.
    spectrum = diagnostics.top_hessian_eigenvalues(
        lambda p: dln_loss(p, train), params, k=2 * D, num_iters=2 * D,
        key=jax.random.key(0))
    return {"lambda_max": spectrum.eigenvalues[0],
            "trace": jnp.sum(spectrum.eigenvalues),
            "test_loss": jnp.sum((beta - beta_star) ** 2),
            "val_loss": dln_loss(params, val),
            "train_loss": dln_loss(params, train),
            "l1_norm": jnp.sum(jnp.abs(beta))}

  return jax.jit(run)


def run_dln(seeds, rhos, steps):
  problems = [dln_problem(seed) for seed in seeds]
  results, curves = {}, {}
  for m in (None,) + DLN_M:
    name = "erm" if m is None else ("n-SAM" if m == N else f"{m}-SAM")
    run = make_dln_run(m, steps)
    rows = []
    for rho in ([None] if m is None else rhos):
      for seed, (beta, train, val) in zip(seeds, problems):
        out = run(beta, train, val, jnp.float32(rho or 0.0))
        rows.append({"rho": rho, "seed": seed,
                     **{k: float(v) for k, v in out.items()}})
    curves[name] = {
        str(rho): mean_std([r["test_loss"] for r in rows if r["rho"] == rho])
        for rho in {r["rho"] for r in rows}}
    results[name] = select_by_validation(rows, "val_loss", min)
    best = results[name]
    log(f"  regression {name:6s} rho {best['rho']}: test loss "
        f"{best['test_loss'][0]:.4f} +- {best['test_loss'][1]:.4f}")
  return results, curves


# ----------------------------------------------------------------------------
# Selection and report.
# ----------------------------------------------------------------------------


def mean_std(values):
  return [float(np.mean(values)), float(np.std(values))]


def select_by_validation(rows, key, better):
  """The rho whose mean ``key`` over seeds is best; mean +- std of all."""
  by_rho = {}
  for row in rows:
    by_rho.setdefault(row["rho"], []).append(row)
  rho = better(by_rho, key=lambda r: np.mean([x[key] for x in by_rho[r]]))
  chosen = by_rho[rho]
  metrics = [k for k in chosen[0] if k not in ("rho", "seed")]
  return {"rho": rho, **{k: mean_std([r[k] for r in chosen])
                         for k in metrics},
          f"{key}_by_rho": {str(r): mean_std([x[key] for x in by_rho[r]])
                           for r in by_rho}}


def pm(value, scale=1.0, digits=1):
  return f"{scale * value[0]:.{digits}f} ± {scale * value[1]:.{digits}f}"


def markdown(config, digits, dln, dln_curves, seconds):
  lines = [
      "# m-sharpness: accuracy and sharpness against the ascent batch m",
      "",
      f"Command: `{config['command']}` ({seconds:.0f} s on "
      f"{config['machine']}); jax {jax.__version__}, optax "
      f"{optax.__version__}. Seeds {config['seeds']}: mean ± std.",
      "",
      f"## (a) Digits, {int(100 * NOISE)}% symmetric label noise",
      "",
      f"MLP {'-'.join(map(str, SIZES))}, batch {BATCH}, SGD momentum "
      f"{MOMENTUM}, lr {LR} cosine, {config['epochs']} epochs. rho per m "
      f"chosen from {config['digits_rhos']} by noisy-validation accuracy; "
      "test labels clean. λ_max: top Hessian eigenvalue of the final "
      "(noisy) training loss.",
      "",
      "| m | rho | test acc (%) | noisy val acc (%) | noisy train labels "
      "fitted (%) | train loss | λ_max |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, r in digits.items():
    lines.append(
        f"| {name} | {r['rho'] if r['rho'] is not None else '-'} | "
        f"{pm(r['test_acc'], 100)} | {pm(r['val_acc_noisy'], 100)} | "
        f"{pm(r['train_acc_noisy'], 100)} | {pm(r['train_loss'], 1, 3)} | "
        f"{pm(r['lambda_max'], 1, 2)} |")
  rhos = config["digits_rhos"]
  lines += ["", "Noisy-validation accuracy (%) at every rho (the choice "
            "above; the test set is not looked at):", "",
            "| m | " + " | ".join(f"rho={r}" for r in rhos) + " |",
            "|---|" + "---|" * len(rhos)]
  for name, r in digits.items():
    if name != "erm":
      lines.append(f"| {name} | " + " | ".join(
          pm(r["val_acc_noisy_by_rho"][str(x)], 100) for x in rhos) + " |")
  lines += [
      "",
      "## (b) Sparse regression, diagonal linear network",
      "",
      f"n = {N}, d = {D}, {R}-sparse ±1 ground truth, beta = u² − v², "
      f"u = v = {ALPHA} at init, full-batch GD lr {DLN_LR}, "
      f"{config['steps']} steps. Test loss = ‖beta − beta*‖² (the "
      "population loss); rho per m chosen by the loss on 100 fresh "
      "validation examples.",
      "",
      "| method | rho | test loss | train loss | ‖beta‖₁ (‖beta*‖₁ = 3) "
      "| λ_max | trace(H) |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, r in dln.items():
    lines.append(
        f"| {name} | {r['rho'] if r['rho'] is not None else '-'} | "
        f"{pm(r['test_loss'], 1, 4)} | {pm(r['train_loss'], 1, 5)} | "
        f"{pm(r['l1_norm'], 1, 3)} | {pm(r['lambda_max'], 1, 2)} | "
        f"{pm(r['trace'], 1, 2)} |")
  rhos = config["dln_rhos"]
  lines += ["", "Test loss at every rho:", "",
            "| method | " + " | ".join(f"rho={r}" for r in rhos) + " |",
            "|---|" + "---|" * len(rhos)]
  for name, curve in dln_curves.items():
    if name == "erm":
      continue
    lines.append(f"| {name} | " + " | ".join(
        pm(curve[str(r)], 1, 4) for r in rhos) + " |")
  lines.append(f"\nERM: {pm(dln_curves['erm']['None'], 1, 4)}.")
  return "\n".join(lines) + "\n"


def plot(path, digits, dln_curves, rhos):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  names = [k for k in digits if k != "erm"]
  ms = [int(k.split("=")[1]) for k in names]
  acc = np.array([digits[k]["test_acc"] for k in names]) * 100
  ax1.errorbar(ms, acc[:, 0], acc[:, 1], marker="o", capsize=3, label="SAM")
  erm = np.array(digits["erm"]["test_acc"]) * 100
  ax1.axhline(erm[0], color="k", ls="--", label="ERM (SGD)")
  ax1.set(xscale="log", xlabel="m (examples per ascent; 128 = whole batch)",
          ylabel="clean test accuracy (%)",
          title=f"digits, {int(100 * NOISE)}% label noise")
  ax1.legend()
  for name, curve in dln_curves.items():
    if name == "erm":
      ax2.axhline(curve["None"][0], color="k", ls="--", label="ERM (GD)")
      continue
    values = np.array([curve[str(r)] for r in rhos])
    ax2.errorbar(rhos, values[:, 0], values[:, 1], marker="o", capsize=3,
                 label=name)
  ax2.set(xscale="log", yscale="log", xlabel="rho",
          ylabel="test loss ‖β − β*‖²",
          title="sparse regression, diagonal linear net")
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  args = _output.make_parser(
      __doc__, "1 seed, fewer epochs and rhos (about 1 min)").parse_args()
  seeds = _output.seeds(args)
  epochs = 30 if args.quick else 60
  steps = 4000 if args.quick else 20000
  digits_rhos = (0.1, 0.5) if args.quick else DIGITS_RHOS
  dln_rhos = (0.02, 0.1) if args.quick else DLN_RHOS
  start = time.perf_counter()
  log(f"(a) digits, {int(100 * NOISE)}% label noise, seeds {seeds}, "
      f"{epochs} epochs, rho grid {digits_rhos}")
  digits = run_digits(seeds, digits_rhos, epochs)
  log(f"(b) sparse regression, seeds {seeds}, {steps} steps, "
      f"rho grid {dln_rhos}")
  dln, dln_curves = run_dln(seeds, dln_rhos, steps)
  seconds = time.perf_counter() - start
  config = {"command": "python benchmarks/m_sharpness.py " + " ".join(
      sys.argv[1:]), "machine": f"{os.cpu_count()} CPU cores",
            "seeds": seeds, "epochs": epochs, "steps": steps,
            "digits_rhos": list(digits_rhos), "dln_rhos": list(dln_rhos)}
  out = _output.directory(args)
  with open(os.path.join(out, "m_sharpness.json"), "w") as f:
    json.dump({"config": config, "digits": digits, "regression": dln,
               "regression_curves": dln_curves, "seconds": seconds}, f,
              indent=1)
  with open(os.path.join(out, "m_sharpness.md"), "w") as f:
    f.write(markdown(config, digits, dln, dln_curves, seconds))
  plot(os.path.join(out, "m_sharpness.png"), digits, dln_curves, dln_rhos)
  log(f"wrote {out}/m_sharpness.{{json,md,png}} ({seconds:.0f} s)")


if __name__ == "__main__":
  main()
