"""Label-noise robustness: SGD vs SAM vs ASAM on noisy handwritten digits.

The ``digits-mlp`` problem of the registry (``benchmarks/problems/``: an MLP
64-128-128-10 on scikit-learn's digits, shipped with scikit-learn, its fixed
train / validation / test splits, batch 32, SGD with momentum and a cosine
learning rate, and the one training loop) with

* ``sgd``:    the base optimizer, E epochs;
* ``sgd_2x``: the same for 2E epochs, a compute-matched baseline (a SAM step
  costs two gradients);
* ``sam``:    ``sam_optax.sam`` around that SGD, E epochs, at the library's
  default radius (rho 0.05) and at a large one (rho 0.5);
* ``asam``:   ``sam_optax.sam(..., adaptive=True)``, E epochs, rho 0.5 (the
  usual ASAM default) and 3.0;

under symmetric label noise: a fraction p in {0, 0.2, 0.4, 0.6} of the
*training* labels is replaced by a different class drawn uniformly at random
(the validation and test labels stay clean). Every (noise level, seed) pair
is one run, one jitted program compiled once per optimizer. Reported: the
final test accuracy, mean ± std over seeds, the fit of the noisy training
labels, the best test accuracy over the epochs, as a Markdown table and a
PNG plot of accuracy against noise
(``benchmarks/results/label_noise.{md,json,png}``).

The large radii (SAM 0.5, ASAM 3.0) were chosen after a preliminary sweep at
20-60% noise measured on the *test* set: treat their rows as an upper bound
of what tuning buys, not as a clean protocol (``benchmarks/frontier.py``
chooses on validation). ``--sweep`` reruns the sweep at 40% noise.

Run (from the repository root; needs scikit-learn and matplotlib)::

  python benchmarks/label_noise.py            # ~3-5 min on 2 CPU cores
  python benchmarks/label_noise.py --quick    # < 1 min: 20 epochs, 1 seed
  python benchmarks/label_noise.py --sweep    # + the radius sweep at 40%

Reports go to the git-ignored ``benchmarks/results/local/label_noise
[_quick].{md,json,png}``; ``--write`` writes the tracked
``benchmarks/results/`` instead, ``--out STEM`` any path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _common  # noqa: E402

import sam_optax  # noqa: E402
from benchmarks import problems  # noqa: E402
from benchmarks.problems import train as T  # noqa: E402

PROBLEM = problems.get("digits-mlp")
ETA = 0.01
# (label, method, rho, epoch multiplier)
PLAN = (("sgd", "sgd", None, 1), ("sgd_2x", "sgd", None, 2),
        ("sam rho=0.05", "sam", 0.05, 1), ("sam rho=0.5", "sam", 0.5, 1),
        ("asam rho=0.5", "asam", 0.5, 1), ("asam rho=3", "asam", 3.0, 1))
SWEEP = (("sam", (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)),
         ("asam", (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)))
NOISE_LEVELS = (0.0, 0.2, 0.4, 0.6)


def make_tx(method, rho):
  """``make(base, h, total_steps)`` for the training loop."""
  if method.startswith("sgd"):
    return lambda base, h, n: optax.with_extra_args_support(base)
  return lambda base, h, n: sam_optax.sam(
      base, rho=rho, adaptive=(method == "asam"), eta=ETA)


def run_method(method, rho, epochs, data, noise_levels, seeds, log):
  """Trains every (noise, seed) run of one optimizer; returns metrics."""
  runs = [(p, s) for p in noise_levels for s in seeds]
  train = T.make_train(PROBLEM, make_tx(method, rho), epochs=epochs,
                       curves=True, train_fit=True)
  arrays = T.device_arrays(data)
  arrays["y_train_clean"] = arrays["y_train"]
  label = f"{method} rho {rho if rho is not None else '-'}"
  log(f"  {label}: compiling and training {len(runs)} runs of {epochs} "
      "epochs")
  start = time.perf_counter()
  results = {}
  for i, (p, s) in enumerate(runs):  # One compiled program, once per run.
    out = T.run_seed(train, PROBLEM, data, f"noise={p}", s, {},
                     arrays=arrays)
    results.setdefault(p, []).append({
        "seed": s, "test_acc": out["test"],
        "train_acc_noisy": out["train_fit"],
        "train_acc_clean": out["train_clean"],
        "test_curve": out["test_curve"], "final_loss": out["final_loss"]})
    log(f"    run {i + 1}/{len(runs)} (noise {p}, seed {s}): test acc "
        f"{out['test']:.3f}, {time.perf_counter() - start:5.1f} s")
  seconds = time.perf_counter() - start
  log(f"  {method:6s} rho {rho if rho is not None else '-':>5} "
      f"{epochs:4d} epochs, {len(runs)} runs: {seconds:5.1f} s")
  return results, seconds


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------


def summary(per_noise, key="test_acc"):
  return {p: (float(np.mean([r[key] for r in rs])),
              float(np.std([r[key] for r in rs])))
          for p, rs in per_noise.items()}


def markdown(main, sweep, args, settings, elapsed):
  noise = settings["noise_levels"]
  out = ["# Label noise: SGD vs SAM vs ASAM (digits MLP)", ""]
  out.append(
      f"Machine: {settings['machine']}; jax {jax.__version__}, optax "
      f"{optax.__version__}. Command: `python benchmarks/label_noise.py"
      f"{' ' + ' '.join(args) if args else ''}` ({elapsed:.0f} s).")
  out.append("")
  out.append(
      f"Problem `digits-mlp` ({PROBLEM.description}), "
      f"{settings['epochs']} epochs ({2 * settings['epochs']} for sgd_2x); "
      f"ASAM eta {ETA}. The "
      "large radii (SAM 0.5, ASAM 3) were picked from a sweep at 20-60% "
      "noise on the test set: an optimistic upper bound. Symmetric noise: "
      f"that fraction of the {settings['n_train']} training labels replaced "
      "by a different random class; "
      f"{settings['n_test']} clean test images. Final test accuracy (%), mean "
      f"± std over {len(settings['seeds'])} seeds (init, minibatch order and "
      "noise all change with the seed).")
  out += ["", "| optimizer | " + " | ".join(f"{int(p * 100)}% noise"
                                            for p in noise) + " |",
          "|---|" + "---|" * len(noise)]
  for name, per_noise in main.items():
    s = summary(per_noise)
    out.append(f"| {name} | " + " | ".join(
        f"{100 * s[p][0]:.1f} ± {100 * s[p][1]:.1f}" for p in noise) + " |")
  out += ["", "Fit of the noisy training labels (train accuracy on the "
          "labels trained on, %, mean over seeds): how much noise was "
          "memorised.", "",
          "| optimizer | " + " | ".join(f"{int(p * 100)}%" for p in noise)
          + " |", "|---|" + "---|" * len(noise)]
  for name, per_noise in main.items():
    s = summary(per_noise, "train_acc_noisy")
    out.append(f"| {name} | " + " | ".join(
        f"{100 * s[p][0]:.1f}" for p in noise) + " |")
  out += ["", "Best test accuracy over the epochs (%, mean over seeds): what "
          "early stopping on clean validation data could reach; the gap to "
          "the final accuracy is the damage done by memorising the noise.",
          "", "| optimizer | " + " | ".join(f"{int(p * 100)}%" for p in noise)
          + " |", "|---|" + "---|" * len(noise)]
  for name, per_noise in main.items():
    peak = {p: float(np.mean([max(r["test_curve"]) for r in rs]))
            for p, rs in per_noise.items()}
    out.append(f"| {name} | " + " | ".join(
        f"{100 * peak[p]:.1f}" for p in noise) + " |")
  if sweep:
    out += ["", "Radius sweep at 40% noise (test accuracy %, mean ± std; "
            "measured on the test set, so a sensitivity check, not a tuning "
            "protocol):", "", "| optimizer | rho | test acc |", "|---|---|---|"]
    for (name, rho), per_noise in sweep.items():
      m, sd = summary(per_noise)[0.4]
      out.append(f"| {name} | {rho} | {100 * m:.1f} ± {100 * sd:.1f} |")
  out.append("")
  return "\n".join(out)


def plot(main, noise, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, per_noise in main.items():
    s = summary(per_noise)
    mean = np.array([100 * s[p][0] for p in noise])
    std = np.array([100 * s[p][1] for p in noise])
    xs = 100 * np.array(noise)
    ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=name)
  ax.set_xlabel("symmetric label noise (% of training labels)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Digits MLP: final test accuracy vs label noise")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="20 epochs, 1 seed (< 1 min)")
  parser.add_argument("--epochs", type=int,
                      help="epochs for sgd, sam, asam (default 60; quick 20)")
  parser.add_argument("--seeds", type=int,
                      help="seeds per noise level (default 3; quick 1)")
  parser.add_argument("--sweep", action="store_true",
                      help="also SAM/ASAM at several radii, 40%% noise")
  _common.add_output_args(parser, "label_noise[_quick]")
  args = parser.parse_args(argv)
  argv_used = list(sys.argv[1:] if argv is None else argv)
  epochs = args.epochs or (20 if args.quick else 60)
  seeds = list(range(args.seeds or (1 if args.quick else 3)))
  stem = _common.output_stem(
      args, "label_noise" + ("_quick" if args.quick else ""))
  log = _common.log

  data = PROBLEM.load()
  machine = (f"{_common.cpu_model()} ({os.cpu_count()} cores), "
             f"{jax.devices()[0].platform}")
  log(f"digits: {data.sizes()}; noise "
      f"{NOISE_LEVELS}, seeds {seeds}, {epochs} epochs; {machine}")
  start = time.perf_counter()
  main_runs, timings = {}, {}
  for label, method, rho, mult in PLAN:
    main_runs[label], timings[label] = run_method(
        method, rho, mult * epochs, data, NOISE_LEVELS, seeds, log)
  sweep = {}
  if args.sweep:
    done = {(m, r): label for label, m, r, mult in PLAN if mult == 1}
    for method, rhos in SWEEP:
      for rho in rhos:
        if (method, rho) in done:
          sweep[(method, rho)] = {0.4: main_runs[done[(method, rho)]][0.4]}
        else:
          sweep[(method, rho)], _ = run_method(method, rho, epochs, data,
                                               (0.4,), seeds, log)
  elapsed = time.perf_counter() - start

  settings = {"epochs": epochs, "seeds": seeds,
              "noise_levels": list(NOISE_LEVELS), "machine": machine,
              "problem": PROBLEM.name, "n_train": len(data.x_train),
              "n_test": len(data.x_test), "eta": ETA,
              "plan": [list(p) for p in PLAN]}
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  plot(main_runs, list(NOISE_LEVELS), stem + ".png")
  _common.publish(
      stem, {"settings": settings, "argv": argv_used, "elapsed_s": elapsed,
             "seconds_per_method": timings,
             "results": {k: {str(p): v for p, v in r.items()}
                         for k, r in main_runs.items()},
             "sweep": [{"method": k[0], "rho": k[1], "runs": v[0.4]}
                       for k, v in sweep.items()]},
      markdown(main_runs, sweep, argv_used, settings, elapsed),
      also=[stem + ".png"])


if __name__ == "__main__":
  main()
