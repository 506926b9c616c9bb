"""Quality vs cost: every method of sam_optax on noisy digits, one frontier.

A user with a fixed compute budget picks, from one table and one plot, the
method that keeps the most of SAM's label-noise gain for that budget.

Task: scikit-learn's digits (8x8 images, 10 classes, shipped with
scikit-learn: nothing is downloaded), an MLP 64-128-128-10 (ReLU), batch 32,
SGD with momentum 0.9 and lr 0.05 with cosine decay to 0 as the base
optimizer of every method. Splits (fixed, stratified): 30% test (clean), 250
images of validation (clean), the rest train. Symmetric label noise replaces
a fraction (20%, 40%, 60%; quick: 40% only) of the *training* labels by a
different random class.

Validation: **clean**, small (250 images). This is the usual protocol of
label-noise papers (a small trusted set; e.g. Foret et al. tune on clean
held-out data). It makes the selection optimistic compared with a noisy
validation split; every method gets the same treatment, and the test set is
never used to choose anything.

For every method, at every noise level, each value of its small grid (radius
ρ, and p for RST) is trained with every seed; the value with the best mean
validation accuracy is kept and its test accuracy (mean ± std over seeds) is
reported. "Gain kept" is (acc - acc_sgd) / (acc_sam - acc_sgd) at each noise
level. Held-param methods (MSAM, RWP) are evaluated at
``sam_optax.eval_params(state, params)``.

Cost: the step time of each method (at its chosen hyperparameters at the
first noise level) divided by SGD's, measured in this process on the same
model: every timed call is a jitted ``lax.scan`` of 50 training steps (the
state carried across calls, so RST's coins and AE-SAM's choices follow a
real trajectory), warmed up, ``block_until_ready`` inside the timed region,
the methods' order rotated every round, each method's time in a round the
fastest of 3 calls (the CPU is shared: this filters contention spikes), and
the median over rounds of the per-round ratio to SGD, with its IQR.
The timing is repeated at batch 512 (same model), where the
forward/backward dominates and the per-parameter extras weigh less.
Gradient evaluations per step are counted during training (the steps whose
SAMState radius is non-zero computed a second gradient). ``sgd_2x`` is
SGD for twice the epochs (a SAM-matched budget): step ratio 1, cost 2.

Run from the repository root (needs scikit-learn and matplotlib)::

  python benchmarks/frontier.py --quick   # a few minutes on 2 cores
  python benchmarks/frontier.py           # 3 noise levels, 3 seeds
  python benchmarks/frontier.py --write   # to benchmarks/results/frontier.*

Without ``--write`` results go to ``benchmarks/results/local/`` (ignored by
git). Add a method with one line in ``METHODS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import sam_optax

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = (64, 128, 128, 10)
BATCH_SIZE, LR, MOMENTUM, NUM_CLASSES = 32, 0.05, 0.9, 10
VAL_SIZE = 250
BIG_BATCH = 512  # A second timing, closer to a compute-bound step.


class Method(NamedTuple):
  """``make(base, h, total_steps)`` builds the transformation from the
  hyperparameters ``h`` (a dict of traced scalars: one compilation per
  method); ``grid`` lists the ``h`` tried; ``one_gradient`` methods never
  call ``grad_fn``; ``epochs`` multiplies the epoch budget."""

  make: Any
  grid: tuple = ({},)
  one_gradient: bool = False
  epochs: int = 1
  # How the train step calls the method: "grad_fn" (sam's convention),
  # "esam" (per-example losses and the batch), "mesa"/"saf" (a trajectory
  # loss against the EMA teacher / the stored outputs).
  step_kind: str = "grad_fn"
  # Gradient evaluations per step when not counted from the SAM steps (ESAM:
  # the perturbed gradient on γB of the B examples).
  grads: float | None = None


def _rhos(*values):
  return tuple({"rho": v} for v in values)


SAM_RHOS = _rhos(0.1, 0.3, 0.5, 0.8)
METHODS = {
    "sgd": Method(lambda b, h, n: optax.with_extra_args_support(b),
                  one_gradient=True),
    "sgd_2x": Method(lambda b, h, n: optax.with_extra_args_support(b),
                     one_gradient=True, epochs=2),
    "sam": Method(lambda b, h, n: sam_optax.sam(b, rho=h["rho"]), SAM_RHOS),
    "asam": Method(lambda b, h, n: sam_optax.sam(
        b, rho=h["rho"], adaptive=True, eta=0.01), _rhos(1.0, 3.0, 6.0)),
    "gsam": Method(lambda b, h, n: sam_optax.gsam(b, rho=h["rho"]),
                   SAM_RHOS),
    "looksam": Method(lambda b, h, n: sam_optax.looksam(
        b, rho=h["rho"], every_k=5, alpha=0.7), SAM_RHOS),
    "friendly_sam": Method(
        lambda b, h, n: sam_optax.friendly_sam(b, rho=h["rho"]), SAM_RHOS),
    "msam": Method(lambda b, h, n: sam_optax.msam(b, rho=h["rho"]),
                   _rhos(1.0, 3.0, 6.0, 10.0), one_gradient=True),
    "rwp": Method(lambda b, h, n: sam_optax.rwp(b, std=h["rho"]),
                  _rhos(0.02, 0.05, 0.1, 0.2), one_gradient=True),
    "rst": Method(lambda b, h, n: sam_optax.rst(
        b, rho=h["rho"], probability=h["p"]),
        tuple({"rho": r, "p": p} for r in (0.3, 0.5, 0.8)
              for p in (0.25, 0.5))),
    "ae_sam": Method(lambda b, h, n: sam_optax.ae_sam(
        b, rho=h["rho"], threshold=optax.linear_schedule(1.0, -1.0, n)),
        _rhos(0.3, 0.5, 0.8)),
    # ESAM with both parts (SWP β = 0.5, SDS γ = 0.5; γ must be static).
    "esam": Method(lambda b, h, n: sam_optax.esam(
        b, rho=h["rho"], beta=0.5, gamma=0.5), SAM_RHOS, step_kind="esam",
        grads=1.5),
    # MESA/SAF: λ and τ chosen on validation (τ = 1: at the paper's τ = 5
    # large λ diverges here, see docs/esam_saf.md); start after 1/8 of the run.
    "mesa": Method(lambda b, h, n: sam_optax.mesa(
        b, decay=0.99, lam=h["lam"], start_step=n // 8),
        tuple({"lam": v} for v in (0.3, 1.0, 3.0)), one_gradient=True,
        step_kind="mesa"),
    "saf": Method(lambda b, h, n: sam_optax.saf(
        b, num_examples=n_train_examples(), num_outputs=NUM_CLASSES,
        steps_per_epoch=n_train_examples() // BATCH_SIZE, lam=h["lam"],
        start_epoch=5, minus_epoch=3),
        tuple({"lam": v} for v in (0.3, 1.0, 3.0)), one_gradient=True,
        step_kind="saf"),
}
TAU = 1.0  # MESA/SAF temperature.


def n_train_examples():
  """The size of the training split (SAF's store has one row per example)."""
  return len(load_data()[0])


# ----------------------------------------------------------------------------
# Data and model.
# ----------------------------------------------------------------------------


def load_data():
  """(x_train, y_train, x_val, y_val, x_test, y_test), standardised."""
  x, y = load_digits(return_X_y=True)
  x_rest, x_test, y_rest, y_test = train_test_split(
      x, y, test_size=0.3, random_state=0, stratify=y)
  x_train, x_val, y_train, y_val = train_test_split(
      x_rest, y_rest, test_size=VAL_SIZE, random_state=1, stratify=y_rest)
  scaler = StandardScaler().fit(x_train)
  f = lambda a: scaler.transform(a).astype(np.float32)  # noqa: E731
  i = lambda a: a.astype(np.int32)  # noqa: E731
  return (f(x_train), i(y_train), f(x_val), i(y_val), f(x_test), i(y_test))


def noisy_labels(y, noise, seed):
  """Replaces a fraction ``noise`` of ``y`` by a different, random class."""
  rng = np.random.default_rng(10_000 + seed)
  y = y.copy()
  flip = rng.permutation(len(y))[:int(round(noise * len(y)))]
  y[flip] = (y[flip] + rng.integers(1, NUM_CLASSES, len(flip))) % NUM_CLASSES
  return y


def init_mlp(key):
  params = []
  for n_in, n_out in zip(SIZES[:-1], SIZES[1:]):
    key, sub = jax.random.split(key)
    w = jax.random.normal(sub, (n_in, n_out)) * jnp.sqrt(2.0 / n_in)
    params.append((w, jnp.zeros(n_out)))
  return params


def predict(params, x):
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def loss_fn(params, x, y):
  logits = predict(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(predict(params, x), -1) == y)


def radius_of(opt_state):
  """The SAMState's radius (0 for plain optimizers)."""
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, sam_optax.SAMState))
           if isinstance(s, sam_optax.SAMState)]
  return found[0].radius if found else jnp.zeros([])


def example_losses(params, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(predict(params, x), y)


def _trajectory_update(kind, tx, params, opt_state, x, y, idx):
  """MESA/SAF: one gradient of CE + λ·trajectory loss, then the update."""
  lam = sam_optax.trajectory_weight(opt_state)
  if kind == "mesa":
    targets = predict(sam_optax.teacher_params(opt_state), x)
  else:
    targets = sam_optax.saf_targets(opt_state, idx)

  def loss(p):
    logits = predict(p, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + lam * sam_optax.trajectory_loss(logits, targets, TAU), logits

  grads, logits = jax.grad(loss, has_aux=True)(params)
  extra = {"example_ids": idx, "outputs": logits} if kind == "saf" else {}
  return tx.update(grads, opt_state, params, **extra)


def make_step(tx, x_train, y_train, kind="grad_fn"):
  def step(carry, idx):
    params, opt_state, extra = carry
    x, y = x_train[idx], y_train[idx]
    if kind in ("mesa", "saf"):
      updates, opt_state = _trajectory_update(kind, tx, params, opt_state, x,
                                              y, idx)
    elif kind == "esam":
      grads = jax.grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(
          grads, opt_state, params, example_loss_fn=example_losses,
          batch=(x, y))
    else:
      grads = jax.grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(
          grads, opt_state, params,
          grad_fn=lambda p: jax.grad(loss_fn)(p, x, y))
    extra = extra + (radius_of(opt_state) > 0).astype(jnp.float32)
    return (optax.apply_updates(params, updates), opt_state, extra), None

  return step


# ----------------------------------------------------------------------------
# Training and selection.
# ----------------------------------------------------------------------------


def make_train(method, epochs, data):
  """``train(key, y_noisy, h) -> metrics``, jitted once per method."""
  x_train, _, x_val, y_val, x_test, y_test = map(jnp.asarray, data)
  n = x_train.shape[0]
  steps_per_epoch = n // BATCH_SIZE
  total = epochs * steps_per_epoch

  def train(key, y_noisy, h):
    base = optax.sgd(optax.cosine_decay_schedule(LR, total),
                     momentum=MOMENTUM)
    tx = method.make(base, h, total)
    init_key, data_key = jax.random.split(key)
    params = init_mlp(init_key)
    step = make_step(tx, x_train, y_noisy, method.step_kind)

    def epoch(carry, key):
      order = jax.random.permutation(key, n)[:steps_per_epoch * BATCH_SIZE]
      carry, _ = jax.lax.scan(step, carry,
                              order.reshape(steps_per_epoch, BATCH_SIZE))
      return carry, None

    (params, opt_state, second), _ = jax.lax.scan(
        epoch, (params, tx.init(params), jnp.zeros([])),
        jax.random.split(data_key, epochs))
    clean = sam_optax.eval_params(opt_state, params)
    return {"val_acc": accuracy(clean, x_val, y_val),
            "test_acc": accuracy(clean, x_test, y_test),
            "grads_per_step": (
                method.grads if method.grads is not None else
                1.0 + (0.0 if method.one_gradient else second / total))}

  return jax.jit(train)


def run_grid(name, method, epochs, data, noise_levels, seeds, log):
  """Every (noise, h, seed) run of one method; the h chosen on validation."""
  train = make_train(method, epochs * method.epochs, data)
  out = {}
  for noise in noise_levels:
    ys = [jnp.asarray(noisy_labels(data[1], noise, s)) for s in seeds]
    tried = []
    for h in method.grid:
      start = time.perf_counter()
      runs = [jax.tree.map(float, train(
          jax.random.key(s), y, {k: jnp.float32(v) for k, v in h.items()}))
              for s, y in zip(seeds, ys)]
      tried.append({"h": h, "runs": runs,
                    "val": float(np.mean([r["val_acc"] for r in runs]))})
      log(f"  {name:13s} noise {noise:.0%} {fmt_h(h):18s} val "
          f"{100 * tried[-1]['val']:5.1f}  test "
          f"{100 * np.mean([r['test_acc'] for r in runs]):5.1f}  "
          f"({time.perf_counter() - start:4.1f} s)")
    best = max(tried, key=lambda t: t["val"])
    out[noise] = {"chosen": best["h"], "tried": tried}
  return out


def fmt_h(h):
  return " ".join(f"{k}={v:g}" for k, v in h.items()) or "-"


# ----------------------------------------------------------------------------
# Step time, interleaved.
# ----------------------------------------------------------------------------


def time_steps(chosen, data, rounds, log, batch_size=BATCH_SIZE,
               calls_warmup=4, steps=50, repeats=3):
  """Median over rounds of each method's step time / SGD's, interleaved."""
  x_train, y_train = jnp.asarray(data[0]), jnp.asarray(data[1])
  n = x_train.shape[0]
  horizon = (calls_warmup + rounds * repeats) * steps
  names = list(chosen)
  runners, carries = {}, {}
  key = jax.random.key(0)
  for name in names:
    base = optax.sgd(optax.cosine_decay_schedule(LR, horizon),
                     momentum=MOMENTUM)
    h = {k: jnp.float32(v) for k, v in chosen[name].items()}
    tx = METHODS[name].make(base, h, horizon)
    step = make_step(tx, x_train, y_train, METHODS[name].step_kind)
    runners[name] = jax.jit(lambda c, idx, step=step: jax.lax.scan(
        step, c, idx)[0])
    params = init_mlp(key)
    carries[name] = (params, tx.init(params), jnp.zeros([]))
  batches = np.random.default_rng(0).integers(
      0, n, (calls_warmup + rounds, steps, batch_size))
  batches = [jnp.asarray(b) for b in batches]
  for i in range(calls_warmup):
    for name in names:
      carries[name] = jax.block_until_ready(
          runners[name](carries[name], batches[i]))
  ratios = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    seconds = {}
    idx = batches[calls_warmup + r]
    for name in order:
      best = float("inf")
      for _ in range(repeats):  # The fastest of a few: contention spikes out.
        start = time.perf_counter()
        carries[name] = jax.block_until_ready(
            runners[name](carries[name], idx))
        best = min(best, time.perf_counter() - start)
      seconds[name] = best
    for name in names:
      ratios[name].append(seconds[name] / seconds["sgd"])
  out = {}
  for name in names:
    q = np.percentile(ratios[name], [25, 50, 75])
    out[name] = {"median": float(q[1]), "q25": float(q[0]),
                 "q75": float(q[2])}
  log(f"  batch {batch_size}: step time / SGD's (median): " + ", ".join(
      f"{k} {v['median']:.2f}" for k, v in out.items()))
  return out


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------


def summarize(grid_results, timing, noise_levels):
  rows = {}
  for name, per_noise in grid_results.items():
    row = {"noise": {}}
    for noise in noise_levels:
      best = next(t for t in per_noise[noise]["tried"]
                  if t["h"] == per_noise[noise]["chosen"])
      test = [r["test_acc"] for r in best["runs"]]
      row["noise"][noise] = {
          "chosen": best["h"], "test_mean": float(np.mean(test)),
          "test_std": float(np.std(test)), "val": best["val"],
          "grads_per_step": float(np.mean(
              [r["grads_per_step"] for r in best["runs"]]))}
    rows[name] = row
  for noise in noise_levels:
    sgd = rows["sgd"]["noise"][noise]["test_mean"]
    gain = rows["sam"]["noise"][noise]["test_mean"] - sgd
    for name in rows:
      d = rows[name]["noise"][noise]
      d["gain_kept"] = ((d["test_mean"] - sgd) / gain if gain > 0
                        else float("nan"))
  for name in rows:
    t = timing[name]["median"] if name in timing else timing["sgd"]["median"]
    rows[name]["step_ratio"] = t
    rows[name]["step_ratio_iqr"] = (
        [timing[name]["q25"], timing[name]["q75"]] if name in timing
        else None)
    rows[name]["train_cost"] = t * METHODS[name].epochs
    rows[name]["cheap_and_good"] = bool(
        rows[name]["train_cost"] <= 1.05 and all(
            rows[name]["noise"][p]["gain_kept"] >= 0.9
            for p in noise_levels))
  return rows


def markdown(rows, settings, argv, elapsed):
  noise_levels = settings["noise_levels"]
  lines = [
      "# Quality vs cost frontier (digits MLP, symmetric label noise)", "",
      f"Machine: {settings['machine']}; jax {jax.__version__}, optax "
      f"{optax.__version__}. Command: `python benchmarks/frontier.py "
      f"{' '.join(argv)}` ({elapsed:.0f} s). {settings['epochs']} epochs, "
      f"seeds {settings['seeds']}, train {settings['n_train']} (noisy) / "
      f"validation {settings['n_val']} (clean) / test {settings['n_test']} "
      "(clean). Each method's hyperparameters chosen per noise level on the "
      "validation split; test accuracy % mean ± std over seeds; gain kept = "
      "(acc − SGD) / (SAM − SGD). Step = step time / SGD step time (median "
      "of interleaved paired ratios, [IQR]) at the training batch "
      f"{BATCH_SIZE}; step b{BIG_BATCH}: the same at batch {BIG_BATCH}; "
      "cost = step × epoch multiplier; "
      "grads = gradient evaluations per step (counted in training).", ""]
  head = f"| method | step [IQR] | step b{BIG_BATCH} | cost | grads |"
  sep = "|---|---|---|---|---|"
  for p in noise_levels:
    head += f" {p:.0%}: test acc | kept | chosen |"
    sep += "---|---|---|"
  lines += [head, sep]
  for name, row in sorted(rows.items(), key=lambda kv: kv[1]["train_cost"]):
    iqr = row["step_ratio_iqr"]
    iqr_s = f" [{iqr[0]:.2f}, {iqr[1]:.2f}]" if iqr else ""
    grads = np.mean([row["noise"][p]["grads_per_step"]
                     for p in noise_levels])
    line = (f"| {name} | {row['step_ratio']:.2f}{iqr_s} | "
            f"{row['step_ratio_big_batch']:.2f} | "
            f"{row['train_cost']:.2f} | {grads:.2f} |")
    for p in noise_levels:
      d = row["noise"][p]
      line += (f" {100 * d['test_mean']:.1f} ± {100 * d['test_std']:.1f} | "
               f"{100 * d['gain_kept']:.0f}% | {fmt_h(d['chosen'])} |")
    lines.append(line)
  lines += ["", "## Verdict", ""]
  target = [n for n, r in rows.items() if r["cheap_and_good"]]
  if target:
    lines.append("Cost ≤ 1.05x SGD with ≥ 90% of SAM's gain at every noise "
                 f"level: **{', '.join(target)}**.")
  else:
    lines.append("No method costs ≤ 1.05x SGD *and* keeps ≥ 90% of SAM's "
                 "gain at every noise level. By how much each misses:")
    lines.append("")
    for name, row in rows.items():
      if name in ("sgd", "sam"):
        continue
      cost = row["train_cost"]
      worst = min(row["noise"][p]["gain_kept"] for p in noise_levels)
      cost_s = "ok" if cost <= 1.05 else f"over by {cost - 1.05:.2f}"
      gain_s = ("n/a: SAM did not beat SGD" if np.isnan(worst)
                else "ok" if worst >= 0.9
                else f"short by {100 * (0.9 - worst):.0f} points")
      lines.append(f"- {name}: cost {cost:.2f}x ({cost_s}), worst gain "
                   f"kept {100 * worst:.0f}% ({gain_s})")
  return "\n".join(lines) + "\n"


def plot(rows, noise_levels, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(noise_levels),
                           figsize=(4.6 * len(noise_levels), 4.2),
                           squeeze=False)
  for ax, p in zip(axes[0], noise_levels):
    for name, row in rows.items():
      d = row["noise"][p]
      style = {"sgd": "ks", "sam": "r*", "sgd_2x": "kD"}.get(name, "o")
      ax.errorbar(row["train_cost"], 100 * d["test_mean"],
                  yerr=100 * d["test_std"], fmt=style, capsize=3,
                  markersize=9 if name in ("sgd", "sam") else 6)
      ax.annotate(name, (row["train_cost"], 100 * d["test_mean"]),
                  textcoords="offset points", xytext=(4, 4), fontsize=8)
    sgd = rows["sgd"]["noise"][p]["test_mean"] * 100
    sam = rows["sam"]["noise"][p]["test_mean"] * 100
    ax.axhline(sgd + 0.9 * (sam - sgd), color="gray", ls=":", lw=1)
    ax.axvline(1.05, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xticks([1, 1.5, 2, 3, 5, 10])
    ax.set_xticklabels(["1", "1.5", "2", "3", "5", "10"])
    ax.set_title(f"{p:.0%} label noise")
    ax.set_xlabel("training cost (SGD = 1, log scale)")
    ax.set_ylabel("test accuracy (%)")
  fig.suptitle("Quality vs cost (dotted: 1.05x SGD, 90% of SAM's gain)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return jax.devices()[0].device_kind


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="40%% noise only, 2 seeds, 20 epochs")
  parser.add_argument("--epochs", type=int, help="default 40 (quick 20)")
  parser.add_argument("--seeds", type=int, help="default 3 (quick 2)")
  parser.add_argument("--rounds", type=int,
                      help="timing rounds (default 40; quick 15)")
  parser.add_argument("--methods", help="comma-separated subset of METHODS "
                      "(sgd and sam are always run)")
  parser.add_argument("--retime", metavar="JSON",
                      help="skip training: reuse the runs of an earlier "
                      "result file and only measure the step times again "
                      "(the CPU is shared: time when it is quiet)")
  parser.add_argument("--write", action="store_true",
                      help="write benchmarks/results/frontier.{json,md,png}")
  args = parser.parse_args(argv)
  argv_used = list(sys.argv[1:] if argv is None else argv)
  epochs = args.epochs or (20 if args.quick else 40)
  seeds = list(range(args.seeds or (2 if args.quick else 3)))
  rounds = args.rounds or (15 if args.quick else 40)
  noise_levels = [0.4] if args.quick else [0.2, 0.4, 0.6]
  names = list(METHODS)
  if args.methods:
    wanted = set(args.methods.split(",")) | {"sgd", "sam"}
    names = [n for n in names if n in wanted]
  out_dir = os.path.join(HERE, "results") if args.write else os.path.join(
      HERE, "results", "local")
  stem = os.path.join(out_dir, "frontier" + (
      "_quick" if args.quick and not args.write else ""))

  def log(msg):
    print(msg, flush=True)

  data = load_data()
  machine = (f"{cpu_model()} ({os.cpu_count()} cores), "
             f"{jax.devices()[0].platform}")
  log(f"digits: {len(data[0])} train / {len(data[2])} val / {len(data[4])} "
      f"test; noise {noise_levels}, seeds {seeds}, {epochs} epochs; "
      f"{machine}")
  start = time.perf_counter()
  grid_results = {}
  if args.retime:
    with open(args.retime) as f:
      old = json.load(f)
    settings_old = old["settings"]
    epochs, seeds = settings_old["epochs"], settings_old["seeds"]
    noise_levels = settings_old["noise_levels"]
    argv_used = old["argv"] + ["(re-timed: " + " ".join(argv_used) + ")"]
    names = [n for n in names if n in old["runs"]]
    grid_results = {n: {float(p): v for p, v in old["runs"][n].items()}
                    for n in names}
  for i, name in enumerate(names):
    if name in grid_results:
      continue
    log(f"[{i + 1}/{len(names)}] {name}")
    grid_results[name] = run_grid(name, METHODS[name], epochs, data,
                                  noise_levels, seeds, log)
  log(f"timing {len(names)} steps, {rounds} interleaved rounds")
  chosen = {n: grid_results[n][noise_levels[0]]["chosen"] for n in names
            if METHODS[n].epochs == 1}
  timing = time_steps(chosen, data, rounds, log)
  log(f"timing again at batch {BIG_BATCH} (compute-bound: the elementwise "
      "extras weigh less)")
  timing_big = time_steps(chosen, data, max(rounds // 2, 5), log,
                          batch_size=BIG_BATCH, steps=10)
  elapsed = time.perf_counter() - start
  if args.retime:  # Report the training's time; the re-timing's in argv.
    argv_used[-1] = argv_used[-1][:-1] + f" in {elapsed:.0f} s)"
    elapsed = old["elapsed_s"]
  rows = summarize(grid_results, timing, noise_levels)
  for name, row in rows.items():
    big = timing_big.get(name, timing_big["sgd"])
    row["step_ratio_big_batch"] = big["median"]
  settings = {"epochs": epochs, "seeds": seeds, "noise_levels": noise_levels,
              "machine": machine, "sizes": SIZES, "batch_size": BATCH_SIZE,
              "lr": LR, "momentum": MOMENTUM, "rounds": rounds,
              "n_train": len(data[0]), "n_val": len(data[2]),
              "n_test": len(data[4]),
              "grids": {n: list(METHODS[n].grid) for n in names}}
  md = markdown(rows, settings, argv_used, elapsed)
  os.makedirs(out_dir, exist_ok=True)
  with open(stem + ".md", "w") as f:
    f.write(md)
  with open(stem + ".json", "w") as f:
    json.dump({"settings": settings, "argv": argv_used, "elapsed_s": elapsed,
               "timing": timing, "timing_big_batch": timing_big,
               "rows": {n: {**r, "noise": {str(p): d for p, d in
                                           r["noise"].items()}}
                        for n, r in rows.items()},
               "runs": {n: {str(p): v for p, v in g.items()}
                        for n, g in grid_results.items()}}, f, indent=1)
  plot(rows, noise_levels, stem + ".png")
  log("")
  log(md)
  log(f"wrote {stem}.md, .json and .png ({elapsed:.0f} s)")


if __name__ == "__main__":
  main()
