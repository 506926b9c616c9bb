"""The Hessian spectrum of SGD's and SAM's minima on digits.

Foret et al. (2021, Section 4.2 and Fig. 3 left of the ICLR version)
report that the minima SAM finds have a smaller Hessian spectrum than SGD's:
for a WideResNet40-10 on CIFAR-10 (no BatchNorm), lambda_max about 24
without SAM and 1.0 with it, lambda_max / lambda_5 up to 11.4 without SAM
and 2.6 with it. Here are the same measurements on a small problem, a few
minutes on a laptop CPU. This script trains the same MLP
(64-128-10, ReLU) on scikit-learn's digits (nothing downloaded) from the same
initial weights with the same minibatch order with

* ``sgd``: SGD with momentum 0.9 (the base optimizer),
* ``sam rho=R``: ``sam_optax.sam`` around it, for a couple of radii,
* with ``--variants``: ``gsam`` (alpha 0.3), ``looksam`` (every_k 5, alpha 0.7)
  and ``friendly_sam`` around it, at rho 0.1,

to convergence (cosine decay of the learning rate to 0), then measures at
each final point, on the full training loss:

* the top 10 Hessian eigenvalues (Lanczos with full reorthogonalisation,
  ``sam_optax.diagnostics.top_hessian_eigenvalues``), hence lambda_max and
  lambda_max / lambda_5, with the Ritz residuals as a convergence check;
* the eigenvalue density (stochastic Lanczos quadrature,
  ``sam_optax.diagnostics.hessian_spectral_density``).

The loss is cross-entropy with label smoothing 0.1: it has a minimum at
finite weights, so every run ends at (about) the same training loss (the
table says how close) and the spectra compare minima, not how far training
went (without smoothing the loss of this separable problem and its Hessian
go to 0).

Run (from the repository root; needs scikit-learn and matplotlib)::

  python benchmarks/hessian_spectrum.py --quick   # ~1 min: 1 seed
  python benchmarks/hessian_spectrum.py           # ~3 min: 3 seeds
  python benchmarks/hessian_spectrum.py --variants  # + the SAM variants
  python benchmarks/hessian_spectrum.py --write   # rewrite benchmarks/results/

Results (``hessian_spectrum.{json,md,png}``) go to
``benchmarks/results/local/`` (ignored by git) unless ``--write`` or
``--out DIR`` is given.
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

SIZES = (64, 128, 10)
BATCH = 32
LR, MOMENTUM = 0.05, 0.9
SMOOTHING = 0.1
METHODS = (("sgd", None), ("sam rho=0.05", 0.05), ("sam rho=0.1", 0.1))
# With --variants, at rho = 0.1 (the settings of docs/variants.md).
VARIANTS = (("gsam", 0.1), ("looksam", 0.1), ("friendly_sam", 0.1))
TOP_K = 10
LANCZOS_ITERS = 60
SLQ_PROBES, SLQ_ITERS = 8, 80


def log(*args):
  print(*args, flush=True)


def loss_fn(params, x, y):
  return _digits.cross_entropy(params, x, y, SMOOTHING)


def make_tx(method, base, rho):
  if method == "sgd":
    return optax.with_extra_args_support(base)
  if method == "gsam":
    return sam_optax.gsam(base, rho=rho, alpha=0.3)
  if method == "looksam":
    return sam_optax.looksam(base, rho=rho, every_k=5, alpha=0.7)
  if method == "friendly_sam":
    return sam_optax.friendly_sam(base, rho=rho)
  return sam_optax.sam(base, rho=rho)


def make_train(method, rho, epochs, x_train, y_train):
  """``train(key) -> params``, jitted: one whole run."""
  n = x_train.shape[0]
  steps = n // BATCH

  def train(key):
    base = optax.sgd(optax.cosine_decay_schedule(LR, epochs * steps),
                     momentum=MOMENTUM)
    tx = make_tx(method, base, rho)
    init_key, data_key = jax.random.split(key)
    params = _digits.init_mlp(init_key, SIZES)
    grad = jax.grad(loss_fn)

    def step(carry, idx):
      params, state = carry
      x, y = x_train[idx], y_train[idx]
      updates, state = tx.update(grad(params, x, y), state, params,
                                 grad_fn=lambda p: grad(p, x, y))
      return (optax.apply_updates(params, updates), state), None

    def epoch(carry, key):
      order = jax.random.permutation(key, n)[:steps * BATCH]
      return jax.lax.scan(step, carry, order.reshape(steps, BATCH))[0], None

    return jax.lax.scan(epoch, (params, tx.init(params)),
                        jax.random.split(data_key, epochs))[0][0]

  return jax.jit(train)


def measure(full_loss, params, seed):
  """Top-k eigenvalues (Lanczos) and the SLQ density of the training loss.

  ``full_loss`` is one function object for all the calls: the eigensolvers
  are compiled once.
  """
  key = jax.random.key(1000 + seed)
  top = diagnostics.top_hessian_eigenvalues(
      full_loss, params, k=TOP_K, num_iters=LANCZOS_ITERS, key=key)
  density = diagnostics.hessian_spectral_density(
      full_loss, params, key=key, num_probes=SLQ_PROBES,
      num_iters=SLQ_ITERS, num_points=1000)
  return top, density, float(full_loss(params))


def mean_std(values):
  return [float(np.mean(values)), float(np.std(values))]


def pm(value, digits=2):
  return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def markdown(config, summary, seconds):
  lines = [
      "# Hessian spectrum of SGD's and SAM's minima (digits MLP)",
      "",
      f"Command: `{config['command']}` ({seconds:.0f} s on "
      f"{config['machine']}); jax {jax.__version__}, optax "
      f"{optax.__version__}.",
      "",
      f"MLP {'-'.join(map(str, SIZES))} ({config['num_params']} params), "
      f"{config['num_train']} training digits, cross-entropy with label "
      f"smoothing {SMOOTHING}, batch {BATCH}, SGD momentum {MOMENTUM}, lr "
      f"{LR} with cosine decay to 0, {config['epochs']} epochs; the same "
      "init and batch order for every method. Spectrum of the full training "
      f"loss at the final weights: top {TOP_K} eigenvalues by Lanczos "
      f"({LANCZOS_ITERS} steps, full reorthogonalisation), density by SLQ "
      f"({SLQ_PROBES} probes x {SLQ_ITERS} steps). Mean ± std over seeds "
      f"{config['seeds']}.",
      "",
      "| method | train loss | test acc (%) | λ_max | λ_5 | λ_max / λ_5 | "
      "Ritz residual, top 5 (recurrence) |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, s in summary.items():
    lines.append(
        f"| {name} | {pm(s['train_loss'], 4)} | "
        f"{pm([100 * v for v in s['test_acc']], 1)} | "
        f"{pm(s['lambda_max'], 3)} | {pm(s['lambda_5'], 3)} | "
        f"{pm(s['ratio'])} | {s['max_residual']:.1e} |")
  sgd = summary["sgd"]
  for name, s in summary.items():
    if name != "sgd":
      top = s["lambda_max"][0] / sgd["lambda_max"][0]
      ratio = s["ratio"][0] / sgd["ratio"][0]
      lines.append(f"\n{name} / sgd: λ_max {top:.2f}x, λ_max/λ_5 "
                   f"{ratio:.2f}x.")
  return "\n".join(lines) + "\n"


def plot(path, spectra):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for name, (top, density) in spectra.items():
    ax1.plot(np.arange(1, TOP_K + 1), top, marker="o", label=name)
    if name in ("sgd", "sam rho=0.1"):  # Two curves stay readable.
      ax2.semilogy(density["grid"], np.maximum(density["density"], 1e-8),
                   label=name)
  ax1.set(xlabel="index i", ylabel="λ_i", yscale="log",
          title=f"top {TOP_K} Hessian eigenvalues (Lanczos), seed 0")
  ax1.legend()
  ax2.set(xlabel="eigenvalue", ylabel="density",
          title="eigenvalue density (SLQ), seed 0", ylim=(1e-5, None))
  ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = _output.make_parser(__doc__, "1 seed, 20 epochs (about 1 min)")
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--variants", action="store_true",
                      help="also GSAM, LookSAM and Friendly-SAM (rho 0.1)")
  args = parser.parse_args()
  seeds = _output.seeds(args)
  epochs = args.epochs or (20 if args.quick else 40)
  splits = _digits.load_splits()
  x_train, y_train = (jnp.asarray(a) for a in splits["train"])
  x_test, y_test = splits["test"]

  def full_loss(p):
    return loss_fn(p, x_train, y_train)

  start = time.perf_counter()
  methods = METHODS + (VARIANTS if args.variants else ())
  rows, spectra = {name: [] for name, _ in methods}, {}
  for name, rho in methods:
    train = make_train(name.split()[0], rho, epochs, x_train, y_train)
    for seed in seeds:
      params = train(jax.random.key(seed))
      top, density, train_loss = measure(full_loss, params, seed)
      eig = np.asarray(top.eigenvalues, np.float64)
      rows[name].append({
          "seed": seed, "train_loss": train_loss,
          "test_acc": float(_digits.accuracy(params, x_test, y_test)),
          "eigenvalues": eig.tolist(),
          "residuals": np.asarray(top.residuals).tolist(),
          "slq_trace_over_n": float(np.mean(np.sum(
              np.asarray(density.weights) * np.asarray(density.nodes), 1)))})
      if seed == seeds[0]:
        spectra[name] = (eig, {k: np.asarray(getattr(density, k)).tolist()
                               for k in ("grid", "density")})
      log(f"  {name:13s} seed {seed}: train loss {train_loss:.4f}, "
          f"λ_max {eig[0]:.3f}, λ_5 {eig[4]:.3f}, ratio "
          f"{eig[0] / eig[4]:.2f} ({time.perf_counter() - start:.0f} s)")
  summary = {}
  for name, rs in rows.items():
    eigs = np.array([r["eigenvalues"] for r in rs])
    summary[name] = {
        "train_loss": mean_std([r["train_loss"] for r in rs]),
        "test_acc": mean_std([r["test_acc"] for r in rs]),
        "lambda_max": mean_std(eigs[:, 0]), "lambda_5": mean_std(eigs[:, 4]),
        "ratio": mean_std(eigs[:, 0] / eigs[:, 4]),
        "max_residual": float(np.max([r["residuals"][:5] for r in rs])),
        "slq_trace_over_n": mean_std([r["slq_trace_over_n"] for r in rs])}
  seconds = time.perf_counter() - start
  config = {"command": "python benchmarks/hessian_spectrum.py " + " ".join(
      sys.argv[1:]), "machine": f"{os.cpu_count()} CPU cores",
            "seeds": seeds, "epochs": epochs,
            "num_train": int(x_train.shape[0]),
            "num_params": int(sum(np.size(x) for x in jax.tree.leaves(
                _digits.init_mlp(jax.random.key(0), SIZES))))}
  out = _output.directory(args)
  with open(os.path.join(out, "hessian_spectrum.json"), "w") as f:
    json.dump({"config": config, "summary": summary, "runs": rows,
               "seconds": seconds}, f, indent=1)
  with open(os.path.join(out, "hessian_spectrum.md"), "w") as f:
    f.write(markdown(config, summary, seconds))
  plot(os.path.join(out, "hessian_spectrum.png"), spectra)
  log(markdown(config, summary, seconds))
  log(f"wrote {out}/hessian_spectrum.{{json,md,png}}")


if __name__ == "__main__":
  main()
